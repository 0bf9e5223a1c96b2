"""Errors a user can act on: the CLI prints their message (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input, config or state; the message names the file, key or value and what was expected."""


class Preempted(Exception):
    """SIGTERM reached a stage: it stopped at a step boundary with a checkpoint; a rerun resumes from it.

    The CLI exits with ``EXIT_CODE`` (128 + SIGTERM), which orchestrators treat as retryable.
    """

    EXIT_CODE = 143
