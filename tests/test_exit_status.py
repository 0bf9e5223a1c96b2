"""Every error gets the exit status of ``sd_distill.errors.EXIT_STATUSES`` (issue 22, item 2): bad params, input,
model or state exit 2 with one line naming the key or file, expected and found, and are not retried; a bug inside a
stage, a FileNotFoundError included, exits 1 with a traceback, which orchestrators retry."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sd_distill import errors
from sd_distill.cli import main
from sd_distill.data.shards import MANIFEST
from tests.conftest import ROOT, write_params
from tests.test_bad_input import one_error_line
from tests.test_prepare import make_folder


def error_line(capsys, args: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with one error line, returned."""
    assert main(args) == 2
    return one_error_line(capsys, args[0])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A project whose data/prepared holds 20 colour swatches from a folder (seconds, no classifier)."""
    root = tmp_path_factory.mktemp("prepared")
    raw = root / "raw"
    raw.mkdir()
    make_folder(raw, bad=False)
    write_params(root, prepare={"source": "folder", "path": str(raw), "resolution": 16, "min_size": 8})
    assert main(["run", "prepare", "--params", str(root / "params.yaml")]) == 0
    return root


def copy_project(prepared, tmp_path):
    shutil.copytree(prepared / "data" / "prepared", tmp_path / "data" / "prepared")
    shutil.copy(prepared / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_every_error_class_has_a_row_in_the_exit_status_table():
    statuses = {s.status for s in errors.EXIT_STATUSES}
    for cls in (errors.UserError, errors.MissingInput, errors.TrainingFailed, errors.StageBusy, errors.Preempted):
        assert cls.EXIT_CODE in statuses, cls
    assert errors.NOT_RETRYABLE == (2, 3)
    assert issubclass(errors.MissingInput, FileNotFoundError) and errors.MissingInput.EXIT_CODE == 2


# -- bad params, found when the stage or command uses them ----------------------------------------------------

def test_cuda_asked_for_without_cuda_exits_2_naming_base_device(prepared, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root = copy_project(prepared, tmp_path)
    line = error_line(capsys, ["run", "teacher", "--params", str(root / "params.yaml"), "--set", "base.device=cuda"])
    assert "base.device: cuda, but no CUDA device is visible" in line and "base.device=cpu or auto" in line
    assert not (root / "models" / "teacher").exists()


@pytest.mark.parametrize("key", ["encoder_blocks", "decoder_blocks"])
def test_a_decoder_block_count_per_stage_that_does_not_match_the_vae_exits_2_naming_the_key(capsys, tmp_path, key):
    # smoke: a VAE of two stages (block_out_channels [8, 16]), so two block counts
    line = error_line(capsys, ["plan", "--profile", "smoke", "--params", str(tmp_path / "absent.yaml"),
                               "--set", f"decoder.arch.{key}=[1, 3, 3]"])
    assert f"decoder.arch.{key}: expected 2 entries (one per stage of the VAE" in line and "found [1, 3, 3]" in line


def test_a_bk_variant_the_unet_cannot_take_exits_2_naming_prune_variant(capsys, tmp_path):
    line = error_line(capsys, ["plan", "--profile", "smoke", "--params", str(tmp_path / "absent.yaml"),
                               "--set", "teacher.unet.layers_per_block=1", "--set", "prune.variant=base"])
    assert "prune.variant=base: BK-SDM base: every stage needs 2+ layers to drop one, found layers_per_block=[1" in line


def test_the_digits_suite_with_one_sample_per_prompt_exits_2_before_any_work(capsys, tmp_path):
    write_params(tmp_path)
    line = error_line(capsys, ["run", "evaluate", "--params", str(tmp_path / "params.yaml"),
                               "--set", "evaluate.samples_per_prompt=1"])
    assert "evaluate" in line and "samples_per_prompt is 1; the digits suite needs at least 2" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_critic_on_a_feature_smaller_than_one_latent_is_refused_naming_the_config():
    from sd_distill.models.critic import deepest_geometry

    with pytest.raises(errors.UserError, match=r"sample_size 8 halved by 4 of the UNet's 5 down blocks .* leaves a "
                                               r"deepest feature 0.5 latents wide, expected at least 1") as exc:
        deepest_geometry({"block_out_channels": [8, 16, 16, 16, 16], "sample_size": 8})
    assert exc.value.EXIT_CODE == 2


# -- missing or damaged input ---------------------------------------------------------------------------------

def test_a_missing_input_exits_2_naming_the_file_and_the_stage_that_writes_it(capsys, tmp_path):
    write_params(tmp_path)
    line = error_line(capsys, ["run", "encode", "--params", str(tmp_path / "params.yaml")])
    assert f"stage encode: input data ({tmp_path / 'data' / 'prepared'}) does not exist; run prepare first" in line


def test_a_changed_shard_exits_2_naming_it(prepared, tmp_path, capsys):
    root = copy_project(prepared, tmp_path)
    data = root / "data" / "prepared"
    shard = data / json.loads((data / MANIFEST).read_text())["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-512])
    line = error_line(capsys, ["run", "teacher", "--params", str(root / "params.yaml")])
    assert f"{shard}: sha256 differs from {data / MANIFEST}" in line
    shard.unlink()
    line = error_line(capsys, ["run", "teacher", "--params", str(root / "params.yaml")])
    assert f"{shard}: listed in {data / MANIFEST} but missing" in line


def test_a_broken_manifest_exits_2_naming_it(prepared, tmp_path, capsys):
    root = copy_project(prepared, tmp_path)
    (root / "data" / "prepared" / MANIFEST).write_text('{"shards": [')
    line = error_line(capsys, ["run", "teacher", "--params", str(root / "params.yaml")])
    assert f"{root / 'data' / 'prepared' / MANIFEST}:1:" in line and "not valid JSON" in line


# -- the wrong kind of model, given to a stage's core ---------------------------------------------------------

def fake_pipe(prediction_type: str, guidance_dim: int | None):
    """What the cores read before anything else: the scheduler's prediction type and the UNet's guidance input."""
    return SimpleNamespace(name_or_path="teacher", scheduler=SimpleNamespace(config=SimpleNamespace(
        prediction_type=prediction_type, num_train_timesteps=1000)),
        unet=SimpleNamespace(config=SimpleNamespace(time_cond_proj_dim=guidance_dim)))


@pytest.mark.parametrize("core, pipe, expected", [
    ("guidance", fake_pipe("epsilon", None), "guidance: the input model (teacher) must predict v: its scheduler's "
                                             "prediction_type is 'epsilon', expected 'v_prediction'"),
    ("guidance", fake_pipe("v_prediction", 16), "guidance: the input model (teacher) already has a guidance input: "
                                                "its UNet's time_cond_proj_dim is 16, expected null"),
    ("prune", fake_pipe("v_prediction", None), "prune: the input model (teacher) must be the guided model "
                                               "(w-conditioned, predicting v): its scheduler's prediction_type is "
                                               "'v_prediction' and its UNet's time_cond_proj_dim is None"),
    ("halve", fake_pipe("epsilon", 16), "halve: the teacher, the input model (teacher), must predict v: its "
                                        "scheduler's prediction_type is 'epsilon'"),
])
def test_a_stage_core_given_the_wrong_kind_of_model_names_it_expected_and_found(core, pipe, expected, tmp_path):
    from sd_distill.models.parts import ModelError
    from sd_distill.params import resolve
    from sd_distill.stages import guidance, halve, prune

    params = resolve(write_params(tmp_path))
    with pytest.raises(ModelError) as exc:
        if core == "guidance":
            guidance.distill_guidance(pipe, None, params.guidance, params.base, tmp_path)
        elif core == "prune":
            prune.distill_compact(pipe, None, params.prune, params.base, tmp_path)
        else:
            halve.distill_round(pipe, None, 4, 8, params.halve, params.base, tmp_path)
    assert expected in str(exc.value) and exc.value.EXIT_CODE == 2


# -- a bug is not bad input -----------------------------------------------------------------------------------

STAGE_BUG = """
import sys
from sd_distill.stages import prepare

def entry(ctx):
    if sys.argv[1] == "raises":
        raise FileNotFoundError("checkpoints/prepare/scratch.npy")  # a stage's own file, gone: a bug

prepare.main = entry
from sd_distill.cli import main
sys.exit(main(["run", "prepare", "--params", sys.argv[2]]))
"""


@pytest.mark.parametrize("bug, expected", [
    ("raises", "FileNotFoundError: checkpoints/prepare/scratch.npy"),
    ("writes nothing", "RuntimeError: stage prepare returned without writing its declared output data: "),
])
def test_a_bug_inside_a_stage_exits_1_with_a_traceback_not_2(tmp_path, bug, expected):
    write_params(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", STAGE_BUG, bug, str(tmp_path / "params.yaml")], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback (most recent call last)" in out.stderr and expected in out.stderr
    assert not (tmp_path / "data" / "prepared").exists()
