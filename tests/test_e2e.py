"""End to end: the smoke profile through real `dvc repro` in a temporary git repo, tracked in real MLflow."""

import json
import os
import shutil
import subprocess

import mlflow
import pytest
import yaml
from diffusers import StableDiffusionPipeline

from sd_distill import registry
from tests.conftest import BIN, ROOT

pytestmark = pytest.mark.slow
STAGES = [s.name for s in registry.STAGES]


def sh(args, cwd, env, check=True):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    root = base / "project"
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**committed, "profile": "smoke"}))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh(["git", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "init"], root, env)
    first = sh([str(BIN / "sd-distill"), "repro"], root, env)
    return {"root": root, "env": env, "first": first, "base": base}


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
