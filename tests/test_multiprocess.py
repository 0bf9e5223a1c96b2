"""Data-parallel training: two CPU processes under torchrun (gloo), against one process with the same global batch."""

import json
import shutil

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from sd_distill.params import TrainParams
from sd_distill.training.loop import train
from tests.conftest import BIN, ROOT, sh

pytestmark = pytest.mark.slow
HARNESS = ROOT / "tests" / "ddp_train.py"


def launch(out, procs: int, *extra, check=True, env=None):
    env = {**(env or __import__("os").environ), "PYTHONPATH": str(ROOT)}
    if procs == 1:
        return sh([BIN / "python", HARNESS, out, *extra], ROOT, env, check=check)
    return sh([BIN / "torchrun", "--standalone", "--nproc_per_node", str(procs), HARNESS, out, *extra], ROOT, env,
              check=check)


def weights(out, rank=0):
    return load_file(out / f"weights-rank{rank}.safetensors")  # tensors only: loading runs no code


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    launch(out, 1)
    return out


def test_two_processes_end_identical_and_equal_to_one_process(single, tmp_path):
    launch(tmp_path, 2)
    rank0, rank1 = weights(tmp_path, 0), weights(tmp_path, 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients were synchronized
    assert max_diff(rank0, weights(single)) < 1e-5  # same global batch, same data, same noise
    losses = json.loads((tmp_path / "result-rank0.json").read_text())["losses"]
    alone = json.loads((single / "result-rank0.json").read_text())["losses"]
    assert losses == pytest.approx(alone, rel=1e-5)  # the logged loss is the global batch's
    assert json.loads((tmp_path / "result-rank1.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_run_stopped_under_one_process_count_resumes_under_another(single, tmp_path, first, then):
    stopped = launch(tmp_path, first, "--stop-after", "3", check=False)
    assert stopped.returncode != 0 and "stopped after step 3" in stopped.stdout + stopped.stderr
    assert sorted(p.name for p in (tmp_path / "work").glob("step-*")) == ["step-0000002"]
    launch(tmp_path, then, "--resume")
    assert json.loads((tmp_path / "result-rank0.json").read_text())["resumed_from"] == 2
    assert max_diff(weights(tmp_path), weights(single)) < 1e-5


def test_grad_accum_that_processes_cannot_share_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    p = TrainParams(steps=1, batch_size=2, grad_accum=4)
    with pytest.raises(Exception, match="grad_accum is 4, which 3 processes cannot share"):
        train(torch.nn.Linear(2, 2), lambda m, b, g: (m(b).sum(), {}), lambda s, m, g: torch.ones(2, 2), p,
              tmp_path, seed=0)


def test_a_stage_under_torchrun_publishes_once_and_matches_one_process(smoke_project, tmp_path):
    """`torchrun -m sd_distill run guidance`: rank 0 tracks and publishes, rank 1 only trains."""
    runs = {}
    for procs in (1, 2):
        root = tmp_path / f"p{procs}"
        shutil.copytree(smoke_project, root)
        uri = f"sqlite:///{tmp_path / f'mlflow{procs}.db'}"
        env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
        cli = ["-m", "sd_distill", "run", "guidance", "--params", root / "params.yaml",
               "--set", "guidance.train.grad_accum=2", "--set", "guidance.train.batch_size=8"]
        if procs == 1:
            sh([BIN / "python", *cli], root, env)
        else:
            sh([BIN / "torchrun", "--standalone", "--nproc_per_node", "2", *cli], root, env)
        runs[procs] = (root, uri)
    one = load_file(runs[1][0] / "models" / "guided" / "unet" / "diffusion_pytorch_model.safetensors")
    two = load_file(runs[2][0] / "models" / "guided" / "unet" / "diffusion_pytorch_model.safetensors")
    # Adam divides by sqrt(v): summation-order rounding in near-zero gradients can move a weight by up to
    # about one learning rate (1e-3 here, 4 steps); on average the two runs agree to float precision
    assert max_diff(one, two) < 1e-3
    mean = sum(float((one[k] - two[k]).abs().sum()) for k in one) / sum(v.numel() for v in one.values())
    assert mean < 1e-6, mean
    root, uri = runs[2]
    assert not list((root / "checkpoints").glob(".guidance.rank*"))  # the follower's scratch is gone
    assert not list((root / "models").glob(".*partial*"))
    client = mlflow.MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("sd-distill").experiment_id])
    assert [r.info.run_name for r in found] == ["guidance"] and found[0].info.status == "FINISHED"
