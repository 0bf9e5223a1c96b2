"""MLflow tracking: a parent run per pipeline run, a child run per stage.

The tracking URI defaults to a SQLite file in the project (``MLFLOW_TRACKING_URI`` overrides it). The
parent run id travels to stage processes in ``SD_DISTILL_PARENT_RUN_ID`` (set by ``sd-distill repro`` and
by the orchestrators); a stage started without it logs a top-level run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sd_distill.errors import Preempted

PARENT_ENV = "SD_DISTILL_PARENT_RUN_ID"
EXPERIMENT = "sd-distill"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def _setup(root: Path):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(root))
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if mlflow.get_tracking_uri().startswith("sqlite:"):
            location = (Path(root) / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return mlflow


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


HOST_TAG, PID_TAG = "sd_distill.host", "sd_distill.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_dead_runs(mlflow, stage: str, pipeline_run: str | None) -> list[str]:
    """Mark KILLED the stage's runs left RUNNING by a process that died (SIGKILL, a lost node).

    Dead means: started on this host by a process that no longer exists, or started by an earlier attempt
    of the same orchestrated run (an orchestrator retries a task only once its attempt has ended).
    Returns the run ids it closed.
    """
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    found = client.search_runs([experiment.experiment_id],
                               f"tags.`sd_distill.stage` = '{stage}' and attributes.status = 'RUNNING'")
    host, closed = socket.gethostname(), []
    for run in found:
        tags = run.data.tags
        same_attempt_chain = pipeline_run is not None and tags.get("sd_distill.pipeline_run") == pipeline_run
        dead_here = tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit() and not _alive(int(tags[PID_TAG]))
        if same_attempt_chain or dead_here:
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        import logging

        logging.getLogger("sd_distill").warning("stage %s: closed %d run(s) left RUNNING by a dead process: %s",
                                                stage, len(closed), ", ".join(closed))
    return closed


@contextmanager
def stage_run(root: Path, stage: str, params: dict[str, Any], profile: str,
              pipeline_run: str | None = None) -> Iterator[Any]:
    """Child run named after the stage; ends FAILED when the body raises, KILLED on Ctrl-C or SIGTERM.

    ``pipeline_run`` (an Airflow DAG run or Kubeflow job, ``airflow:<run_id>``) tags the run so that one
    orchestrated run's stages can be found together: ``tags.`sd_distill.pipeline_run` = '...'``.
    """
    mlflow = _setup(root)
    close_dead_runs(mlflow, stage, pipeline_run)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"sd_distill.stage": stage, "sd_distill.profile": profile, HOST_TAG: socket.gethostname(),
            PID_TAG: str(os.getpid())}
    if pipeline_run:
        tags["sd_distill.pipeline_run"] = pipeline_run
    run = mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags)
    try:
        mlflow.log_params(flatten(params))
        mlflow.log_dict(params, "params.json")
        yield mlflow
    except (KeyboardInterrupt, Preempted):
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        del run


@contextmanager
def pipeline_run(root: Path, profile: str, name: str = "pipeline") -> Iterator[str]:
    """Parent run for one pipeline run; its id is exported to the stage processes started inside."""
    mlflow = _setup(root)
    run = mlflow.start_run(run_name=name, tags={"sd_distill.pipeline": "1", "sd_distill.profile": profile})
    os.environ[PARENT_ENV] = run.info.run_id
    status = "FAILED"
    try:
        yield run.info.run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        os.environ.pop(PARENT_ENV, None)
        mlflow.end_run(status)
