"""BK-SDM pruning (weight copy, feature-KD hooks, the stage) and the assembled student."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline

from sd_distill import diffusion
from sd_distill.errors import UserError
from sd_distill.models import bk
from sd_distill.params import resolve
from sd_distill.runner import run_stage
from sd_distill.stages.prune import FeatureTap, compact_unet
from tests.conftest import write_params


@pytest.fixture(scope="module")
def guided(smoke_project):
    return StableDiffusionPipeline.from_pretrained(smoke_project / "models" / "guided").unet


@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_compact_unet_starts_as_the_parents_kept_blocks(guided, variant):
    student, report = compact_unet(guided, variant)
    parent = guided.state_dict()
    mapping = bk.block_map(dict(guided.config), variant)
    assert report["fresh"] == []  # smoke's two innermost stages have equal widths, like SD v1.5's
    assert sum(t.numel() for t in student.parameters()) < sum(t.numel() for t in guided.parameters())
    for key, tensor in student.state_dict().items():
        prefix = max((p for p in mapping if key.startswith(p + ".")), key=len)
        assert torch.equal(tensor, parent[mapping[prefix] + key[len(prefix):]]), key
    assert student.config.time_cond_proj_dim == guided.config.time_cond_proj_dim  # still takes w
    assert (student.mid_block is None) == (variant != "base")
    assert len(student.down_blocks) == len(guided.down_blocks) - (variant == "tiny")
    # the up stages dropped their second pair: the kept third one reads the same skip width as before
    assert len(student.up_blocks[-1].resnets) == len(guided.up_blocks[-1].resnets) - 1


def test_block_map_of_sd15_matches_bk_sdm_layout():
    config = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2,
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    tiny = bk.block_map(config, "tiny")
    assert tiny["up_blocks.0.resnets.1"] == "up_blocks.1.resnets.2"  # the innermost up stage is gone
    assert "down_blocks.3.resnets.0" not in tiny and "mid_block" not in tiny
    assert "down_blocks.2.downsamplers" not in tiny  # the new last down stage does not downsample
    assert bk.block_map(config, "base")["mid_block"] == "mid_block"
    with pytest.raises(ValueError, match="unknown BK-SDM variant 'huge'"):
        bk.block_map(config, "huge")


@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_feature_kd_taps_every_kept_stage_with_matching_shapes(guided, variant):
    student, _ = compact_unet(guided, variant)
    pairs = bk.feature_pairs(student, guided, variant)
    expected = len(student.down_blocks) + len(student.up_blocks) + (student.mid_block is not None)
    assert len(pairs) == expected and len({mine for mine, *_ in pairs}) == expected
    mine = FeatureTap({name: module for name, module, _, _ in pairs})
    theirs = FeatureTap({name: module for _, _, name, module in pairs})
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond = torch.randn(2, 16, guided.config.cross_attention_dim)
    w = torch.tensor([0.0, 3.0])
    with torch.no_grad():
        for unet in (student, guided):
            diffusion.unet_denoiser(unet, None, "v_prediction")(z, t, cond, w)
    for name, _, twin, _ in pairs:
        assert mine.features[name].shape == theirs.features[twin].shape, (name, twin)
    mine.close()
    theirs.close()


def test_prune_stage_output_is_a_stock_w_conditioned_pipeline(smoke_project, mlflow_store):
    folder = smoke_project / "models" / "pruned"
    card = json.loads((folder / "prune.json").read_text())
    assert card["variant"] == "small" and card["unet_parameters"] < card["parent_parameters"]
    assert card["kd_stages"] == 6 and card["fresh_tensors"] == 0
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.unet.mid_block is None and pipe.unet.config.time_cond_proj_dim is not None
    images = pipe("a handwritten digit four", num_inference_steps=2, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    import mlflow

    runs = mlflow.search_runs(experiment_names=["sd-distill"], filter_string="attributes.run_name = 'prune'",
                              output_format="list")
    trained = [r for r in runs if "prune/feat_kd" in r.data.metrics]
    assert trained, "no prune run logged its feature-KD loss"
    assert len(mlflow.MlflowClient().get_metric_history(trained[0].info.run_id, "prune/feat_kd")) >= 2
    assert {"prune/task", "prune/out_kd"} <= set(trained[0].data.metrics)  # all three BK-SDM losses, per step


def test_prune_none_copies_the_guided_model(smoke_project, tmp_path):
    for name in ("data", "models/guided"):
        shutil.copytree(smoke_project / name, tmp_path / name)
    run_stage("prune", resolve(write_params(tmp_path, prune={"variant": "none"})), tmp_path)
    a = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "pruned").unet.state_dict()
    b = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "guided").unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prune_refuses_a_variant_the_parent_cannot_lose(smoke_project, tmp_path):
    for name in ("data", "models/guided"):
        shutil.copytree(smoke_project / name, tmp_path / name)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "guided")
    small = compact_unet(pipe.unet, "small")[0]
    pipe.unet = small  # a parent with one layer per stage has no pair left to drop
    pipe.save_pretrained(tmp_path / "models" / "guided")
    with pytest.raises(UserError, match="prune.variant=base: .*layers_per_block"):
        run_stage("prune", resolve(write_params(tmp_path, prune={"variant": "base"})), tmp_path)
    assert not (tmp_path / "models" / "pruned").exists()


def test_assembled_student_loads_with_stock_diffusers_and_uses_the_tiny_decoder(smoke_project):
    folder = smoke_project / "models" / "student"
    card = json.loads((folder / "distill.json").read_text())
    assert card["num_inference_steps"] == 1 and card["decoder_class"] == "AutoencoderTiny"
    # assemble.source auto: the one-step model with the lower validation FID, both figures in the card
    fids = card["selection"]["fid"]
    assert set(fids) == {"dmd", "steps-1"} and card["source"] == min(fids, key=fids.get)
    assert card["selection"]["images"] == 16 and card["selection"]["split"] == "val"
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe.vae, AutoencoderTiny)
    chosen = StableDiffusionPipeline.from_pretrained(smoke_project / "models" / card["source"]).unet.state_dict()
    assert all(torch.equal(chosen[k], v) for k, v in pipe.unet.state_dict().items())
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    images = pipe(["a handwritten digit three"] * 2, num_inference_steps=1, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert calls == [2] and images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def assemble_inputs(smoke_project, root):
    for name in ("data/prepared", "models/teacher", "models/decoder", "models/dmd",
                 *[f"models/steps-{n}" for n in (32, 16, 8, 4, 2, 1)]):
        shutil.copytree(smoke_project / name, root / name)


def test_assemble_refuses_a_guidance_outside_the_trained_range(smoke_project, tmp_path):
    assemble_inputs(smoke_project, tmp_path)
    with pytest.raises(UserError, match=r"assemble.guidance=12.0 is outside .*\[1.0, 9.0\]"):
        run_stage("assemble", resolve(write_params(tmp_path, assemble={"guidance": 12.0, "source": "steps-1"})),
                  tmp_path)
    run_stage("assemble", resolve(write_params(tmp_path, assemble={"source": "steps-4", "decoder": "full"})), tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "student")
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    card = json.loads((tmp_path / "models" / "student" / "distill.json").read_text())
    assert card["num_inference_steps"] == 4 and card["source"] == "steps-4"
    assert card["selection"] == {"by": "assemble.source"}  # named: nothing measured


def test_assemble_auto_picks_the_model_with_the_lower_validation_fid(smoke_project, tmp_path):
    from sd_distill.stages.assemble import choose

    assemble_inputs(smoke_project, tmp_path)
    p = resolve(write_params(tmp_path)).assemble
    inputs = {name: tmp_path / path for name, path in
              (("data", "data/prepared"), ("teacher", "models/teacher"), ("dmd", "models/dmd"),
               ("steps-1", "models/steps-1"))}
    first, selection = choose(p, inputs, seed=0, device="cpu")
    again, repeat = choose(p, inputs, seed=0, device="cpu")
    assert (again, repeat) == (first, selection)  # fixed seeds: the same figures
    assert first == min(selection["fid"], key=selection["fid"].get) and selection["images"] == 16
    # the same UNet in both folders: the same images, an exact tie, broken in dmd's favour
    shutil.rmtree(tmp_path / "models" / "dmd" / "unet")
    shutil.copytree(tmp_path / "models" / "steps-1" / "unet", tmp_path / "models" / "dmd" / "unet")
    tied, equal = choose(p, inputs, seed=0, device="cpu")
    assert equal["fid"]["dmd"] == equal["fid"]["steps-1"] == selection["fid"]["steps-1"] and tied == "dmd"
    # change one model (its output layer scaled): only its figure moves, and the lower one wins
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "dmd")
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(3.0)
    pipe.save_pretrained(tmp_path / "models" / "dmd")
    chosen, after = choose(p, inputs, seed=0, device="cpu")
    assert after["fid"]["steps-1"] == selection["fid"]["steps-1"] and after["fid"]["dmd"] != equal["fid"]["dmd"]
    assert chosen == min(after["fid"], key=after["fid"].get)


def test_assemble_source_names_what_it_accepts():
    from sd_distill.params import AssembleParams

    with pytest.raises(ValueError, match=r"source must be auto, dmd or one of \['steps-32', .*'steps-1'\], "
                                         r"found 'steps-3'"):
        AssembleParams(source="steps-3")
