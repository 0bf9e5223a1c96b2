"""Run one registry stage: resolve params, open its MLflow run, call its entry, publish outputs atomically."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sd_distill import registry, tracking
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


def _publish(staged: Path, final: Path) -> None:
    if not staged.exists():
        raise FileNotFoundError(f"the stage finished without writing {final}")
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    staged.rename(final)


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


def process_rank() -> int:
    """This process's rank under ``torchrun`` / ``accelerate launch`` (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


def run_stage(name: str, params: Params, root: Path = Path("."), resume: bool = False,
              pipeline_run: str | None = None) -> dict[str, Any]:
    """Run stage ``name`` in project ``root``; returns the stage's summary scalars.

    ``pipeline_run`` names the orchestrated run (Airflow DAG run, Kubeflow job) this stage belongs to: it
    tags the MLflow run, and a second start with the same id (the orchestrator's retry) resumes from the
    stage's last checkpoint as ``resume`` does.

    Under a multi-process launcher every process runs the stage (the training loop is data-parallel);
    only rank 0 tracks it in MLflow and publishes outputs, the others write to private scratch folders.
    """
    if process_rank() > 0:
        return _run_follower(name, params, Path(root).resolve())
    stage = registry.get(name)
    root = Path(root).resolve()
    if _retry_of(root, name, pipeline_run) and not resume:
        log.info("stage %s: retry of pipeline run %s, resuming from the last checkpoint", name, pipeline_run)
        resume = True
    inputs = {role: root / p for role, p in stage.inputs.items()}
    for role, path in inputs.items():
        if not path.exists():
            up = ", ".join(registry.upstream(stage)) or "an earlier stage"
            raise FileNotFoundError(f"stage {name}: input {role} ({path}) does not exist; run {up} first")
    finals = {role: root / p for role, p in stage.produced.items()}
    staged = {role: _staging(p) for role, p in finals.items()}
    for path in staged.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    entry_module, entry_fn = stage.entry.split(":")
    section = params.for_stage(stage.params_section)
    started = time.time()
    with tracking.stage_run(root, name, section, params.profile, pipeline_run) as mlflow:
        ctx = StageContext(
            stage=stage, params=params, root=root, resume=resume, inputs=inputs, outputs=staged,
            log_metrics=lambda m, step=None: mlflow.log_metrics(m, step=step),
        )
        getattr(importlib.import_module(entry_module), entry_fn)(ctx)
        for role in staged:
            _publish(staged[role], finals[role])
        for role, path in finals.items():
            if path.is_dir():
                (path / "params.resolved.json").write_text(json.dumps(section, indent=2))
        ctx.summary["stage_seconds"] = round(time.time() - started, 2)
        mlflow.log_metrics({k: float(v) for k, v in ctx.summary.items()})
        for path in (*stage.metrics.values(), *stage.plots.values(), *stage.reports.values()):
            mlflow.log_artifact(str(root / path), "reports")
        if params.base.log_model_artifacts:
            for role, path in stage.outputs.items():
                mlflow.log_artifacts(str(root / path), role)
    log.info("stage %s done in %.1fs: %s", name, ctx.summary["stage_seconds"], json.dumps(ctx.summary))
    return ctx.summary


def _run_follower(name: str, params: Params, root: Path) -> dict[str, Any]:
    """A non-main process of a multi-process stage: trains alongside rank 0, keeps nothing."""
    stage = registry.get(name)
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
