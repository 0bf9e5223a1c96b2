"""Stage ``halve@N``: progressive distillation, one round (Salimans & Ho 2022, Algorithm 2; Meng et al. 2023,
stage two, with the guidance weight w as an input of teacher and student).

The teacher samples in 2N DDIM steps; the student, initialised from it, learns to land with ONE DDIM step
where the teacher lands with two, so it samples in N. Timesteps are the student's own trailing grid (what
``DDIMScheduler(timestep_spacing="trailing")`` visits for ``num_inference_steps=N``), each step going from t to
t - T // N exactly as ``DDIMScheduler.step`` does. The first teacher is ``models/pruned`` (the guided model itself when
``prune.variant`` is ``none``). With ``halve.mode: direct`` the teacher is always that first teacher
at ``FIRST_TEACHER_STEPS`` (64) steps and spans one student step with 64 / N of its steps (SnapFusion's direct
distillation), to measure what the multi-round chain accumulates. Output ``models/steps-N/``.

``distill_round`` also runs SnapFusion's chain (Li et al. 2023, sec. 4.2), which ``bench.one_step`` measures against
this one: the teacher is a v model WITHOUT a w input (``models/vpred``, no guidance stage), the student too, and it
is sampled with classifier-free guidance (two UNet calls per step). With ``halve.loss: cfg_aware``, a batch uses CFG
at w on both sides with probability ``cfg_prob`` (the teacher's two steps along the CFG-combined v and the student's
CFG-combined v against their target, eq. 10), else the conditional predictions (eq. 9), plus ``ori_weight`` of the
plain denoising loss (eq. 11, ``losses.SnapFusionDistillation``). In v-MSE, as the w-input chain, where the paper
weighs x-MSE by max(SNR, 1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from sd_distill import diffusion, registry
from sd_distill.data import latents as latent_data
from sd_distill.errors import UserError
from sd_distill.losses import Denoising, SnapFusionDistillation
from sd_distill.models.parts import (ModelError, Needs, check_pipeline, frozen, load_pipeline, pick_device,
                                    read_config, source_of)
from sd_distill.names import MODEL_CARD
from sd_distill.params import FIRST_TEACHER_STEPS, HALVING_STEPS, BaseParams, HalveParams
from sd_distill.training import memory
from sd_distill.training.loop import MetricsFn, train

log = logging.getLogger(__name__)


def student_timesteps(scheduler, steps: int) -> torch.Tensor:
    """The timesteps the stock DDIM pipeline visits for ``num_inference_steps=steps``."""
    probe = DDIMScheduler.from_config(scheduler.config)
    probe.set_timesteps(steps)
    return probe.timesteps.clone()


def teacher_path(t: torch.Tensor, student_steps: int, teacher_steps: int, T: int) -> list[torch.Tensor]:
    """Timesteps the teacher walks from t to the student's next point t - T // student_steps: teacher_steps /
    student_steps DDIM steps of T // teacher_steps each, the last one ending exactly on the student's target."""
    per = teacher_steps // student_steps
    stride = T // teacher_steps
    end = t - T // student_steps
    return [t - k * stride for k in range(1, per)] + [end]


@torch.no_grad()
def teacher_target(teacher: diffusion.Denoiser, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor,
                   path: list[torch.Tensor], schedule: diffusion.Schedule) -> torch.Tensor:
    """Run the teacher's DDIM steps along ``path`` from (z, t), then solve for the v that one student step needs."""
    z_s, s = z, t
    for nxt in path:
        z_s = diffusion.ddim_step(z_s, teacher(z_s, s, cond, w), s, nxt, schedule)
        s = nxt
    return diffusion.halving_target(z, t, z_s, s, schedule)


def distill_round(pipe, latents, student_steps: int, teacher_steps: int, p: HalveParams, base: BaseParams, work, *,
                  resume: bool = False, on_metrics: MetricsFn | None = None):
    """Train a ``student_steps`` sampler from ``pipe`` sampling in ``teacher_steps``; returns the student pipeline."""
    config = pipe.scheduler.config
    guided_input = pipe.unet.config.time_cond_proj_dim is not None
    if config.prediction_type != "v_prediction":
        raise ModelError(f"halve: the teacher, {source_of(pipe)}, must predict v: its scheduler's prediction_type is "
                         f"{config.prediction_type!r}, expected 'v_prediction'")
    if guided_input and p.loss == "cfg_aware":
        raise UserError(CFG_AWARE_IN_DAG)
    if teacher_steps % student_steps:
        raise ValueError(f"halve: teacher_steps={teacher_steps} is not a multiple of student_steps={student_steps}")
    schedule = diffusion.Schedule.from_scheduler(pipe.scheduler)
    T = config.num_train_timesteps
    grid = student_timesteps(pipe.scheduler, student_steps)
    device = pick_device(base)
    student = pipe.unet.__class__.from_config(pipe.unet.config)
    student.load_state_dict(pipe.unet.state_dict())  # the fp32 weights, before the teacher's cast
    teacher_unet = frozen(pipe.unet, device, base.mixed_precision)
    teacher = diffusion.unet_denoiser(teacher_unet, schedule, "v_prediction")
    tp = p.train_for(student_steps)

    def batch_fn(step, micro, gen):
        batch = latents.draw_with_w(step, micro, gen, grid, p.w_min, p.w_max)
        if guided_input:
            return batch
        # SnapFusion's chain: this batch uses CFG with probability cfg_prob (eq. 11's P ~ U[0, 1] < p); a 0-d
        # tensor, which the loop's out-of-memory split hands to every piece of the batch
        use_cfg = p.loss == "cfg_aware" and bool(torch.rand((), generator=gen) < p.cfg_prob)
        return (*batch, torch.tensor(use_cfg))

    def loss_fn(model, batch, gen):
        dev = next(model.parameters()).device
        if not guided_input:
            *tensors, use_cfg = batch
            return snapfusion_loss(model, tensors, bool(use_cfg), dev)
        x, cond, t, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        goal = teacher_target(teacher, z, t, cond, w, teacher_path(t, student_steps, teacher_steps, T), schedule)
        pred = diffusion.unet_denoiser(model, schedule, "v_prediction")(z, t, cond, w)
        # MSE on v = (1 + SNR)-weighted MSE on x (Salimans & Ho 2022, sec. 4, "SNR+1" weighting)
        return Denoising()(pred, goal), {}

    snapfusion = SnapFusionDistillation(p.ori_weight)

    def snapfusion_loss(model, batch, use_cfg: bool, dev):
        x, cond, t, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        path = teacher_path(t, student_steps, teacher_steps, T)
        student = diffusion.unet_denoiser(model, schedule, "v_prediction")
        if use_cfg:  # eq. 10: the CFG-combined v on both sides, at the batch's w
            pair = (cond, latents.uncond.to(dev, cond.dtype).expand_as(cond))
            goal = teacher_target(diffusion.cfg(teacher), z, t, pair, w, path, schedule)
            v_c, v_u = student(torch.cat([z, z]), torch.cat([t, t]), torch.cat(pair)).chunk(2)
            wv = w.to(dev, z.dtype).view(-1, 1, 1, 1)
            pred = (1 + wv) * v_c - wv * v_u
        else:  # eq. 9: the conditional predictions
            goal = teacher_target(teacher, z, t, cond, None, path, schedule)
            pred = v_c = student(z, t, cond)
        loss, terms = snapfusion(pred, goal, v_c, diffusion.target(x, noise, alpha, sigma, "v_prediction"))
        return loss, {"cfg": float(use_cfg), **{k: float(v.detach()) for k, v in terms.items()}}

    def memory_needed():
        return memory.unet_stage_memory(student, [teacher_unet, pipe.text_encoder], tp, base.mixed_precision,
                                      student.config.sample_size, latents.uncond.shape[0])

    student = train(student.train(), loss_fn, batch_fn, tp, work, seed=base.seed, resume=resume,
                    mixed_precision=base.mixed_precision, cpu=device == "cpu", name=f"halve@{student_steps}",
                    on_metrics=on_metrics, memory=memory_needed).model
    pipe.unet = student.cpu()
    return pipe


CFG_AWARE_IN_DAG = ("halve.loss is cfg_aware: SnapFusion's loss trains a student WITHOUT a w input, sampled with "
                    "classifier-free guidance, and the halving rounds of dvc.yaml distil the w-input model "
                    "(models/pruned); set halve.loss: plain, and measure SnapFusion's chain from models/vpred with "
                    "`python -m sd_distill.bench.one_step --parts snapfusion`")


def round_student_steps(stage_name: str) -> int:
    return int(stage_name.split("@")[1])


def check_card(folder: Path, steps: int | None, stage: str, producer: str) -> None:
    """``folder``'s model card must say it samples in ``steps`` steps; ``steps=None``: the folder is the first
    teacher (the pruned or guided model), not step-distilled, so it has no card."""
    card = Path(folder) / MODEL_CARD
    run = f"`sd-distill run {producer}`"
    if steps is None:
        if card.is_file():
            found = read_config(card).get("num_inference_steps")
            raise ModelError(f"{stage}: {card}: num_inference_steps is {found!r}, expected no {MODEL_CARD} (the first "
                             f"teacher is the undistilled {producer} model); {run} writes it")
        return
    if not card.is_file():
        raise ModelError(f"{stage}: {card}: missing, expected one with num_inference_steps={steps} (a {steps}-step "
                         f"model); {run} writes it")
    found = read_config(card).get("num_inference_steps")
    if found != steps:
        raise ModelError(f"{stage}: {card}: num_inference_steps is {found!r}, expected {steps}; {run} writes a "
                         f"{steps}-step model")


def teacher_needs(stage: str, producer: str) -> Needs:
    return Needs(stage=stage, producer=producer, prediction_type="v_prediction", guidance_input=True,
                 vae="AutoencoderKL")


def main(ctx) -> None:
    p: HalveParams = ctx.params.halve
    if p.loss == "cfg_aware":
        raise UserError(CFG_AWARE_IN_DAG)
    n = round_student_steps(ctx.stage.name)
    first = p.mode == "direct" or n == HALVING_STEPS[0]  # the first teacher: prune's output
    if p.mode == "direct":
        source = ctx.root / registry.get(f"halve@{HALVING_STEPS[0]}").inputs["teacher"]
        teacher_steps = FIRST_TEACHER_STEPS
    else:
        source = ctx.inputs["teacher"]
        teacher_steps = 2 * n
    producer = "prune" if first else f"halve@{teacher_steps}"
    needs = teacher_needs(ctx.stage.name, producer)
    check_pipeline(source, needs)
    check_card(source, None if first else teacher_steps, ctx.stage.name, producer)
    pipe = load_pipeline(source, needs=needs)
    base = ctx.params.base
    with latent_data.from_disk(ctx.inputs["latents"], pipe, ctx.stage.name, source.name,
                               p.train_for(n), base.seed, pick_device(base)) as latents:
        pipe = distill_round(pipe, latents, n, teacher_steps, p, base, ctx.work, resume=ctx.resume,
                             on_metrics=ctx.log_metrics)
    out = ctx.outputs["model"]
    pipe.save_pretrained(out, safe_serialization=True)
    card = {"num_inference_steps": n, "guidance_scale_range": [1 + p.w_min, 1 + p.w_max], "mode": p.mode,
            "teacher": str(source.relative_to(ctx.root)), "teacher_steps": teacher_steps}
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    ctx.summary.update({"student_steps": n, "teacher_steps": teacher_steps})
