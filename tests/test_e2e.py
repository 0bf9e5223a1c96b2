"""End to end: the smoke profile through real `dvc repro` in a temporary git repo, tracked in real MLflow."""

import json
import shutil

import mlflow
import pytest
import yaml
from diffusers import StableDiffusionPipeline

from sd_distill import registry
from tests.conftest import BIN, sh

pytestmark = pytest.mark.slow
STAGES = [s.name for s in registry.STAGES]


@pytest.fixture(scope="module")
def repo(dvc_run):
    """The smoke profile through `sd-distill repro` in a temporary git repo (tests/conftest.py)."""
    return dvc_run


def test_repro_makes_every_output(repo):
    root = repo["root"]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repo["first"].stdout
    pipe = StableDiffusionPipeline.from_pretrained(root / "models" / "teacher", local_files_only=True)
    assert list(pipe.unet.config.block_out_channels) == [8, 16, 16]
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert 0 <= metrics["teacher"]["accuracy"] <= 1
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    for n in (32, 16, 8, 4, 2, 1):
        assert (root / "models" / f"steps-{n}" / "model_index.json").is_file()
    assert (root / "reports" / "quality_vs_steps.csv").read_text().startswith("steps,student_fid")
    shown = sh([str(BIN / "dvc"), "metrics", "show", "--json"], root, repo["env"])
    assert "teacher" in shown.stdout
    for name in ("report.md", "grid.png", "pareto.png", "pareto.csv"):
        assert (root / "reports" / name).stat().st_size > 0
    sh([str(BIN / "dvc"), "plots", "show", "-o", str(repo["base"] / "plots")], root, repo["env"])
    html = (repo["base"] / "plots" / "index.html").read_text()
    for path in ("reports/quality_vs_steps.csv", "reports/pareto.csv", "reports/grid.png", "reports/pareto.png"):
        assert path in html
    registration = json.loads((root / "reports" / "registration.json").read_text())
    assert registration["version"] == 1 and registration["created"] and "candidate" in registration["aliases"]


def test_mlflow_has_one_parent_with_a_finished_child_per_stage(repo):
    client = mlflow.MlflowClient(repo["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("sd-distill")
    parents = client.search_runs(exp.experiment_id, "tags.`sd_distill.pipeline` = '1'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    evaluate = next(r for r in children if r.info.run_name == "evaluate")
    assert "teacher_accuracy" in evaluate.data.metrics
    teacher = next(r for r in children if r.info.run_name == "teacher")
    artifacts = {a.path for a in client.list_artifacts(teacher.info.run_id)}
    assert {"model", "params.json"} <= artifacts


def test_second_repro_does_nothing(repo):
    before = (repo["root"] / "dvc.lock").read_text()
    again = sh([str(BIN / "dvc"), "repro"], repo["root"], repo["env"])
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout
    assert (repo["root"] / "dvc.lock").read_text() == before


def test_a_param_change_reruns_only_downstream_stages(repo):
    root, env = repo["root"], repo["env"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"] = {"samples_per_prompt": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = sh([str(BIN / "dvc"), "repro"], root, env)
    assert "Running stage 'evaluate'" in out.stdout and "Running stage 'register'" in out.stdout
    assert out.stdout.count("Running stage") == 2  # evaluate, and register which reads its metrics
    assert json.loads((root / "reports" / "metrics.json").read_text())["teacher"]["samples"] == 10


def test_push_and_pull_through_the_default_local_remote(repo):
    root, env = repo["root"], repo["env"]
    remote = (root / ".dvc" / ".." / ".." / "sd-distill-dvc-remote").resolve()
    assert remote.parent == repo["base"]  # outside the repo, next to it
    sh([str(BIN / "dvc"), "push"], root, env)
    assert remote.is_dir() and any(remote.rglob("*"))
    shutil.rmtree(root / "models")
    shutil.rmtree(root / ".dvc" / "cache")
    sh([str(BIN / "dvc"), "pull"], root, env)
    assert (root / "models" / "teacher" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
