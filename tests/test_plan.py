import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.autograd.graph import saved_tensors_hooks
from transformers import CLIPTextConfig, CLIPTextModel

from sd_distill import cli, plan
from sd_distill.bench.timing import NO_PARAMS_FILE
from sd_distill.errors import UserError
from sd_distill.models import bk, costs, parts
from sd_distill.params import HALVING_STEPS, TrainParams, UnetArch, resolve
from sd_distill.training import memory

SD15_TRAINING_STAGES = ["vpred", "guidance", "prune", *(f"halve@{n}" for n in HALVING_STEPS), "dmd", "decoder"]
SMALL_UNET = UnetArch(block_out_channels=(8, 16, 16), attention_head_dim=4, norm_num_groups=8)


def small_unet_config():
    with torch.device("meta"):
        return parts.build_unet(SMALL_UNET, 8, 4, 16).config


# -- activations: what autograd saves, counted on the meta device -------------------------------------------------

def test_saved_bytes_of_a_small_mlp_are_the_hand_counted_activations():
    with torch.device("meta"):
        mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        x = torch.zeros(1, 4)
    # Linear 1 keeps its input x (4 values), ReLU its output (8), which Linear 2 keeps too (the same storage, once);
    # weights are parameters, not activations
    assert memory.saved_bytes(lambda: mlp(x), mlp) == 4 * (4 + 8)
    # under bf16 autocast Linear 1 keeps a bf16 copy of x and outputs bf16; its cast weight is counted apart
    assert memory.saved_bytes(lambda: mlp(x), mlp, precision="bf16") == 2 * (4 + 8)


def test_unet_activations_grow_with_the_batch_and_checkpointing_cuts_them():
    config = small_unet_config()
    one = memory.unet_activations(config, 8, 16, False, "no")
    assert one == 685_792  # pinned: the small UNet at an 8x8 latent, fp32
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(memory._plain(config))
        two = memory.saved_bytes(lambda: unet(torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long),
                                            torch.zeros(2, 16, 16)), unet)
    assert two == pytest.approx(2 * one, rel=1e-3)  # per sample x batch, the assumption `memory.estimate` makes
    bf16 = memory.unet_activations(config, 8, 16, False, "bf16")
    checkpointed = memory.unet_activations(config, 8, 16, True, "bf16")
    assert 0.5 * one < bf16 < 0.75 * one  # bf16 convolutions and matmuls, fp32 norms (CUDA autocast)
    assert checkpointed < 0.3 * bf16
    assert not unet.is_gradient_checkpointing  # the measurement leaves the model as it found it


def test_attention_keeps_what_cudas_fused_kernels_keep_not_the_attention_matrix():
    tokens, heads = 1024, 2
    with torch.device("meta"):
        attn = Attention(query_dim=32, heads=heads, dim_head=16)
        x = torch.zeros(1, tokens, 32)
    matrix = heads * tokens * tokens * 4  # one fp32 softmax(Q K^T)
    assert memory.saved_bytes(lambda: attn(x), attn) < matrix / 8
    kept = {}  # what the meta device's math fallback would keep instead
    with saved_tensors_hooks(lambda t: kept.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
                             or t, lambda t: t):
        attn(x)
    assert sum(kept.values()) > matrix


def test_diffusers_unets_attend_with_torch_sdpa():
    unet = parts.build_unet(SMALL_UNET, 8, 4, 16)
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}


# -- memory --------------------------------------------------------------------------------------------------------

def test_memory_is_bytes_per_trained_parameter_plus_frozen_plus_activations():
    p = TrainParams(batch_size=4, ema_decay=0.99)
    assert memory.estimate(1000, 500, p, "bf16", 10) == {
        "weights": 4000, "gradients": 4000, "optimizer": 8000, "ema": 4000, "weight_copies": 2000, "frozen": 500,
        "activations": 40}
    lean = p.model_copy(update={"optimizer": "adamw8bit", "ema_decay": 0.0})
    assert memory.estimate(1000, 0, lean, "no", 10) == {
        "weights": 4000, "gradients": 4000, "optimizer": 2000, "ema": 0, "weight_copies": 0, "frozen": 0,
        "activations": 40}
    assert memory.estimate(1000, 0, p.model_copy(update={"adam_amsgrad": True}), "no", 0)["optimizer"] == 12000


def test_frozen_models_are_stored_in_bf16_under_bf16_and_run_under_autocast():
    unet = parts.build_unet(SMALL_UNET, 8, 4, 16)
    n = costs.count_parameters(unet)
    assert memory.module_bytes(unet) == 4 * n + 4 * sum(b.numel() for b in unet.buffers())
    frozen = parts.frozen(unet, "cpu", "bf16")
    assert frozen is unet and not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16} and memory.module_bytes(unet) == 2 * n
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 16, 16)).sample
    assert torch.isfinite(out).all()
    assert {p.dtype for p in parts.frozen(torch.nn.Linear(2, 2), "cpu", "no").parameters()} == {torch.float32}


def test_check_fits_names_the_stage_the_sizes_and_the_knobs():
    memory.check_fits("prune", {"weights": 30e9, "activations": 40e9}, 80e9)  # 70 GB of 72 usable
    with pytest.raises(UserError) as err:
        memory.check_fits("prune", {"weights": 30e9, "activations": 50e9}, 80e9, "NVIDIA A100-SXM4-80GB")
    message = str(err.value)
    assert message.startswith("prune: needs an estimated 80.0 GB of GPU memory (weights 30.0, activations 50.0)")
    assert "72.0 GB usable of NVIDIA A100-SXM4-80GB's 80.0 GB" in message
    assert "train.batch_size" in message and "train.gradient_checkpointing" in message and "adamw8bit" in message


# -- the plan of a profile -------------------------------------------------------------------------------------------

def test_the_smoke_plan_is_made_of_its_stages_counted_parts():
    params = resolve(NO_PARAMS_FILE, profile="smoke")
    result = plan.plan(params, "a100-80gb", 0.5)
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["teacher/vae", "teacher/unet", *SD15_TRAINING_STAGES]
    arch = plan.arch_of(params)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(arch.unet)
        guided = UNet2DConditionModel.from_config({**arch.unet, "time_cond_proj_dim": params.guidance.embedding_dim})
        pruned = UNet2DConditionModel.from_config(bk.compact_config(guided.config, "small"))
        text = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    forward = {name: 2 * costs.unet_macs(u, 8, 8, 16)["macs_total"]
               for name, u in (("teacher", teacher), ("pruned", pruned))}
    assert rows["vpred"]["flops_per_sample"] == 4 * forward["teacher"]  # 3 x trained + the teacher's targets
    assert rows["halve@1"]["flops_per_sample"] == 5 * forward["pruned"]  # 3 x student + 2 teacher DDIM steps
    # smoke's dmd: 4 steps, the generator on 2 (warm-up 1, ratio 2); both terms, real score = CFG teacher, fake = pruned
    # per step: generator forward + 3 x fake denoising + 2 x 3 critic; on half the steps the generator's backward
    # (2), the DM calls (2 teacher + 1 fake) and the generator's critic pass (3)
    assert rows["dmd"]["flops_per_sample"] == 13 * forward["pruned"] + forward["teacher"]
    rate = 19.5e12 * 0.5  # smoke trains in fp32: the A100's fp32 peak
    for r in result["rows"]:
        assert r["samples"] == r["steps"] * r["micro_batch"] * r["grad_accum"]
        assert r["flops"] == r["samples"] * r["flops_per_sample"]
        assert r["gpu_hours"] == pytest.approx(r["flops"] / rate / 3600)
        assert r["memory_total"] == sum(r["memory"].values()) and r["fits"]
    assert result["total_gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in result["rows"]))
    prune, n = rows["prune"], costs.count_parameters(pruned)
    assert prune["memory"]["weights"] == 4 * n and prune["memory"]["optimizer"] == 8 * n
    assert prune["memory"]["ema"] == 4 * n  # smoke's prune keeps EMA (0.99)
    assert prune["memory"]["frozen"] == memory.module_bytes(guided, text)  # fp32 parent and text encoder
    acts = memory.unet_activations(pruned.config, 8, 16, False, "no")
    assert prune["memory"]["activations"] == 16 * acts and prune["activations_per_sample"] == acts


def test_sd15_plan_prints_every_training_stage_and_the_total_in_a100_hours(tmp_path, capsys):
    assert cli.main(["plan", "--profile", "sd15", "--params", str(tmp_path / "absent.yaml")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for stage in SD15_TRAINING_STAGES:
        assert sum(line.startswith(f"| {stage} ") for line in lines) == 2  # the cost table and the memory table
    assert "| total " in out and "**Total: 238 A100-hours** (a100-80gb)" in out
    assert "**does not fit**" not in out
    assert "BK-SDM" in out and "300 A100-hours" in out and "DMD2" in out and "1600 A100-hours" in out


def test_sd15_recipe_costs_what_its_steps_and_batches_say():
    result = plan.plan(resolve(NO_PARAMS_FILE, profile="sd15"), "a100-80gb", 0.4, with_memory=False)
    rows = {r["stage"]: r for r in result["rows"]}
    assert [r["stage"] for r in result["rows"]] == SD15_TRAINING_STAGES
    assert (rows["prune"]["steps"], rows["prune"]["batch"], rows["prune"]["samples"]) == (50_000, 256, 12_800_000)
    assert [rows[f"halve@{n}"]["steps"] for n in HALVING_STEPS] == [2000, 2000, 5000, 20000, 20000, 20000]
    assert result["total_gpu_hours"] == pytest.approx(237.6, abs=0.5)
    h100 = plan.plan(resolve(NO_PARAMS_FILE, profile="sd15"), "h100-80gb", 0.4, with_memory=False)
    assert h100["total_gpu_hours"] == pytest.approx(result["total_gpu_hours"] * 312.0 / 989.4)


def test_a_stage_that_does_not_fit_is_named_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(plan.GPUS, "test-gpu", plan.Gpu("a 1 MB test GPU", "A100", 1e-3))
    assert cli.main(["plan", "--profile", "smoke", "--params", str(tmp_path / "absent.yaml"),
                     "--gpu", "test-gpu", "--json"]) == 2
    captured = capsys.readouterr()
    rows = {r["stage"]: r for r in json.loads(captured.out)["rows"]}
    tight = [name for name, r in rows.items() if not r["fits"]]
    assert "prune" in tight and "teacher/unet" in tight
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-distill plan: error: ")
    assert all(f"{name} does not fit a 1 MB test GPU (0.0 GB usable)" in err[0] for name in tight)
    assert "train.batch_size" in err[0]


def test_unknown_gpu_is_refused_naming_the_choices(tmp_path, capsys):
    assert cli.main(["plan", "--profile", "smoke", "--params", str(tmp_path / "absent.yaml"), "--gpu", "v100"]) == 2
    assert "--gpu: expected one of a100-40gb, a100-80gb, h100-80gb" in capsys.readouterr().err
