"""Part 3 of ``sd-distill bench``: training throughput of a halving round and of the prune stage, and a FLOP-based
projection of a full sd15-profile run in A100-hours."""

from __future__ import annotations

import copy
from collections.abc import Callable

from sd_distill.bench.timing import NO_PARAMS_FILE, Options, Session, _flops, _torch_dtype, _unet_config, _vae_factor

A100_BF16_TFLOPS = 312.0
# published training costs, as the issue quotes them
PUBLISHED_A100_HOURS = (
    ("BK-SDM (Kim et al. 2023)", 300.0),
    ("LCM (Luo et al. 2023)", 32.0),
    ("progressive distillation of SD to 1 step: 108.8 A100-days (as InstaFlow, Liu et al. 2023, quotes it)",
     108.8 * 24),
)


def _train_step(model, loss_of: Callable, draw: Callable, tp, o: Options) -> Callable[[], None]:
    """One optimizer step as ``training.loop.train`` takes it: loss (autocast unless float32), backward, gradient
    clipping, AdamW, EMA."""
    import torch
    from diffusers.training_utils import EMAModel

    opt = torch.optim.AdamW(model.parameters(), lr=tp.learning_rate, weight_decay=tp.weight_decay)
    ema = EMAModel(model.parameters(), decay=tp.ema_decay) if tp.ema_decay > 0 else None

    def step() -> None:
        with torch.autocast(o.device, dtype=_torch_dtype(o.dtype), enabled=o.dtype != "float32"):
            loss = loss_of(draw())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tp.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())

    return step


def run_train(session: Session, o: Options, params, shapes: str, batch: int | None) -> list[dict]:
    """Samples/s of one step of a halving round (the teacher's two DDIM steps without grad, the student's
    forward/backward) and of the prune stage (student and parent forward, output and feature KD), on synthetic
    latents; ``shapes`` ``tiny`` (the profile's own batch sizes) or ``sd15`` (SD v1.5 at ``o.resolution``,
    ``batch``)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from sd_distill import diffusion
    from sd_distill.data.latents import LatentBatches
    from sd_distill.models import bk, costs, parts
    from sd_distill.stages import guidance, halve, prune, vpred

    t = params.teacher
    if shapes == "tiny":
        latent = params.prepare.resolution // 2 ** (len(t.vae.block_out_channels) - 1)
        seq, width, channels = t.text_encoder.max_length, t.text_encoder.hidden_size, t.vae.latent_channels
        with torch.device("meta"):
            config = parts.build_unet(t.unet, latent, channels, width).config
        batches = {"halve": params.halve.train.batch_size, "prune": params.prune.train.batch_size}
    else:
        latent, seq, width, channels = o.resolution // 8, 77, 768, 4
        config = costs.SD15_UNET_CONFIG
        batches = {"halve": batch, "prune": batch}
    # time_cond_proj_dim explicit: listed in diffusers' _use_default_values, from_config() in with_guidance_input
    # would set it back to None
    parent = UNet2DConditionModel.from_config(
        {**{k: v for k, v in config.items() if k != "_use_default_values"}, "time_cond_proj_dim": None})
    guided = guidance.with_guidance_input(parent, params.guidance.embedding_dim)
    del parent
    variant = params.prune.variant
    pruned = prune.compact_unet(guided, variant)[0] if variant != "none" else guided
    scheduler = vpred.v_scheduler(parts.build_sampling_scheduler(t).config, params.vpred.zero_terminal_snr)
    schedule = diffusion.Schedule.from_scheduler(scheduler)
    T = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(0)
    n = max(batches.values())
    posterior = torch.stack([torch.randn(n, channels, latent, latent, generator=gen),
                             torch.full((n, channels, latent, latent), 0.1)], dim=1)
    table = torch.randn(9, seq, width, generator=gen)
    prompt_index = torch.randint(0, 8, (n,), generator=gen)

    def latents(size: int) -> LatentBatches:  # synthetic latents in memory: the data cost is not timed
        return LatentBatches(n, size, 0.18215, table[-1],
                             lambda step, micro, idx: {"posterior": posterior[idx], "cond": table[prompt_index[idx]]})
    dev, rows = o.device, []

    def timed(stage: str, title: str, student, loss_of, timesteps, sp, size: int) -> None:
        batches = latents(size)
        draw = lambda: batches.draw_with_w(0, 0, gen, timesteps, sp.w_min, sp.w_max)  # noqa: E731
        label = f"train/{stage}/{shapes}/b{size}"
        m = session.measure(label, _train_step(student, loss_of, draw, sp.train, o), size)
        rows.append({"name": title, "shapes": shapes, "batch": size, "from": [label],
                     "ms_per_step": m.median * 1e3, "samples_per_s": size / m.median})

    # halve: round N learns one student step from two teacher DDIM steps (any N costs the same; N = 1 here)
    grid = halve.student_timesteps(scheduler, 1)
    pruned = pruned.to(dev).eval().requires_grad_(False)
    teacher = diffusion.unet_denoiser(pruned, schedule, "v_prediction")  # the first round's teacher: prune's output
    student = copy.deepcopy(pruned).train().requires_grad_(True)

    def halve_loss(batch):
        x, cond, ts, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        goal = halve.teacher_target(teacher, z, ts, cond, w, halve.teacher_path(ts, 1, 2, T), schedule)
        pred = diffusion.unet_denoiser(student, schedule, "v_prediction")(z, ts, cond, w)
        return F.mse_loss(pred.float(), goal.float())

    timed("halve", "halve round: 2 teacher DDIM steps + student fwd/bwd", student, halve_loss, grid,
          params.halve, batches["halve"])
    del teacher, student
    if variant == "none":
        return rows
    # prune: the BK-SDM student against its parent (output and feature KD; the task loss adds no model call)
    p = params.prune
    parent = guided.to(dev).eval().requires_grad_(False)
    student = copy.deepcopy(pruned).to(dev).train().requires_grad_(True)
    pairs = bk.feature_pairs(student, parent, variant)
    parent_tap = prune.FeatureTap({theirs: module for _, _, theirs, module in pairs})
    student_tap = prune.FeatureTap({mine: module for mine, module, _, _ in pairs})

    def prune_loss(batch):
        x, cond, ts, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        with torch.no_grad():
            goal = diffusion.unet_denoiser(parent, schedule, "v_prediction")(z, ts, cond, w)
        pred = diffusion.unet_denoiser(student, schedule, "v_prediction")(z, ts, cond, w).float()
        feat = sum(F.mse_loss(student_tap.features[mine].float(), parent_tap.features[theirs].float())
                   for mine, _, theirs, _ in pairs)
        return p.out_kd_weight * F.mse_loss(pred, goal.float()) + p.feat_kd_weight * feat

    try:
        timed("prune", f"prune ({variant}): parent fwd + student fwd/bwd, feature KD", student, prune_loss,
              torch.arange(T), p, batches["prune"])
    finally:
        parent_tap.close()
        student_tap.close()
    return rows


def project_sd15(mfu: float) -> dict:
    """A FLOP-based projection of the sd15 profile's training stages in A100-hours: samples x training FLOPs per
    sample (forward + backward = 3x forward, plus the frozen teacher's forwards) / (A100 bf16 peak x ``mfu``).
    Not a measurement: it leaves out data loading, the one-off encoding of the dataset, evaluation and checkpoints."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sd_distill.models import costs
    from sd_distill.models.parts import build_tiny_autoencoder
    from sd_distill.params import HALVING_STEPS, resolve

    params = resolve(NO_PARAMS_FILE, profile="sd15")
    arch = costs.ARCHS["sd15"]
    resolution = params.prepare.resolution
    latent = resolution // _vae_factor(arch.vae)
    variant = params.prune.variant
    with torch.device("meta"):
        unet = {key: UNet2DConditionModel.from_config(_unet_config(arch, v, dim)) for key, v, dim in (
            ("teacher", "none", None), ("guided", "none", params.guidance.embedding_dim),
            ("pruned", variant, params.guidance.embedding_dim))}
        f = {key: 2 * costs.unet_macs(u, latent, latent)["macs_total"] for key, u in unet.items()}
        tiny = build_tiny_autoencoder(arch.vae, params.decoder.arch)
        f["decoder"] = 2 * costs.decoder_macs(AutoencoderKL.from_config(arch.vae), latent, latent)["macs_total"]
        f["tiny_decoder"] = 2 * costs.decoder_macs(tiny, latent, latent)["macs_total"]
        image = torch.zeros(1, 3, resolution, resolution)
        f["tiny_encoder"] = _flops(lambda: tiny.encode(image))
    h = params.halve
    teacher_steps = {n: 2 if h.mode == "progressive" else h.steps_from // n for n in HALVING_STEPS}
    stages = [  # (stage, train params, FLOPs per sample, what they are)
        ("vpred", params.vpred.train, 3 * f["teacher"] + (f["teacher"] if params.vpred.targets == "teacher" else 0),
         "3 x UNet + teacher UNet"),
        ("guidance", params.guidance.train, 3 * f["guided"] + 2 * f["teacher"],
         "3 x guided UNet + CFG teacher (2 calls)"),
        *([("prune", params.prune.train, 3 * f["pruned"] + f["guided"], f"3 x BK {variant} + guided parent")]
          if variant != "none" else []),
        *[(f"halve@{n}", h.train_for(n), (3 + teacher_steps[n]) * f["pruned"],
           f"3 x student + {teacher_steps[n]} teacher steps") for n in HALVING_STEPS],
        ("decoder", params.decoder.train, f["decoder"] + 3 * (f["tiny_decoder"] + f["tiny_encoder"]),
         "full decode + 3 x tiny decode and encode"),
    ]
    rate = A100_BF16_TFLOPS * 1e12 * mfu
    rows = []
    for name, tp, per, what in stages:
        samples = tp.steps * tp.batch_size * tp.grad_accum
        rows.append({"stage": name, "steps": tp.steps, "batch": tp.batch_size * tp.grad_accum, "samples": samples,
                     "flops_per_sample": per, "flops_per_sample_is": what, "flops": samples * per,
                     "a100_hours": samples * per / rate / 3600})
    total = sum(r["a100_hours"] for r in rows)
    return {"kind": "FLOP-based projection, not a measurement", "profile": "sd15", "resolution": resolution,
            "a100_bf16_peak_tflops": A100_BF16_TFLOPS, "assumed_mfu": mfu, "rows": rows, "total_a100_hours": total,
            "published_a100_hours": [{"name": n, "a100_hours": v} for n, v in PUBLISHED_A100_HOURS],
            "not_counted": "the teacher stage (sd15 downloads SD v1.5), the one-off VAE/text encoding of the data, "
                           "the prune task loss and decoder critic (no extra UNet/VAE call), evaluation"}

