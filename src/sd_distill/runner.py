"""Run one registry stage: resolve params, open its MLflow run, call its entry, publish outputs atomically.

What the runner guarantees around a stage's entry function:

- **One at a time.** A stage holds ``checkpoints/<stage>.lock`` (``flock``, released by the kernel when the
  process dies, even by SIGKILL) while it runs; a second start in the same project stops with ``StageBusy``.
- **No work twice.** A finished stage records the sha256 of its inputs and params and of what it published in
  ``checkpoints/<stage>.done.json``; started again with the same inputs and params, and its outputs unchanged, it
  does nothing (``--force`` reruns it). ``dvc repro`` removes a stage's outputs before running it, so DVC decides.
- **Nothing half-made at an output path.** Outputs are written to ``.<name>.partial`` siblings and renamed into
  place only after the entry returned; a stage that fails removes its partial outputs and leaves the previous
  complete outputs, if any, untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sd_distill import __version__, registry, tracking
from sd_distill.errors import MissingInput, StageBusy, UserError
from sd_distill.hashing import tree_hash
from sd_distill.names import PARAMS_RECORD
from sd_distill.params import Params

log = logging.getLogger("sd_distill")


@dataclass
class StageContext:
    """What a stage entry gets: its params, input paths, staging paths for outputs, and logging hooks."""

    stage: registry.Stage
    params: Params
    root: Path
    resume: bool = False
    inputs: dict[str, Path] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)  # staging paths, renamed into place on success
    log_metrics: Callable[[dict[str, float], int | None], None] = lambda m, step=None: None
    summary: dict[str, Any] = field(default_factory=dict)  # final scalars, logged as run metrics

    @property
    def work(self) -> Path:
        """Stage scratch space kept across runs (checkpoints for --resume); not a DVC output."""
        path = self.root / "checkpoints" / self.stage.name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _staging(final: Path) -> Path:
    return final.with_name(f".{final.stem}.partial{final.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _publish(stage: str, staged: dict[str, Path], finals: dict[str, Path], record: dict) -> None:
    """Rename every staged output into place, once all of them exist (each folder gets the params record)."""
    for role, path in staged.items():
        if not path.exists():  # a bug in the stage, not bad input: exit status 1 with a traceback
            raise RuntimeError(f"stage {stage} returned without writing its declared output {role}: {path} does not "
                               f"exist (it publishes to {finals[role]})")
    for path in staged.values():
        if path.is_dir():
            (path / PARAMS_RECORD).write_text(json.dumps(record, indent=2))
    for role, path in staged.items():
        _remove(finals[role])
        path.rename(finals[role])


def run_key(stage: registry.Stage, section: dict, inputs: dict[str, Path]) -> str:
    """What a stage's result depends on: its params section, its inputs' content and sd-distill's version."""
    body = {"stage": stage.name, "version": __version__, "params": section,
            "inputs": {role: tree_hash(path) for role, path in sorted(inputs.items())}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _done_file(root: Path, name: str) -> Path:
    return root / "checkpoints" / f"{name}.done.json"


def up_to_date(root: Path, name: str, key: str, finals: dict[str, Path]) -> dict[str, Any] | None:
    """The summary of the finished run recorded for ``key`` if every output it published is still there
    unchanged; else None."""
    done = _done_file(root, name)
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("key") != key or set(record.get("outputs", {})) != set(finals):
        return None
    for role, path in finals.items():
        if not path.exists() or tree_hash(path) != record["outputs"][role]:
            return None
    return record.get("summary", {})


def _write_done(root: Path, name: str, key: str, finals: dict[str, Path], summary: dict[str, Any]) -> None:
    done = _done_file(root, name)
    tmp = done.with_name(f".{done.name}.tmp")
    tmp.write_text(json.dumps({"key": key, "outputs": {r: tree_hash(p) for r, p in finals.items()},
                               "summary": summary}, indent=2))
    tmp.rename(done)


_HELD_LOCKS: set[int] = set()


def _drop_locks_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the stage locks: a flock lives as long as any
    copy of its descriptor, and a worker outliving a killed stage must not keep the stage locked."""
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


@contextlib.contextmanager
def stage_lock(root: Path, name: str):
    """Hold ``checkpoints/<name>.lock`` for the duration, or raise ``StageBusy`` naming the holder."""
    path = root / "checkpoints" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise StageBusy(f"stage {name} is already running in {root} ({holder}); this start does nothing. "
                            "Wait for it (a rerun then finds its result), or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # closing releases the lock


def _retry_of(root: Path, stage: str, pipeline_run: str | None) -> bool:
    """True when this is a retry of the same orchestrated run (its checkpoints are ours to resume).

    The run id is kept beside the stage's checkpoints; another run id (or none) starts the stage over.
    """
    if not pipeline_run:
        return False
    marker = root / "checkpoints" / f"{stage}.pipeline-run"
    same = marker.is_file() and marker.read_text() == pipeline_run
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(pipeline_run)
    return same


def _failure_file(root: Path, name: str) -> Path:
    return root / "checkpoints" / f"{name}.failed.json"


def _record_failure(root: Path, name: str, pipeline_run: str | None, exc: UserError) -> None:
    """Remember, for the orchestrated run, that this stage failed in a way a retry cannot change."""
    if pipeline_run:
        _failure_file(root, name).write_text(json.dumps(
            {"pipeline_run": pipeline_run, "exit_code": exc.EXIT_CODE, "message": str(exc)}))


def _failed_before(root: Path, name: str, pipeline_run: str | None) -> None:
    """A retry within the same orchestrated run of a stage that failed for good (Kubeflow and Argo retry every
    failure) fails at once with the first failure's status and message, instead of training up to it again."""
    path = _failure_file(root, name)
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    if pipeline_run and record.get("pipeline_run") == pipeline_run:
        exc = UserError(f"{record['message']} (recorded by an earlier try of pipeline run {pipeline_run}; not "
                        "retried)")
        exc.EXIT_CODE = int(record["exit_code"])
        raise exc
    path.unlink()


def process_rank() -> int:
    """This process's rank under ``torchrun`` / ``accelerate launch`` (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


def run_stage(name: str, params: Params, root: Path = Path("."), resume: bool = False,
              pipeline_run: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run stage ``name`` in project ``root``; returns the stage's summary scalars.

    ``pipeline_run`` names the orchestrated run (Airflow DAG run, Kubeflow job) this stage belongs to: it
    tags the MLflow run, and a second start with the same id (the orchestrator's retry) resumes from the
    stage's last checkpoint as ``resume`` does. A stage whose inputs, params and published outputs are those of
    its last finished run does nothing (returns that run's summary with ``up_to_date: 1``) unless ``force``.

    Under a multi-process launcher every process runs the stage (the training loop is data-parallel);
    only rank 0 tracks it in MLflow and publishes outputs, the others write to private scratch folders.
    """
    if process_rank() > 0:
        return _run_follower(name, params, Path(root).resolve(), resume or force)
    stage = registry.get(name)
    root = Path(root).resolve()
    inputs = {role: root / p for role, p in stage.inputs.items()}
    for role, path in inputs.items():
        if not path.exists():
            up = registry.producer(stage.inputs[role]) or "an earlier stage"
            raise MissingInput(f"stage {name}: input {role} ({path}) does not exist; run {up} first")
    finals = {role: root / p for role, p in stage.produced.items()}
    section = params.for_stage(stage.params_section)
    with stage_lock(root, name):
        key = run_key(stage, section, inputs)
        if not (resume or force) and (summary := up_to_date(root, name, key, finals)) is not None:
            log.info("stage %s: up to date (same inputs and params as its last finished run, outputs unchanged); "
                     "nothing to do. --force reruns it", name)
            return {**summary, "up_to_date": 1}
        _done_file(root, name).unlink(missing_ok=True)
        _failed_before(root, name, pipeline_run)
        if _retry_of(root, name, pipeline_run) and not resume:
            log.info("stage %s: retry of pipeline run %s, resuming from the last checkpoint", name, pipeline_run)
            resume = True
        staged = {role: _staging(p) for role, p in finals.items()}
        for path in staged.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove(path)
        try:
            summary = _run_main(stage, params, root, section, inputs, staged, finals, resume, pipeline_run)
        except UserError as exc:
            _record_failure(root, name, pipeline_run, exc)
            raise
        finally:
            for path in staged.values():  # a failed stage leaves no partial output behind
                _remove(path)
        _write_done(root, name, key, finals, summary)
    log.info("stage %s done in %.1fs: %s", name, summary["stage_seconds"], json.dumps(summary))
    return summary


def _run_main(stage: registry.Stage, params: Params, root: Path, section: dict, inputs: dict[str, Path],
              staged: dict[str, Path], finals: dict[str, Path], resume: bool, pipeline_run: str | None) -> dict:
    entry_module, entry_fn = stage.entry.split(":")
    started = time.time()
    with tracking.stage_run(root, stage.name, section, params.profile, pipeline_run) as mlflow:
        ctx = StageContext(
            stage=stage, params=params, root=root, resume=resume, inputs=inputs, outputs=staged,
            log_metrics=lambda m, step=None: mlflow.log_metrics(m, step=step),
        )
        getattr(importlib.import_module(entry_module), entry_fn)(ctx)
        _publish(stage.name, staged, finals, section)
        ctx.summary["stage_seconds"] = round(time.time() - started, 2)
        mlflow.log_metrics({k: float(v) for k, v in ctx.summary.items()})
        for path in (*stage.metrics.values(), *stage.plots.values(), *stage.reports.values()):
            mlflow.log_artifact(str(root / path), "reports")
        if params.base.log_model_artifacts:
            for role, path in stage.outputs.items():
                mlflow.log_artifacts(str(root / path), role)
    return ctx.summary


def _run_follower(name: str, params: Params, root: Path, rerun: bool) -> dict[str, Any]:
    """A non-main process of a multi-process stage: trains alongside rank 0, keeps nothing.

    It takes rank 0's up-to-date decision by making the same check: rank 0 cannot finish (and so change the
    record) before every process has joined the training's process group."""
    stage = registry.get(name)
    finals = {role: root / p for role, p in stage.produced.items()}
    inputs = {role: root / p for role, p in stage.inputs.items()}
    if not rerun and all(p.exists() for p in inputs.values()):
        key = run_key(stage, params.for_stage(stage.params_section), inputs)
        if (summary := up_to_date(root, name, key, finals)) is not None:
            return {**summary, "up_to_date": 1}
    scratch = root / "checkpoints" / f".{stage.name}.rank{process_rank()}"
    shutil.rmtree(scratch, ignore_errors=True)
    outputs = {role: scratch / Path(p).name for role, p in stage.produced.items()}
    ctx = StageContext(stage=stage, params=params, root=root, inputs={r: root / p for r, p in stage.inputs.items()},
                       outputs=outputs)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        entry_module, entry_fn = stage.entry.split(":")
        getattr(importlib.import_module(entry_module), entry_fn)(ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ctx.summary
