"""What the runner guarantees around every stage (issue #8): one run at a time per project, no work twice, nothing
half-made at an output path, and a failure a retry cannot fix is not retried."""

import json
import shutil
import uuid

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_distill.cli import main
from sd_distill.params import resolve
from sd_distill.runner import run_stage, stage_lock
from tests.conftest import write_params


@pytest.fixture
def prepared(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    return root, resolve(write_params(root))


def runs_of(stage):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sd-distill")
    return client.search_runs([exp.experiment_id], f"tags.`sd_distill.stage` = '{stage}'") if exp else []


def test_a_finished_stage_started_again_with_the_same_inputs_does_nothing(prepared, caplog):
    root, params = prepared
    first = run_stage("prepare", params, root)
    before = {p: p.stat().st_mtime_ns for p in (root / "data" / "prepared").rglob("*")}
    n_runs = len(runs_of("prepare"))
    with caplog.at_level("INFO"):
        again = run_stage("prepare", params, root)
    assert again == {**first, "up_to_date": 1} and "up to date" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (root / "data" / "prepared").rglob("*")} == before
    assert len(runs_of("prepare")) == n_runs  # no MLflow run either

    assert "up_to_date" not in run_stage("prepare", params, root, force=True)  # --force
    changed = resolve(write_params(root, prepare={"val_fraction": 0.2}))
    assert "up_to_date" not in run_stage("prepare", changed, root)  # other params
    shard = next((root / "data" / "prepared").glob("*.npz"), None) or next((root / "data" / "prepared").iterdir())
    shard.write_bytes(shard.read_bytes() + b"\0")  # an output changed by hand
    assert "up_to_date" not in run_stage("prepare", changed, root)


def test_a_second_start_while_the_stage_runs_is_refused_and_publishes_nothing(prepared, capsys):
    root, _ = prepared
    with stage_lock(root, "prepare"):  # the first run, still going
        rc = main(["run", "prepare", "--params", str(root / "params.yaml")])
    err = capsys.readouterr().err
    assert rc == 75 and "stage prepare is already running in" in err and "pid " in err
    assert len(err.strip().splitlines()) == 1
    assert not (root / "data" / "prepared").exists()
    assert main(["run", "prepare", "--params", str(root / "params.yaml")]) == 0  # lock released


def test_outputs_appear_whole_with_their_params_record_or_not_at_all(prepared, tmp_path):
    root, params = prepared
    run_stage("prepare", params, root)
    record = json.loads((root / "data" / "prepared" / "params.resolved.json").read_text())
    assert record == params.for_stage("prepare")
    assert not [p for p in (root / "data").iterdir() if "partial" in p.name]


@pytest.fixture
def poisoned(smoke_project, tmp_path):
    """The smoke project before prune, with one NaN planted in the guided model's UNet weights."""
    root = tmp_path / "project"
    shutil.copytree(smoke_project, root, ignore=shutil.ignore_patterns("pruned", "prune", "steps-*", "student"))
    weights = root / "models" / "guided" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.dtype == torch.float32 and v.ndim == 4)
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return root


def test_a_nan_loss_exits_3_naming_step_and_terms_publishes_nothing_and_is_not_retried(poisoned, capsys):
    run_id = f"airflow:nan-{uuid.uuid4().hex}"
    args = ["run", "prune", "--params", str(poisoned / "params.yaml"), "--pipeline-run", run_id]
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "loss is nan at step 1 of 4 (micro-batch 0); loss terms: task=0, out_kd=nan, feat_kd=nan" in err
    assert "nothing is published" in err
    assert not (poisoned / "models" / "pruned").exists()
    assert not [p for p in (poisoned / "models").iterdir() if "partial" in p.name]
    (failed,) = runs_in(run_id)
    assert failed.info.status == "FAILED"

    assert main(args) == 3  # the orchestrator's blind retry of the same run: refused at once, same status
    err = capsys.readouterr().err
    assert "not retried" in err and "loss is nan at step 1" in err
    assert len(runs_in(run_id)) == 1  # no second training


def runs_in(pipeline_run):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sd-distill")
    return client.search_runs([exp.experiment_id], f"tags.`sd_distill.pipeline_run` = '{pipeline_run}'")
