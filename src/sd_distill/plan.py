"""``sd-distill plan``: what every training stage of a profile will cost, before anything runs.

Per stage: optimizer steps, global batch, samples seen, training FLOPs per sample and in all, GPU-hours on a named
GPU at a stated model-FLOPs utilisation (MFU), and the GPU memory it needs (``training.memory``, activations measured
on the real architecture), with whether that fits the GPU.

FLOPs are model FLOPs as ``models.costs`` counts them (matmuls and convolutions, ``FlopCounterMode`` on models built
from configs on the meta device: nothing is downloaded). A trained call costs 3 forwards (forward + backward), a
frozen call one. Gradient checkpointing's second forward is not counted: MFU is model FLOPs over peak, recomputation
excluded (Chowdhery et al. 2022, PaLM, appendix B), so recomputing is what lowers the MFU a run reaches.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sd_distill.bench.timing import _flops, peak_tflops
from sd_distill.errors import UserError
from sd_distill.models import bk, costs, parts
from sd_distill.models import critic as critic_lib
from sd_distill.params import FIRST_TEACHER_STEPS, HALVING_STEPS, Params, TrainParams
from sd_distill.training.memory import (HALF, HEADROOM, _plain, estimate, module_bytes, saved_bytes, tiny_activations,
                                        unet_activations, unet_stage_memory)


@dataclass(frozen=True)
class Gpu:
    title: str
    peak_key: str  # what ``bench.timing.PEAK_TFLOPS`` matches; also the unit of the hours ("A100-hours")
    memory_gb: float  # as the vendor states it, 1e9 bytes (a little less than torch's total_memory reports)


GPUS = {
    "a100-40gb": Gpu("NVIDIA A100 40GB (SXM)", "A100", 40),
    "a100-80gb": Gpu("NVIDIA A100 80GB (SXM)", "A100", 80),
    "h100-80gb": Gpu("NVIDIA H100 80GB (SXM)", "H100", 80),
    "h100-pcie": Gpu("NVIDIA H100 80GB PCIe", "H100 PCIe", 80),
    "h200": Gpu("NVIDIA H200 141GB (SXM)", "H200", 141),
    "l40s": Gpu("NVIDIA L40S 48GB", "L40S", 48),
}
# published training costs of SD v1.x distillations, for comparison (research notes: scale.md section 2,
# perf_anchors.md section 4, one_step.md section 1)
PUBLISHED_A100_HOURS = (
    ("BK-SDM, block removal + KD alone, 50k x 256 (Kim et al. 2023; BK-SDM README: ~300 h on one A100-80GB)", 300.0),
    ("DMD2 SD v1.5, one-step (Yin et al. 2024; experiments/sdv1.5/README.md: 64 GPUs x 25 h, A100 per the paper)",
     1600.0),
    ("LCM, 4,000 iterations at 768 px (Luo et al. 2023; diffusers LCM docs quoting the project page)", 32.0),
    ("progressive distillation of SD to 1 step: 108.8 A100-days (Meng et al. 2023, as InstaFlow quotes it)",
     108.8 * 24),
)


# --------------------------------------------------------------------------- the plan of a profile
def arch_of(params: Params) -> costs.Arch:
    """The architecture a profile trains: SD v1.5's published configs when the teacher comes from a hub id or folder
    (sd15), else the one ``teacher`` builds from its params (tiny, smoke; the text encoder's vocabulary counted as
    CLIP's byte symbols only, since the captions' words are not known here)."""
    t = params.teacher
    if t.source is not None:
        return costs.ARCHS["sd15"]
    factor = 2 ** (len(t.vae.block_out_channels) - 1)
    with torch.device("meta"):
        unet = parts.build_unet(t.unet, params.prepare.resolution // factor, t.vae.latent_channels,
                                t.text_encoder.hidden_size)
        vae = parts.build_vae(t.vae)
    text = dict(hidden_size=t.text_encoder.hidden_size, intermediate_size=t.text_encoder.intermediate_size,
                num_hidden_layers=t.text_encoder.num_hidden_layers,
                num_attention_heads=t.text_encoder.num_attention_heads,
                max_position_embeddings=t.text_encoder.max_length, vocab_size=2 * 256 + 2,
                projection_dim=t.text_encoder.hidden_size)
    return costs.Arch(f"{params.profile} profile", _plain(unet.config), _plain(vae.config), text)


def _trained(*modules: torch.nn.Module | None) -> int:
    return sum(parts.count_parameters(m, trainable_only=True) for m in modules)


def _row(name: str, tp: TrainParams, per: float, what: str, mem: dict | None, other: int | None) -> dict:
    samples = tp.steps * tp.batch_size * tp.grad_accum
    row = {"stage": name, "steps": tp.steps, "micro_batch": tp.batch_size, "grad_accum": tp.grad_accum,
           "batch": tp.batch_size * tp.grad_accum, "samples": samples, "flops_per_sample": per,
           "flops_per_sample_is": what, "flops": samples * per, "gradient_checkpointing": tp.gradient_checkpointing,
           "optimizer": tp.optimizer, "memory": mem}
    if mem is not None:
        row.update(memory_total=sum(mem.values()), activations_per_sample=mem["activations"] // tp.batch_size,
                   activations_per_sample_other_setting=other)
    return row


@dataclass
class _Models:
    """A profile's models, built from their configs on the meta device."""

    teacher: UNet2DConditionModel
    guided: UNet2DConditionModel
    pruned: UNet2DConditionModel
    vae: AutoencoderKL
    tiny: AutoencoderTiny
    text: CLIPTextModel
    critic: torch.nn.Module | None


def _meta_models(params: Params, arch: costs.Arch) -> _Models:
    variant, d = params.prune.variant, params.decoder
    with torch.device("meta"):
        guided = UNet2DConditionModel.from_config({**arch.unet, "time_cond_proj_dim": params.guidance.embedding_dim})
        try:
            pruned = guided if variant == "none" else UNet2DConditionModel.from_config(
                bk.compact_config(guided.config, variant))
        except bk.VariantError as exc:
            raise bk.VariantError(f"prune.variant={variant}: {exc}") from None
        critic = parts.patch_discriminator(d.arch.channels) if d.adversarial_weight > 0 else None
        return _Models(
            teacher=UNet2DConditionModel.from_config(arch.unet), guided=guided, pruned=pruned,
            vae=AutoencoderKL.from_config(arch.vae), tiny=parts.build_tiny_autoencoder(arch.vae, d.arch),
            text=CLIPTextModel(CLIPTextConfig(**arch.text_encoder)), critic=critic)


def _forward_flops(m: _Models, params: Params, resolution: int, latent: int, seq: int) -> dict[str, int]:
    """FLOPs of one forward at batch 1 of every model a stage calls."""
    with torch.device("meta"):
        image, ids = torch.zeros(1, 3, resolution, resolution), torch.zeros(1, seq, dtype=torch.long)
        f = {key: 2 * costs.unet_macs(getattr(m, key), latent, latent, seq)["macs_total"]
             for key in ("teacher", "guided", "pruned")}
        f["vae_encoder"] = _flops(lambda: m.vae.encode(image))
        f["vae_decoder"] = 2 * costs.decoder_macs(m.vae, latent, latent)["macs_total"]
        f["tiny"] = 2 * costs.decoder_macs(m.tiny, latent, latent)["macs_total"] + _flops(lambda: m.tiny.encode(image))
        f["critic"] = _flops(lambda: m.critic(image)) if m.critic is not None else 0
        f["text"] = _flops(lambda: m.text(ids)) if params.encode.embeddings == "computed" else 0
    return f


def _stage_rows(params: Params, m: _Models, f: dict, resolution: int, latent: int, seq: int,
                with_memory: bool) -> list[dict]:
    precision, variant, h, d = params.base.mixed_precision, params.prune.variant, params.halve, params.decoder

    def frozen(*modules):  # copies: the same meta models are trained in other rows
        return [parts.frozen(copy.deepcopy(x), "meta", precision) for x in modules]

    def unet_mem(trained, frozen_models, tp):
        if not with_memory:
            return None, None
        other = unet_activations(trained.config, latent, seq, not tp.gradient_checkpointing, precision)
        return unet_stage_memory(trained, frozen_models, tp, precision, latent, seq), other

    text_is = " + text encoder" if f["text"] else ""
    rows = []
    if params.teacher.source is None:  # tiny, smoke: the teacher stage trains the VAE, then the UNet
        t = params.teacher
        with torch.device("meta"):
            image = torch.zeros(1, 3, resolution, resolution)
            mem = (estimate(_trained(m.vae), 0, t.vae_train, precision,
                          saved_bytes(lambda: m.vae(image), m.vae, checkpointing=t.vae_train.gradient_checkpointing,
                                      precision=precision)) if with_memory else None)
        rows.append(_row("teacher/vae", t.vae_train, 3 * (f["vae_encoder"] + f["vae_decoder"]), "3 x VAE", mem,
                         None))
        rows.append(_row("teacher/unet", t.unet_train, 3 * f["teacher"], "3 x UNet",
                         *unet_mem(m.teacher, [], t.unet_train)))
    # the stages move the pipeline's text encoder to the GPU as it is stored (fp32): data.latents.from_disk
    v = params.vpred
    with_teacher = v.targets == "teacher"
    rows.append(_row("vpred", v.train, (3 + with_teacher) * f["teacher"] + f["text"],
                     "3 x UNet" + (" + teacher UNet" if with_teacher else "") + text_is,
                     *unet_mem(m.teacher, (frozen(m.teacher) if with_teacher else []) + [m.text], v.train)))
    rows.append(_row("guidance", params.guidance.train, 3 * f["guided"] + 2 * f["teacher"] + f["text"],
                     "3 x guided UNet + CFG teacher (2 calls)" + text_is,
                     *unet_mem(m.guided, frozen(m.teacher) + [m.text], params.guidance.train)))
    if variant != "none":
        rows.append(_row("prune", params.prune.train, 3 * f["pruned"] + f["guided"] + f["text"],
                         f"3 x BK {variant} + guided parent" + text_is,
                         *unet_mem(m.pruned, frozen(m.guided) + [m.text], params.prune.train)))
    for n in HALVING_STEPS:  # every round's teacher has the student's architecture (prune's output, then rounds)
        k = 2 if h.mode == "progressive" else FIRST_TEACHER_STEPS // n
        rows.append(_row(f"halve@{n}", h.train_for(n), (3 + k) * f["pruned"] + f["text"],
                         f"3 x student + {k} teacher steps" + text_is,
                         *unet_mem(m.pruned, frozen(m.pruned) + [m.text], h.train_for(n))))
    rows.append(_dmd_row(params, m, f, latent, seq, with_memory, frozen))
    mem = None
    if with_memory:
        acts = tiny_activations(m.tiny, resolution, d.arch.channels if m.critic is not None else None, precision)
        mem = estimate(_trained(m.tiny, m.critic), module_bytes(m.vae), d.train, precision, acts)
    rows.append(_row("decoder", d.train, f["vae_decoder"] + 3 * f["tiny"] + 9 * f["critic"],
                     "full decode + 3 x tiny decode and encode" + (" + 3 x 3 critic" if m.critic else ""), mem, None))
    return rows


def _dmd_row(params: Params, m: _Models, f: dict, latent: int, seq: int, with_memory: bool, frozen) -> dict:
    """Stage ``dmd``: per loop step the fake score's denoising and the critic's two passes; on a fraction
    ``generator_updates / steps`` of the steps also the generator's backward, the real and fake scores' DM calls and
    the generator's critic pass. A critic pass is counted as a whole fake-score call (it runs the encoder only: an
    upper bound)."""
    p, precision = params.dmd, params.base.mixed_precision
    fake = m.pruned if p.fake_init == "pruned" else m.guided
    real, real_calls = (m.teacher, 2) if p.real_score == "cfg" else (m.guided, 1)
    dm, gan = p.objective in ("both", "dm"), p.objective in ("both", "gan")
    r = p.generator_updates() / p.train.steps
    g_f, fake_f, real_f = f["pruned"], f["pruned" if p.fake_init == "pruned" else "guided"], f[
        "teacher" if p.real_score == "cfg" else "guided"]
    per = ((1 + 2 * r) * g_f + 3 * fake_f + gan * 6 * fake_f + r * (dm * (real_calls * real_f + fake_f)
                                                                    + gan * 3 * fake_f) + f["text"])
    what = (f"student (3 x on {r:.0%} of steps) + 3 x fake score" + (" + 2 x 3 critic" if gan else "")
            + (f" + DM: {real_calls} real + 1 fake" if dm else "") + (" + generator critic pass" if gan else "")
            + (" + text encoder" if f["text"] else ""))
    mem = other = None
    if with_memory:
        with torch.device("meta"):
            head = critic_lib.Head(*critic_lib.deepest_geometry(fake.config))
        ck = p.train.gradient_checkpointing
        acts = unet_activations(m.pruned.config, latent, seq, ck, precision) + 2 * unet_activations(
            fake.config, latent, seq, ck, precision)  # the generator's graph, the fake's and the critic's
        mem = estimate(_trained(m.pruned, fake, head), module_bytes(*frozen(real), m.text), p.train, precision, acts)
        other = unet_activations(m.pruned.config, latent, seq, not ck, precision) + 2 * unet_activations(
            fake.config, latent, seq, not ck, precision)
    return _row("dmd", p.train, per, what, mem, other)


def plan(params: Params, gpu: str = "a100-80gb", mfu: float = 0.4, *, with_memory: bool = True) -> dict:
    """The per-stage table of ``params``' profile on ``gpu`` (a key of ``GPUS``) at ``mfu``; JSON-able."""
    if gpu not in GPUS:
        raise UserError(f"--gpu: expected one of {', '.join(GPUS)}, found {gpu!r}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu: expected a fraction in (0, 1], found {mfu}")
    arch, precision, g = arch_of(params), params.base.mixed_precision, GPUS[gpu]
    peak = peak_tflops(g.peak_key, "bfloat16" if precision in HALF else "float32")
    resolution = params.prepare.resolution
    latent = resolution // (2 ** (len(arch.vae["block_out_channels"]) - 1))
    seq = arch.text_encoder["max_position_embeddings"]
    models = _meta_models(params, arch)
    f = _forward_flops(models, params, resolution, latent, seq)
    rows = _stage_rows(params, models, f, resolution, latent, seq, with_memory)
    rate = peak * 1e12 * mfu
    usable = (1 - HEADROOM) * g.memory_gb * 1e9
    for r in rows:
        r["gpu_hours"] = r["flops"] / rate / 3600
        if r["memory"] is not None:
            r["fits"] = r["memory_total"] <= usable
    encode = 220_000 * f["vae_encoder"] / rate / 3600
    return {
        "kind": f"FLOP-based projection{' and memory estimate' if with_memory else ''}, not a measurement",
        "profile": params.profile, "architecture": arch.title, "resolution": resolution, "precision": precision,
        "gpu": {"name": gpu, "title": g.title, "hours": f"{g.peak_key}-hours", "peak_tflops": peak,
                "memory_gb": g.memory_gb, "usable_gb": usable / 1e9}, "assumed_mfu": mfu, "rows": rows,
        "total_gpu_hours": sum(r["gpu_hours"] for r in rows),
        "published_a100_hours": [{"name": n, "a100_hours": hours} for n, hours in PUBLISHED_A100_HOURS],
        "encode_gpu_hours_per_220k_images": encode,
        "not_counted": "the teacher stage when it comes from a hub id or folder (sd15), the one-off encode stage "
                       f"(its VAE encoder: {encode:.2f} {g.peak_key}-hours per 220k images, BK-SDM's data set, at "
                       "this MFU), "
                       "the prune task loss and feature-KD terms (no extra model call), evaluation, checkpoints",
    }


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.1f}"


def render(result: dict) -> str:
    """``plan``'s result as Markdown: the cost table, the memory table and the comparison with published runs."""
    from sd_distill.bench import _n, _table

    g, rows = result["gpu"], result["rows"]
    out = [f"# sd-distill plan: profile {result['profile']}", "",
           f"{result['architecture']} at {result['resolution']} px, mixed precision {result['precision']}, on "
           f"{g['title']} ({g['peak_tflops']:.0f} TFLOP/s dense peak, {g['memory_gb']:.0f} GB) at an assumed MFU of "
           f"{result['assumed_mfu']} ({result['kind']}).", ""]
    out += _table(["stage", "steps", "batch (micro x accum)", "samples", "TFLOP/sample", "EFLOP", g["hours"],
                   "per sample"],
                  [[r["stage"], str(r["steps"]), f"{r['batch']} ({r['micro_batch']} x {r['grad_accum']})",
                    f"{r['samples']:,}", _n(r["flops_per_sample"] / 1e12), _n(r["flops"] / 1e18), _n(r["gpu_hours"]),
                    r["flops_per_sample_is"]] for r in rows]
                  + [["total", "", "", f"{sum(r['samples'] for r in rows):,}", "",
                      _n(sum(r["flops"] for r in rows) / 1e18), _n(result["total_gpu_hours"]), ""]])
    out += [f"**Total: {_n(result['total_gpu_hours'])} {g['hours']}** ({g['name']}). Not counted: "
            f"{result['not_counted']}.", ""]
    if any(r["memory"] is not None for r in rows):
        out += [f"GPU memory, GB (usable: {g['usable_gb']:.1f} of {g['memory_gb']:.0f}; activations measured per "
                "sample on the architecture, x micro-batch):", ""]
        out += _table(["stage", "weights", "grads", "optimizer", "EMA", "bf16/fp16 copies", "frozen",
                       "act./sample (other ckpt)", "activations", "total", "fits"],
                      [[r["stage"], *(_gb(r["memory"][k]) for k in ("weights", "gradients", "optimizer", "ema",
                                                                    "weight_copies", "frozen")),
                        f"{r['activations_per_sample'] / 1e9:.2f}" + (
                            "" if r["activations_per_sample_other_setting"] is None else
                            f" ({r['activations_per_sample_other_setting'] / 1e9:.2f})"),
                        _gb(r["memory"]["activations"]), _gb(r["memory_total"]),
                        "fits" if r["fits"] else "**does not fit**"] for r in rows if r["memory"] is not None])
    published = "; ".join(f"{p['name']}: {_n(p['a100_hours'])} A100-hours" for p in result["published_a100_hours"])
    return "\n".join(out + [f"Published: {published}.", ""])


def main(args) -> int:
    """``sd-distill plan``: print the table (or JSON); exit 2 naming every stage that does not fit."""
    from sd_distill.params import resolve

    params = resolve(args.params, args.overrides, profile=args.profile)
    result = plan(params, args.gpu, args.mfu)
    print(json.dumps(result, indent=2) if args.json else render(result))
    tight = [r for r in result["rows"] if r.get("fits") is False]
    if tight:
        where = f"{result['gpu']['title']} ({result['gpu']['usable_gb']:.1f} GB usable)"
        raise UserError("; ".join(f"{r['stage']} does not fit {where}: {r['memory_total'] / 1e9:.1f} GB" for r in tight)
                        + ". Lower that stage's train.batch_size and raise train.grad_accum (the same global batch), "
                          "or set train.gradient_checkpointing: true or train.optimizer: adamw8bit")
    return 0
