"""``bench.one_step``: the dmd stage's training re-run by the bench, and its report."""

import json
import shutil

from sd_distill.bench import one_step


def project_after_run(smoke_project, tmp_path, teacher_fid=2.0):
    """The smoke project's params, data and models (links), with a reports/metrics.json whose teacher row is given."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(smoke_project / "params.yaml", root / "params.yaml")
    for name in ("data", "models"):
        (root / name).symlink_to(smoke_project / name)
    (root / "reports").mkdir()
    teacher = {"fid": teacher_fid, "accuracy": 0.5, "diversity": 1.0, "unet_calls_per_image": 8, "latency_ms": 10.0}
    (root / "reports" / "metrics.json").write_text(json.dumps({"teacher": teacher}))
    return root


def test_the_bench_retrains_dmd_bit_for_bit_and_scores_it_against_the_teacher(smoke_project, tmp_path):
    root = project_after_run(smoke_project, tmp_path)
    out = tmp_path / "out"
    assert one_step.main(["--project", str(root), "--parts", "seeds", "--seeds", "0,1", "--out", str(out),
                          "--work", str(tmp_path / "work")]) == 0
    result = json.loads((out / "one_step.json").read_text())
    first, second = result["seeds"]["runs"]
    assert first["same_weights_as_models_dmd"] is True  # the stage's own code and params, seed base.seed
    assert "same_weights_as_models_dmd" not in second and first["fid"] != second["fid"]
    assert first["fid_ratio"] == first["fid"] / 2.0 and first["unet_calls_per_image"] == 1
    summary = result["seeds"]["summary"]["fid"]
    assert summary["n"] == 2 and abs(summary["mean"] - (first["fid"] + second["fid"]) / 2) < 1e-12
    table = (out / "one_step.md").read_text()
    assert "| 0 |" in table and "| mean ± sd |" in table and "Teacher at 4 CFG steps" in table


def test_the_bench_needs_a_finished_run(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("profile: smoke\n")
    assert one_step.main(["--project", str(tmp_path), "--parts", "seeds"]) == 2
    assert "reports/metrics.json: not found; run `make run`" in capsys.readouterr().err


def test_render_lists_every_part():
    row = {"fid": 1.0, "fid_ratio": 1.1, "accuracy": 0.9, "diversity": 2.0, "diversity_ratio": 0.95,
           "unet_calls_per_image": 2, "unet_parameters": 2_180_000, "latency_ms": 12.34}
    result = {"machine": "2 cores", "commit": "abc", "date": "2026-12-03", "teacher_steps": 64,
              "teacher": {"fid": 0.9, "accuracy": 0.99, "diversity": 2.1, "unet_calls_per_image": 128,
                          "latency_ms": 1400.0},
              "seeds": {"runs": [{"seed": 0, "train_seconds": 100.0, **row}],
                        "summary": {"fid": {"mean": 1.0, "sd": 0.01, "n": 1}}},
              "ablations": [{"variant": "objective=dm", "per_step_seconds": 0.5, "train_steps": 400,
                             "generator_updates": 70, "train_seconds": 200.0, **row}],
              "snapfusion": [{"chain": "SnapFusion", "steps": 1, **row}]}
    text = one_step.render(result)
    assert "FID 0.900, accuracy 0.990, diversity 2.100, 128 UNet calls, 1400.0 ms per image" in text
    assert "| 0 | 100 | 1.000 | 1.100 | 0.900 | 2.000 | 0.950 |" in text
    assert "| mean ± sd | – | 1.000 ± 0.010 | – |" in text
    assert "| objective=dm | 0.50 | 400 | 70 | 200 | 1.000 | 1.100 | 0.900 | 2.000 |" in text
    assert "| SnapFusion | 1 | 2 | 2.18M | 1.000 | 1.100 | 0.900 | 12.3 |" in text


def test_a_variant_of_ones_own_is_parsed_into_dmd_params_and_named_back():
    import pytest

    update = one_step.parse_variant("objective=dm,train.learning_rate=1e-5,update_ratio=2")
    assert update == {"objective": "dm", "update_ratio": 2, "train": {"learning_rate": 1e-5}}
    assert one_step.variant_name(update) == "objective=dm, update_ratio=2, train.learning_rate=1e-05"
    with pytest.raises(ValueError, match="expected key=value"):
        one_step.parse_variant("objective")
