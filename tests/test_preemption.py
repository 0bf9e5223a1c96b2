"""Preemption: SIGTERM stops a stage at a step boundary with a checkpoint (exit 143, MLflow KILLED) and a rerun
resumes; a stage killed outright (SIGKILL) leaves a RUNNING MLflow run that the next start closes. Either way the
resumed stage publishes weights bitwise equal (sha256) to those of a run that was never interrupted."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import mlflow
import pytest

from sd_distill.data.shards import sha256_file

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


def copy_project(smoke_project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(smoke_project, root)
    shutil.rmtree(root / "models" / "guided")  # as if guidance had never run
    shutil.rmtree(root / "checkpoints" / "guidance")
    return root, f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def project(smoke_project, tmp_path):
    return copy_project(smoke_project, tmp_path)


WEIGHTS = "models/guided/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def uninterrupted(smoke_project, tmp_path_factory):
    """sha256 of the UNet weights that the same stage, params and seed publish when nothing stops it."""
    root, uri = copy_project(smoke_project, tmp_path_factory.mktemp("uninterrupted"))
    out, err = start(root, uri).communicate(timeout=300)
    assert "resumed from" not in err
    return sha256_file(root / WEIGHTS)


def test_sigterm_stops_at_a_step_with_a_checkpoint_exits_143_and_a_resume_finishes(project, uninterrupted):
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
    assert sha256_file(root / WEIGHTS) == uninterrupted


def test_sigkill_mid_run_then_resume_ends_with_the_uninterrupted_weights_and_closes_the_orphan_run(
        project, uninterrupted):
    root, uri = project
    proc = start(root, uri)
    wait_for_checkpoint(root, 2, proc)
    proc.kill()  # SIGKILL: no handler runs, MLflow is left RUNNING, the outputs half-made
    proc.wait(timeout=60)
    assert not (root / "models" / "guided").exists()  # nothing at the output path
    (orphan,) = runs(uri)
    assert orphan.info.status == "RUNNING"
    again = start(root, uri, "--resume")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert "closed 1 run(s) left RUNNING by a dead process" in err
    assert re.search(r"resumed from .*step-\d+ \(step \d+ of 40\)", err), err[-2000:]
    assert sha256_file(root / WEIGHTS) == uninterrupted
    assert not list((root / "models").glob(".*partial*"))  # the killed run's staging is gone
    statuses = {r.info.run_id: r.info.status for r in runs(uri)}
    assert statuses.pop(orphan.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]


# --------------------------------------------------------------------------- the RNG state is what makes it exact
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = [BIN / "python", os.path.join(ROOT, "tests", "ddp_train.py")]


def harness(out, *extra, wait=True):
    cmd = [*HARNESS, out, "--dropout", "0.3", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    return proc


def test_dropout_drawing_from_the_global_rng_resumes_exactly_only_with_the_rng_restored(tmp_path):
    """A model with dropout (global torch RNG) killed with SIGKILL mid-run: resumed, it ends with the sha256 of the
    uninterrupted run; resumed without restoring the checkpoint's RNG state, with another."""
    harness(tmp_path / "straight")
    reference = sha256_file(tmp_path / "straight" / "weights-rank0.safetensors")

    killed = harness(tmp_path / "killed", "--step-seconds", "0.4", wait=False)
    marker = tmp_path / "killed" / "work" / "step-0000002" / "COMPLETE"
    deadline = time.time() + 120
    while not marker.is_file():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1][-2000:]
        time.sleep(0.01)
    killed.kill()
    killed.wait(timeout=60)
    assert not (tmp_path / "killed" / "weights-rank0.safetensors").exists()  # it did not finish
    shutil.copytree(tmp_path / "killed", tmp_path / "ablation")

    harness(tmp_path / "killed", "--resume")
    assert sha256_file(tmp_path / "killed" / "weights-rank0.safetensors") == reference
    harness(tmp_path / "ablation", "--resume", "--no-rng-restore")
    assert sha256_file(tmp_path / "ablation" / "weights-rank0.safetensors") != reference
    for run in ("killed", "ablation"):
        assert json.loads((tmp_path / run / "result-rank0.json").read_text())["resumed_from"] >= 2
