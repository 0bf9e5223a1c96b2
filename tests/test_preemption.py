"""Preemption: SIGTERM stops a stage at a step boundary with a checkpoint (exit 143, MLflow KILLED) and a rerun
resumes; a stage killed outright (SIGKILL) leaves a RUNNING MLflow run that the next start closes."""

import os
import re
import shutil
import signal
import subprocess
import time

import mlflow
import pytest

from tests.conftest import BIN

pytestmark = pytest.mark.slow
LONG = ["--set", "guidance.train.steps=40", "--set", "guidance.train.checkpoint_every=2",
        "--set", "guidance.train.batch_size=4", "--set", "guidance.train.log_every=10",
        "--set", "guidance.train.keep_checkpoints=50"]


def start(root, uri, *extra):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([BIN / "sd-distill", "run", "guidance", "--params", root / "params.yaml", *LONG, *extra],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(root, step: int, proc, timeout: float = 120) -> None:
    """Wait until the stage has written checkpoint ``step`` (it is mid-run then)."""
    marker = root / "checkpoints" / "guidance" / f"step-{step:07d}" / "COMPLETE"
    deadline = time.time() + timeout
    while not marker.is_file():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
        time.sleep(0.05)


def runs(uri):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sd-distill")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture
def project(smoke_project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(smoke_project, root)
    shutil.rmtree(root / "models" / "guided")  # as if guidance had never run
    shutil.rmtree(root / "checkpoints" / "guidance")
    return root, f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_sigterm_stops_at_a_step_with_a_checkpoint_exits_143_and_a_resume_finishes(project):
    root, uri = project
    proc = start(root, uri)
    wait_for_checkpoint(root, 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+) of 40", err).group(1))
    assert 4 <= stopped < 40
    assert (root / "checkpoints" / "guidance" / f"step-{stopped:07d}" / "COMPLETE").is_file()
    assert not (root / "models" / "guided").exists()  # nothing published
    (killed,) = runs(uri)
    assert killed.info.status == "KILLED"

    resumed = start(root, uri, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resumed from" in err and f"(step {stopped} of 40)" in err
    assert (root / "models" / "guided" / "model_index.json").is_file()
    assert [r.info.status for r in runs(uri)] == ["KILLED", "FINISHED"]


def test_a_run_left_running_by_a_killed_process_is_closed_at_the_next_start(project):
    root, uri = project
    proc = start(root, uri)
    wait_for_checkpoint(root, 2, proc)
    proc.kill()  # SIGKILL: no handler runs, MLflow is left RUNNING
    proc.wait(timeout=60)
    (orphan,) = runs(uri)
    assert orphan.info.status == "RUNNING"
    again = subprocess.run([BIN / "sd-distill", "run", "guidance", "--params", root / "params.yaml"], cwd=root,
                           env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "closed 1 run(s) left RUNNING by a dead process" in again.stderr
    statuses = {r.info.run_id: r.info.status for r in runs(uri)}
    assert statuses.pop(orphan.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]
