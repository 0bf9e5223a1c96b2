"""Part 3 of ``sd-distill bench``: training throughput of a halving round and of the prune stage, and the FLOP-based
projection of a full sd15-profile run in A100-hours (``sd-distill plan``'s)."""

from __future__ import annotations

import copy
from collections.abc import Callable

from sd_distill.bench.timing import NO_PARAMS_FILE, Options, Session, _torch_dtype


def _train_step(model, loss_of: Callable, draw: Callable, tp, o: Options) -> Callable[[], None]:
    """One optimizer step as ``training.loop.train`` takes it: loss (autocast unless float32), backward, gradient
    clipping, the loop's optimizer, EMA; gradient checkpointing where the stage's params turn it on."""
    import torch
    from diffusers.training_utils import EMAModel

    from sd_distill.training.loop import build_optimizer, gradient_checkpointing

    gradient_checkpointing(model, tp, "bench")
    opt = build_optimizer(model, tp, "bench")
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
    from diffusers import UNet2DConditionModel

    from sd_distill import diffusion
    from sd_distill.data.latents import LatentBatches
    from sd_distill.losses import BKDistillation, Denoising
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
        return Denoising()(diffusion.unet_denoiser(student, schedule, "v_prediction")(z, ts, cond, w), goal)

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

    objective = BKDistillation(p.task_weight, p.out_kd_weight, p.feat_kd_weight)

    def prune_loss(batch):  # the task share adds no model call: left out
        x, cond, ts, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        with torch.no_grad():
            goal = diffusion.unet_denoiser(parent, schedule, "v_prediction")(z, ts, cond, w)
        pred = diffusion.unet_denoiser(student, schedule, "v_prediction")(z, ts, cond, w)
        return objective(pred, goal, prune.tapped_pairs(student_tap, parent_tap, pairs))[0]

    try:
        timed("prune", f"prune ({variant}): parent fwd + student fwd/bwd, feature KD", student, prune_loss,
              torch.arange(T), p, batches["prune"])
    finally:
        parent_tap.close()
        student_tap.close()
    return rows


def project_sd15(mfu: float) -> dict:
    """``sd-distill plan``'s FLOP-based projection of the sd15 profile's training stages on an A100-80GB at ``mfu``
    (``plan.plan`` without the memory estimate, which ``sd-distill plan`` adds)."""
    from sd_distill import plan
    from sd_distill.params import resolve

    return plan.plan(resolve(NO_PARAMS_FILE, profile="sd15"), "a100-80gb", mfu, with_memory=False)
