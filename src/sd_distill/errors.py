"""Errors a user can act on, and the exit status each gives (what orchestrators read to retry or not).

``EXIT_STATUSES`` is the one table of exit statuses: ``sd-distill --help`` prints it (``exit_status_help``), the
README holds it (``exit_status_table``, kept equal by ``tests/test_cli.py``) and the orchestrators take
``NOT_RETRYABLE`` and ``EXIT_MEANINGS`` from it. Each error class below carries its status as ``EXIT_CODE``.
"""

from __future__ import annotations

import textwrap
from typing import Literal, NamedTuple


class ExitStatus(NamedTuple):
    status: int
    meaning: str  # Markdown (backticks around names)
    orchestrators: str  # what Airflow and Kubeflow do next
    then: Literal["next", "retry", "fail"]  # fail: a retry cannot change the outcome, the task fails at once


EXIT_STATUSES = (
    ExitStatus(0, "done, or up to date (nothing to do)", "next task", "next"),
    ExitStatus(1, "crash (a bug, a lost node, the kernel's OOM killer)",
               "retry; it resumes from the last checkpoint", "retry"),
    ExitStatus(2, "bad params, input, or model folder; one line names the file, key or value, expected and found",
               "fail at once", "fail"),
    ExitStatus(3, "training failed: NaN/Inf loss (the line names the step and each loss term), or out of memory at "
                  "`train.min_micro_batch`", "fail at once", "fail"),
    ExitStatus(75, "the same stage is already running in this project", "retry later; it then finds the result",
               "retry"),
    ExitStatus(143, "SIGTERM: stopped at a step boundary with a checkpoint", "retry; it resumes", "retry"),
)

# exit statuses a retry cannot change: the orchestrators fail the task at once on these
NOT_RETRYABLE = tuple(s.status for s in EXIT_STATUSES if s.then == "fail")
# status -> meaning in plain text, for the orchestrators' log lines
EXIT_MEANINGS = {s.status: s.meaning.replace("`", "") for s in EXIT_STATUSES}


def exit_status_table() -> str:
    """``EXIT_STATUSES`` as the README's Markdown table."""
    rows = ["| `sd-distill run` exits with | meaning | the orchestrators |", "|---|---|---|"]
    rows += [f"| {s.status} | {s.meaning} | {s.orchestrators} |" for s in EXIT_STATUSES]
    return "\n".join(rows) + "\n"


def exit_status_help(width: int = 100) -> str:
    """``EXIT_STATUSES`` as the plain-text paragraph of ``sd-distill --help``."""
    lines = ["exit status:"]
    for s in EXIT_STATUSES:
        text = f"{s.status:<5}{EXIT_MEANINGS[s.status]}. Orchestrators: {s.orchestrators}"
        lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent=" " * 7)
    return "\n".join(lines) + "\n"


class UserError(Exception):
    """Bad input, config or state; the message names the file, key or value and what was expected."""

    EXIT_CODE = 2


class MissingInput(UserError, FileNotFoundError):
    """An input file or folder is not there; the message names it and the stage or step that writes it.

    Only what the user (or an earlier stage the user has to run) provides: a file a stage fails to write for itself
    is a bug and raises a plain error (exit status 1)."""


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
