"""End to end: the sd15 rehearsal (the sd15 preset on SD v1.5's structure at reduced width, 64 px, two steps per
stage, stand-in scorers) through real `dvc repro` in a temporary git repo, tracked in real MLflow."""

import json
import shutil

import mlflow
import numpy as np
import pytest
import yaml
from diffusers import StableDiffusionPipeline

from sd_distill import registry
from tests.conftest import BIN, sh

pytestmark = pytest.mark.slow
STAGES = [s.name for s in registry.STAGES]


@pytest.fixture(scope="module")
def repo(rehearsal_run):
    """The sd15 rehearsal through `sd-distill repro` in a temporary git repo (tests/conftest.py)."""
    return rehearsal_run


def test_repro_makes_every_output(repo):
    root = repo["root"]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repo["first"].stdout
    pipe = StableDiffusionPipeline.from_pretrained(root / "models" / "teacher", local_files_only=True)
    assert list(pipe.unet.config.block_out_channels) == [32, 64, 128, 128]  # SD v1.5's four stages
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.latent_channels == 4 and len(pipe.vae.config.block_out_channels) == 4  # 8x
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics["profile"] == "sd15" and metrics["prompt_sets"] == {"coco": 4, "parti": 4, "hpsv2": 4}
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
    registration = repo["registration"]  # after the first repro (conftest's rehearsal_job reruns it later)
    assert registration["version"] == 1 and registration["created"] and "candidate" in registration["aliases"]


def test_the_rehearsal_scores_every_model_with_the_sd15_suite(repo):
    """The reference statistics come from the COCO images through the stand-in Inception; every model gets FID and
    IS on COCO and CLIP score on every prompt set, ratios against the teacher, and the text-image report columns."""
    root, metrics = repo["root"], repo["metrics"]
    manifest = json.loads((root / "data" / "reference" / "manifest.json").read_text())
    assert set(manifest["sets"]) == {"coco"}
    coco = manifest["sets"]["coco"]
    assert coco["count"] == 4 and coco["resolution"] == 64 and coco["features"] == 16  # the teacher's side
    assert "inception.pt" in metrics["fid_features"]
    teacher, student = metrics["models"]["teacher@4"], metrics["models"]["student@1"]
    for row in (teacher, student):
        assert row["samples"] == 12 and set(row["sets"]) == {"coco", "parti", "hpsv2"}
        assert np.isfinite(row["fid"]) and row["fid"] >= 0 and row["fid"] == row["sets"]["coco"]["fid"]
        assert 1.0 <= row["inception_score"] <= 12  # between one class and the stand-in's 12
        assert row["clip_score"] == pytest.approx(np.mean([s["clip_score"] for s in row["sets"].values()]))
        assert "accuracy" not in row
    assert teacher["fid_ratio"] == pytest.approx(1.0) and teacher["clip_score_ratio"] == pytest.approx(1.0)
    assert student["clip_score_ratio"] == pytest.approx(student["clip_score"] / teacher["clip_score"])
    header = (root / "reports" / "quality_vs_steps.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["steps", "student_fid", "student_clip_score", "student_inception_score"]
    header = next(line for line in (root / "reports" / "report.md").read_text().splitlines()
                  if line.startswith("| model |"))
    assert "| CLIP |" in header and "| IS |" in header and "accuracy" not in header


def test_every_training_stage_ran_the_sd15_recipe_with_gradient_checkpointing(repo):
    """The rehearsal changes sizes only: each training stage's recorded train section is the sd15 preset's but for
    the step count, the micro-batch and the logging/checkpoint intervals."""
    from sd_distill.bench.rehearsal import REHEARSAL_BATCH, REHEARSAL_STEPS
    from sd_distill.bench.timing import NO_PARAMS_FILE
    from sd_distill.params import resolve

    sd15 = resolve(NO_PARAMS_FILE, profile="sd15")
    sized = {"steps", "batch_size", "warmup_steps", "checkpoint_every", "log_every"}
    root = repo["root"]
    for section, folder in (("vpred", "vpred"), ("guidance", "guided"), ("prune", "pruned"), ("halve", "steps-4"),
                            ("dmd", "dmd"), ("decoder", "decoder")):
        record = json.loads((root / "models" / folder / "params.resolved.json").read_text())
        assert record["profile"] == "sd15", folder
        train = record[section]["train"]
        preset = getattr(sd15, section).train.model_dump(mode="json")
        assert {k: v for k, v in train.items() if k not in sized} == {k: v for k, v in preset.items()
                                                                     if k not in sized}, folder
        assert train["steps"] == REHEARSAL_STEPS and train["batch_size"] == REHEARSAL_BATCH
        assert train["gradient_checkpointing"] is (section != "decoder"), folder  # the decoder refuses it
        assert train["grad_accum"] == (4 if section != "decoder" else 1)  # 64 x 4 = BK-SDM's 256 on the UNets


def test_mlflow_has_one_parent_with_a_finished_child_per_stage(repo):
    client = mlflow.MlflowClient(repo["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("sd-distill")
    parents = client.search_runs(exp.experiment_id, "tags.`sd_distill.pipeline` = '1'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    evaluate = next(r for r in children if r.info.run_name == "evaluate")
    assert {"teacher_fid", "teacher_clip_score", "teacher_inception_score"} <= set(evaluate.data.metrics)
    teacher = next(r for r in children if r.info.run_name == "teacher")
    artifacts = {a.path for a in client.list_artifacts(teacher.info.run_id)}
    assert "params.json" in artifacts and "model" not in artifacts  # sd15: base.log_model_artifacts false (GBs)


def test_second_repro_does_nothing(repo):
    assert "Running stage" not in repo["again"].stdout
    assert "up to date" in repo["again"].stdout
    assert repo["lock_after_again"] == repo["lock_before_again"]


def test_a_param_change_reruns_only_downstream_stages(repo):
    """``evaluate.latency_repeats`` changed to 2 after the first two runs (``rehearsal_job`` in conftest)."""
    out = repo["changed"]
    assert "Running stage 'evaluate'" in out.stdout and "Running stage 'register'" in out.stdout
    assert out.stdout.count("Running stage") == 2  # evaluate, and register which reads its metrics
    assert repo["metrics"]["teacher"]["latency_repeats"] != 2
    assert repo["changed_metrics"]["teacher"]["latency_repeats"] == 2


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
