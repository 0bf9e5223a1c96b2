"""Errors a user can act on, and the exit status each gives (what orchestrators read to retry or not).

| status | meaning | retry? |
|---|---|---|
| 0 | done (or already up to date) | - |
| 1 | unexpected crash (a bug, a lost node, the kernel's OOM killer) | yes |
| 2 | ``UserError``: bad params, input, model folder or state; the message names it | no |
| 3 | ``TrainingFailed``: NaN/Inf loss, out of memory at the smallest micro-batch | no |
| 75 | ``StageBusy``: another process is running this stage in this project | yes, later |
| 143 | ``Preempted``: SIGTERM; stopped at a step boundary with a checkpoint | yes (resumes) |
"""

# exit statuses a retry cannot change: the orchestrators fail the task at once on these
NOT_RETRYABLE = (2, 3)


class UserError(Exception):
    """Bad input, config or state; the message names the file, key or value and what was expected."""

    EXIT_CODE = 2


class TrainingFailed(UserError, RuntimeError):
    """Training cannot go on with these params (the loss diverged, memory ran out at the smallest micro-batch);
    the last good checkpoint is kept and nothing is published. A retry would fail the same way."""

    EXIT_CODE = 3


class StageBusy(UserError):
    """Another process holds this stage's lock in this project; the retry finds its result."""

    EXIT_CODE = 75


class Preempted(Exception):
    """SIGTERM reached a stage: it stopped at a step boundary with a checkpoint; a rerun resumes from it.

    The CLI exits with ``EXIT_CODE`` (128 + SIGTERM), which orchestrators treat as retryable.
    """

    EXIT_CODE = 143
