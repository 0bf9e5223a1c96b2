import csv
import json
import re
import shutil

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sd_distill import report
from sd_distill.data.shards import read_split
from sd_distill.errors import UserError
from sd_distill.models.classifier import DigitClassifier, FeatureExtractor, predict, to_tensor
from sd_distill.params import EvaluateParams, resolve
from sd_distill.runner import run_stage
from sd_distill.scoring import DigitSuite, pairwise_rms
from sd_distill.scoring import feature_fid as fid
from sd_distill.stages.evaluate import grid
from sd_distill.stages.reference import Reference
from tests.conftest import write_params


@pytest.fixture(scope="module")
def evaluated(smoke_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    shutil.copytree(smoke_project / "data", root / "data")
    shutil.copytree(smoke_project / "models", root / "models")
    run_stage("evaluate", resolve(write_params(root)), root)
    return root


def test_metrics_file_holds_accuracy_per_digit_and_fid(evaluated):
    metrics = json.loads((evaluated / "reports" / "metrics.json").read_text())
    teacher = metrics["teacher"]
    assert teacher["samples"] == 20 and teacher["unet_calls_per_image"] == 8
    models = metrics["models"]
    assert set(models) == {"teacher@4", "teacher-dpmpp@2", "teacher-dpmpp@1", "teacher-ddim@2", "teacher-ddim@1",
                           "guided@4", "pruned@4", *[f"steps-{n}@{n}" for n in (32, 16, 8, 4, 2, 1)],
                           "dmd@1", "student@1", "student-vae@1"}
    assert models["steps-2@2"]["unet_calls_per_image"] == 2 and models["teacher-dpmpp@2"]["unet_calls_per_image"] == 4
    # the compact models are smaller; the student differs from its full-VAE twin only in the decoder
    assert models["pruned@4"]["unet_parameters"] < models["guided@4"]["unet_parameters"]
    assert models["steps-1@1"]["unet_parameters"] == models["pruned@4"]["unet_parameters"]
    assert models["dmd@1"]["unet_parameters"] == models["steps-1@1"]["unet_parameters"]  # same config, refined
    assert models["dmd@1"]["unet_calls_per_image"] == 1 and models["dmd@1"]["fid"] != models["steps-1@1"]["fid"]
    assert models["student@1"]["decoder"] == "AutoencoderTiny" and models["student-vae@1"]["decoder"] == "AutoencoderKL"
    assert models["student@1"]["unet_parameters"] == models["student-vae@1"]["unet_parameters"]
    assert models["pruned@4"]["unet_macs_per_call"] < models["guided@4"]["unet_macs_per_call"]
    assert models["student@1"]["decoder_macs"] < models["student-vae@1"]["decoder_macs"]
    assert models["teacher@4"]["unet_macs_per_image"] == 8 * models["teacher@4"]["unet_macs_per_call"]
    assert models["student-vae@1"]["decoder_parameters"] == models["teacher@4"]["decoder_parameters"]
    # same UNet, scheduler and VAE as the source assemble chose (dmd or steps-1): the same images, the same scores
    source = metrics["product"]["source"]
    assert source in ("dmd", "steps-1") and set(metrics["product"]["selection"]["fid"]) == {"dmd", "steps-1"}
    assert models["student-vae@1"]["fid"] == pytest.approx(models[f"{source}@1"]["fid"], rel=1e-4)
    assert models["student-vae@1"]["accuracy"] == models[f"{source}@1"]["accuracy"]
    assert models["teacher@4"]["fid_ratio"] == pytest.approx(1.0)
    rows = (evaluated / "reports" / "quality_vs_steps.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["steps", "student_fid", "student_accuracy", "student_diversity", "dpmpp_fid"]
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert 0 <= teacher["accuracy"] <= 1 and len(teacher["accuracy_per_digit"]) == 10
    assert np.mean(list(teacher["accuracy_per_digit"].values())) == pytest.approx(teacher["accuracy"])
    assert np.isfinite(teacher["fid"]) and teacher["fid"] > 0
    assert 0.5 < metrics["classifier"]["test_accuracy"] <= 1
    # diversity per model, read against the teacher's and the real test images'
    real = metrics["reference"]["diversity"]
    for m in models.values():
        assert m["diversity"] == pytest.approx(np.mean(list(m["diversity_per_digit"].values())))
        assert m["diversity_vs_real"] == pytest.approx(m["diversity"] / real)
        assert m["diversity_ratio"] == pytest.approx(m["diversity"] / teacher["diversity"])
    assert teacher["diversity"] > 0 and models["dmd@1"]["diversity"] != models["steps-1@1"]["diversity"]
    text = (evaluated / "reports" / "report.md").read_text()
    assert "| diversity |" in text.splitlines()[text.splitlines().index("## All models, same prompts, seeds and "
                                                                         "guidance") + 2]
    assert f"the real test images of each digit score {real:.3f}" in text
    fids = metrics["product"]["selection"]["fid"]
    assert (f"`models/student` holds the `{source}` UNet: `assemble.source: auto` chose it as the one-step model with "
            f"the lower FID on 16 validation captions") in text and f"{fids[source]:.3f}, against" in text
    assert metrics["grid_rows"] == ["teacher@4", "steps-8@8", "steps-4@4", "steps-2@2", "steps-1@1", "dmd@1",
                                   "student@1"]


def test_latency_is_measured_per_model_at_batch_one(evaluated):
    models = json.loads((evaluated / "reports" / "metrics.json").read_text())["models"]
    for m in models.values():
        assert m["latency_ms"] > 0 and m["latency_repeats"] == 2
        assert m["peak_memory_mb"] is None  # CUDA only; this run is on CPU
    # 8 UNet calls (4 steps with CFG) cost more than 1 call, whatever the machine's noise
    assert models["teacher@4"]["latency_ms"] > models["steps-1@1"]["latency_ms"]


def test_grid_has_one_labelled_row_per_model_and_the_same_prompts_in_every_row(evaluated):
    picture = Image.open(evaluated / "reports" / "grid.png")
    tile_rows, tile_cols = 7, 10  # teacher + students at 8, 4, 2, 1 + DMD2 + the assembled student; digits 0-9
    body_w, body_h = (tile_cols * 17 - 1) * 4, (tile_rows * 17 - 1) * 4
    assert picture.height == body_h and picture.width > body_w
    pixels = np.asarray(picture)
    margin = picture.width - body_w
    assert (pixels[:, : margin - 4] < 128).any()  # the row labels are drawn in the margin


def test_pareto_front_by_hand_with_equal_latencies_and_ties():
    table = [{"name": "slow-best", "latency_ms": 100.0, "fid": 1.0},  # the best FID: on the front
             {"name": "fast-bad", "latency_ms": 1.0, "fid": 5.0},  # the fastest: on the front
             {"name": "mid", "latency_ms": 10.0, "fid": 2.0},  # nothing both faster and better
             {"name": "same-latency-worse", "latency_ms": 10.0, "fid": 2.5},  # mid is as fast and better
             {"name": "twin-a", "latency_ms": 50.0, "fid": 1.5},  # equal points do not dominate each other
             {"name": "twin-b", "latency_ms": 50.0, "fid": 1.5},
             {"name": "slow-worse", "latency_ms": 100.0, "fid": 3.0},  # slow-best is as fast and better
             {"name": "unmeasured", "latency_ms": None, "fid": 1.0}]  # no latency: not a point
    fronts = {p["model"]: p["front"] for p in report.pareto(table)}
    assert fronts == {"slow-best": 1, "fast-bad": 1, "mid": 1, "same-latency-worse": 0, "twin-a": 1, "twin-b": 1,
                      "slow-worse": 0}


def test_pareto_front_and_report_cover_every_model(evaluated):
    metrics = json.loads((evaluated / "reports" / "metrics.json").read_text())
    with open(evaluated / "reports" / "pareto.csv") as f:
        points = list(csv.DictReader(f))
    assert {p["model"] for p in points} == set(metrics["models"])
    expected = {p["model"]: p["front"] for p in report.pareto(report.rows(metrics))}
    assert {p["model"]: int(p["front"]) for p in points} == expected  # the CSV is the written front
    assert min(points, key=lambda p: float(p["latency_ms"]))["front"] == "1"
    assert Image.open(evaluated / "reports" / "pareto.png").size[0] > 400
    text = (evaluated / "reports" / "report.md").read_text()
    assert "![grid](grid.png)" in text and "![pareto](pareto.png)" in text
    for name, m in metrics["models"].items():
        assert f"| {name} | {m['unet_calls_per_image']} | {m['fid']:.3f} |" in text


def test_fid_is_zero_for_identical_sets_and_grows_with_distortion(smoke_project):
    data = smoke_project / "data" / "prepared"
    extractor = FeatureExtractor(DigitClassifier.load(data / "classifier"))
    test, val = read_split(data, "test").images, read_split(data, "val").images
    same = fid(extractor, test, test)
    real = fid(extractor, test, val)
    noisy = fid(extractor, test, np.clip(val + np.random.default_rng(0).normal(0, 60, val.shape), 0, 255).astype(np.uint8))
    assert abs(same) < 1e-3
    assert real < noisy


def test_grid_puts_rows_and_columns_in_order():
    tiles = np.stack([np.full((2, 2, 3), i, np.uint8) for i in range(6)])
    picture = np.asarray(grid(tiles, rows=2, cols=3, scale=1, gap=1))
    assert picture.shape == (5, 8, 3)  # 2x2 tiles, 1-pixel lines between them
    assert picture[0, 3, 0] == 1 and picture[3, 0, 0] == 3 and picture[4, 7, 0] == 5
    assert picture[2, 0, 0] == 160 and picture[0, 2, 0] == 160


def test_a_crashing_stage_ends_failed_in_mlflow_and_publishes_nothing(evaluated, mlflow_store, tmp_path):
    shutil.copytree(evaluated / "data", tmp_path / "data")
    shutil.copytree(evaluated / "models", tmp_path / "models")
    shutil.rmtree(tmp_path / "data" / "prepared" / "classifier")
    with pytest.raises(FileNotFoundError, match="no classifier"):
        run_stage("evaluate", resolve(write_params(tmp_path)), tmp_path)
    assert not (tmp_path / "reports" / "metrics.json").exists()
    client = mlflow.MlflowClient(mlflow_store)
    runs = client.search_runs(client.get_experiment_by_name("sd-distill").experiment_id,
                              "tags.`sd_distill.stage` = 'evaluate'", order_by=["start_time DESC"], max_results=1)
    assert runs[0].info.status == "FAILED"


def test_reference_holds_the_test_splits_feature_sums_and_the_val_fid_once(smoke_project):
    data = smoke_project / "data" / "prepared"
    manifest = json.loads((smoke_project / "data" / "reference" / "manifest.json").read_text())
    digits = manifest["sets"]["digits"]
    extractor = FeatureExtractor(DigitClassifier.load(data / "classifier"))
    test, val = read_split(data, "test").images, read_split(data, "val").images
    assert digits["count"] == len(test) and digits["val_images"] == len(val) and digits["resolution"] == 16
    # streamed in batches of reference.batch_size, the same figure as all images at once (the old per-run formula)
    assert digits["fid_val_vs_test"] == pytest.approx(fid(extractor, test, val), rel=1e-6)
    with torch.no_grad():
        features = extractor(to_tensor(test)).double().numpy()
    with np.load(smoke_project / "data" / "reference" / "stats.npz", allow_pickle=False) as stats:
        assert int(stats["digits_count"]) == len(test)
        np.testing.assert_allclose(stats["digits_sum"], features.sum(0), rtol=1e-6)
        np.testing.assert_allclose(stats["digits_outer"], features.T @ features, rtol=1e-6, atol=1e-9)
    labels = read_split(data, "test").labels
    per_digit = [pairwise_rms(torch.from_numpy(features[labels == d])) for d in range(10)]
    np.testing.assert_allclose(digits["diversity_per_digit"], per_digit, rtol=1e-6)
    assert digits["diversity"] == pytest.approx(np.mean(per_digit), rel=1e-6) and digits["diversity"] > 0


def test_streamed_digit_scores_equal_the_all_at_once_formulas(smoke_project):
    data = smoke_project / "data" / "prepared"
    suite = DigitSuite(data, Reference(smoke_project / "data" / "reference"), EvaluateParams(samples_per_prompt=6),
                       seed=0)
    n = len(suite.prompts)
    rng = np.random.default_rng(0)
    val = read_split(data, "val").images
    fake = np.clip(val[rng.integers(0, len(val), n)] + rng.normal(0, 30, (n, *val.shape[1:])), 0, 255).astype(np.uint8)
    scorer = suite.start()
    for start in range(0, n, 7):  # uneven batches, the last one short
        scorer.add(start, fake[start:start + 7])
    streamed = scorer.result()
    right = predict(suite.classifier, to_tensor(fake)).numpy() == suite.labels
    assert streamed["fid"] == pytest.approx(fid(suite.extractor, read_split(data, "test").images, fake), rel=1e-6)
    assert streamed["accuracy"] == right.mean()
    assert streamed["accuracy_per_digit"] == {suite.words[d]: right[suite.labels == d].mean() for d in range(10)}
    with torch.no_grad():
        features = suite.extractor(to_tensor(fake))
    per_digit = {suite.words[d]: pairwise_rms(features[torch.from_numpy(suite.labels == d)]) for d in range(10)}
    assert streamed["diversity_per_digit"] == pytest.approx(per_digit, rel=1e-6)
    assert streamed["diversity"] == pytest.approx(np.mean(list(per_digit.values())), rel=1e-6)
    assert np.array_equal(scorer.grid(), fake[suite.grid_index])


def test_evaluate_refuses_a_reference_made_with_another_classifier_and_writes_nothing(smoke_project, tmp_path):
    shutil.copytree(smoke_project / "data", tmp_path / "data")
    shutil.copytree(smoke_project / "models", tmp_path / "models")
    weights = tmp_path / "data" / "prepared" / "classifier" / "model.safetensors"
    state = load_file(weights)
    state["head.bias"] = state["head.bias"] + 0.01  # a retrained classifier, and `reference` not run again
    save_file(state, weights)
    manifest = re.escape(str(tmp_path / "data" / "reference" / "manifest.json"))
    with pytest.raises(UserError, match=rf"{manifest}: digits extractor_sha256: expected '[0-9a-f]{{64}}' \(from "
                                        r"data/prepared/classifier/model.safetensors\), found '[0-9a-f]{64}'"):
        run_stage("evaluate", resolve(write_params(tmp_path)), tmp_path)
    assert not (tmp_path / "reports" / "metrics.json").exists()
    run_stage("reference", resolve(write_params(tmp_path)), tmp_path)  # made again: accepted
    Reference(tmp_path / "data" / "reference").digits(tmp_path / "data" / "prepared")
