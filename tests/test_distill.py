"""Smoke runs of vpred -> guidance -> prune -> halve@32..1 on teachers of each prediction type."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sd_distill import diffusion
from sd_distill.params import HALVING_STEPS, resolve
from sd_distill.runner import run_stage
from tests.conftest import write_params

CHAIN = ["vpred", "guidance", "prune", *[f"halve@{n}" for n in HALVING_STEPS]]
PRUNE = {"epsilon": "small", "sample": "tiny", "v_prediction": "none"}  # every BK variant under halving


def count_unet_calls(pipe):
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True)
    return calls


@pytest.fixture(scope="module", params=["epsilon", "sample", "v_prediction"])
def chain(request, smoke_project, tmp_path_factory):
    kind = request.param
    if kind == "epsilon":  # the shared smoke project's teacher is the default, an epsilon model
        return kind, smoke_project
    root = tmp_path_factory.mktemp(f"chain-{kind}")
    shutil.copytree(smoke_project / "data", root / "data")
    sections = {"teacher": {"prediction_type": kind}, "prune": {"variant": PRUNE[kind]}}
    if kind == "sample":  # the other vpred mode: data targets on betas rescaled to zero terminal SNR
        sections["vpred"] = {"zero_terminal_snr": True, "targets": "data"}
    # v_prediction with the defaults: same schedule, so vpred must copy the teacher through
    params = resolve(write_params(root, **sections))
    for stage in ["teacher", "encode", *CHAIN]:
        run_stage(stage, params, root)
    return kind, root


def test_vpred_output_predicts_v_on_trailing_ddim(chain):
    kind, root = chain
    vpred = StableDiffusionPipeline.from_pretrained(root / "models" / "vpred")
    assert vpred.scheduler.config.prediction_type == "v_prediction"
    assert vpred.scheduler.config.timestep_spacing == "trailing"
    teacher = StableDiffusionPipeline.from_pretrained(root / "models" / "teacher").unet.state_dict()
    same = all(torch.equal(teacher[k], v) for k, v in vpred.unet.state_dict().items())
    assert same == (kind == "v_prediction")  # copied through only when nothing needs to change
    assert vpred.scheduler.config.rescale_betas_zero_snr == (kind == "sample")
    if kind == "sample":
        assert vpred.scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR: the last step is pure noise


def test_guided_model_takes_w_and_samples_with_one_call_per_step(chain):
    _, root = chain
    pipe = StableDiffusionPipeline.from_pretrained(root / "models" / "guided")
    assert pipe.unet.config.time_cond_proj_dim == 16
    seen = []
    pipe.unet.time_embedding.cond_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    calls = count_unet_calls(pipe)
    out = pipe("a handwritten digit two", num_inference_steps=3, guidance_scale=7.5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert calls == [1, 1, 1]  # no CFG batch
    expected = diffusion.guidance_embedding(torch.tensor([6.5]), 16)
    assert len(seen) == 3 and all(torch.allclose(s, expected) for s in seen)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("n", HALVING_STEPS)
def test_every_round_is_a_stock_pipeline_sampling_in_n_calls(chain, n):
    kind, root = chain
    folder = root / "models" / f"steps-{n}"
    card = json.loads((folder / "distill.json").read_text())
    assert card["num_inference_steps"] == n and card["teacher_steps"] == 2 * n
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert (pipe.unet.mid_block is None) == (PRUNE[kind] in ("small", "tiny"))  # halving ran on the pruned UNet
    calls = count_unet_calls(pipe)
    images = pipe(["a handwritten digit one"] * 2, num_inference_steps=n, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert len(calls) == n and images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_direct_mode_distills_from_the_first_teacher(smoke_project, tmp_path):
    for name in ("data", "models"):
        shutil.copytree(smoke_project / name, tmp_path / name)
    params = resolve(write_params(tmp_path, halve={"mode": "direct"}))
    summary = run_stage("halve@4", params, tmp_path)
    assert summary["teacher_steps"] == 64
    card = json.loads((tmp_path / "models" / "steps-4" / "distill.json").read_text())
    assert card["teacher"] == "models/pruned" and card["mode"] == "direct"


def test_guidance_refuses_an_epsilon_model(smoke_project, tmp_path):
    shutil.copytree(smoke_project / "data", tmp_path / "data")
    shutil.copytree(smoke_project / "models" / "teacher", tmp_path / "models" / "vpred")
    with pytest.raises(ValueError, match="must predict v"):
        run_stage("guidance", resolve(write_params(tmp_path)), tmp_path)


def test_model_folders_do_not_record_the_checkout_path(smoke_project):
    """Configs name their source relatively (``steps-2/unet``), so a folder is the same bytes in every checkout."""
    leaked = [str(path.relative_to(smoke_project)) for path in (smoke_project / "models").rglob("*.json")
              if path.name != "params.resolved.json" and str(smoke_project) in path.read_text()]
    assert leaked == []
    unet = json.loads((smoke_project / "models" / "steps-1" / "unet" / "config.json").read_text())
    assert unet["_name_or_path"] == "steps-2/unet"


def snapfusion_round(smoke_project, tmp_path, **halve_params):
    """One SnapFusion round 64 -> 32 from the smoke project's guidance-free models/vpred (what bench.one_step runs);
    returns the student pipeline and the logged terms of each step."""
    from sd_distill.data import latents as latent_data
    from sd_distill.models.parts import load_pipeline
    from sd_distill.stages import halve

    tmp_path.mkdir(parents=True, exist_ok=True)
    params = resolve(write_params(tmp_path, halve={"loss": "cfg_aware", **halve_params}))
    p, seen = params.halve, []
    pipe = load_pipeline(smoke_project / "models" / "vpred")
    with latent_data.from_disk(smoke_project / "data" / "latents", pipe, "snapfusion@32", "vpred", p.train_for(32),
                               params.base.seed, "cpu") as latents:
        pipe = halve.distill_round(pipe, latents, 32, 64, p, params.base, tmp_path / "work",
                                   on_metrics=lambda metrics, step: seen.append(metrics))
    return pipe, seen


def test_a_snapfusion_round_trains_a_student_without_w_that_samples_with_two_calls_per_step(smoke_project, tmp_path):
    pipe, seen = snapfusion_round(smoke_project, tmp_path, cfg_prob=1.0)
    assert pipe.unet.config.time_cond_proj_dim is None
    assert [m["halve/cfg"] for m in seen] == [1.0, 1.0]  # every batch took the CFG-aware branch
    assert all(m["halve/loss"] == pytest.approx(2 * m["halve/dstl"]) for m in seen)  # ori_weight 1: L_ori = L_dstl
    calls = count_unet_calls(pipe)
    images = pipe(["a handwritten digit one"], num_inference_steps=2, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert calls == [2, 2] and np.isfinite(images).all()  # CFG: conditional and unconditional in one batch


def test_snapfusion_without_cfg_batches_is_vanilla_distillation_and_the_coin_is_seeded(smoke_project, tmp_path):
    _, vanilla = snapfusion_round(smoke_project, tmp_path / "a", cfg_prob=0.0, ori_weight=0.0)
    assert [m["halve/cfg"] for m in vanilla] == [0.0, 0.0]
    assert all(m["halve/loss"] == m["halve/dstl"] and m["halve/ori"] == 0.0 for m in vanilla)
    _, half = snapfusion_round(smoke_project, tmp_path / "b", cfg_prob=0.5)
    _, again = snapfusion_round(smoke_project, tmp_path / "c", cfg_prob=0.5)
    assert half == again  # the same coins and losses: drawn from the loop's seeded generator


def test_the_dag_refuses_the_cfg_aware_loss_with_one_line(smoke_project, tmp_path, capsys):
    from sd_distill.cli import main
    from tests.test_bad_input import one_error_line

    for name in ("data", "models"):
        shutil.copytree(smoke_project / name, tmp_path / name)
    write_params(tmp_path, halve={"loss": "cfg_aware"})
    assert main(["run", "halve@32", "--params", str(tmp_path / "params.yaml")]) == 2
    line = one_error_line(capsys, "run")
    assert "halve.loss is cfg_aware" in line and "python -m sd_distill.bench.one_step --parts snapfusion" in line
