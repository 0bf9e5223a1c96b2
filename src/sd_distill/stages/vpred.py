"""Stage ``vpred``: fine-tune the teacher into a v-prediction model (Salimans & Ho 2022, sec. 4 and appendix D).

Progressive distillation is unstable in epsilon form at few steps: at low SNR an epsilon model's x estimate
(z - sigma eps) / alpha blows up. The teacher of any prediction type (``epsilon``, ``sample``,
``v_prediction``) is fine-tuned into a v model. With ``targets: teacher`` (the default) the target is the
teacher's own prediction converted to v on the same betas, so the v model keeps the teacher's behaviour,
guidance response included; with ``targets: data`` it is the v of the training data, which the option
``zero_terminal_snr`` needs (betas rescaled to zero terminal SNR, Lin et al. 2024, "Common Diffusion Noise
Schedules and Sample Steps are Flawed", alg. 1, so one-step sampling starts from pure noise as at inference,
where the teacher has no prediction to convert). A teacher already in v form on the requested schedule is
copied through. Output ``models/vpred/``: a stock pipeline folder whose DDIM scheduler
has ``prediction_type=v_prediction`` and trailing timestep spacing.
"""

from __future__ import annotations

import copy
import logging

import torch
from diffusers import DDIMScheduler

from sd_distill import diffusion
from sd_distill.data import latents as latent_data
from sd_distill.losses import MinSNRDenoising
from sd_distill.models.parts import Needs, frozen, load_pipeline, pick_device
from sd_distill.params import BaseParams, VpredParams
from sd_distill.training import memory
from sd_distill.training.loop import MetricsFn, train

log = logging.getLogger(__name__)
# any prediction type converts to v; a w-conditioned UNet would come out with a guidance input it never learned
NEEDS = Needs(stage="vpred", producer="teacher", guidance_input=False, vae="AutoencoderKL")


def v_scheduler(config, zero_terminal_snr: bool) -> DDIMScheduler:
    """The teacher's betas as a v-prediction DDIM sampler with trailing spacing (Lin et al. 2024, sec. 3.3)."""
    return DDIMScheduler.from_config(config, prediction_type="v_prediction", timestep_spacing="trailing",
                                     rescale_betas_zero_snr=zero_terminal_snr, clip_sample=False, steps_offset=1)


def needs_finetune(scheduler_config, p: VpredParams) -> bool:
    same_type = scheduler_config.get("prediction_type") == "v_prediction"
    same_schedule = bool(scheduler_config.get("rescale_betas_zero_snr", False)) == p.zero_terminal_snr
    return not (same_type and same_schedule)


def to_vpred(pipe, latents, p: VpredParams, base: BaseParams, work, *, resume: bool = False,
             on_metrics: MetricsFn | None = None):
    """Fine-tune ``pipe.unet`` to predict v on the (possibly rescaled) schedule; returns the pipeline."""
    scheduler = v_scheduler(pipe.scheduler.config, p.zero_terminal_snr)
    if not needs_finetune(pipe.scheduler.config, p):
        log.info("vpred: the teacher already predicts v on this schedule; copied through")
        pipe.scheduler = scheduler
        return pipe
    schedule = diffusion.Schedule.from_scheduler(scheduler)
    T = scheduler.config.num_train_timesteps
    device = pick_device(base)
    teacher = teacher_unet = None
    if p.targets == "teacher":  # the same betas: the teacher's prediction, re-expressed as v, is the target
        teacher_unet = frozen(copy.deepcopy(pipe.unet), device, base.mixed_precision)
        teacher = diffusion.unet_denoiser(teacher_unet, schedule, pipe.scheduler.config.prediction_type)

    def batch_fn(step, micro, gen):
        x, cond, _ = latents.draw(step, micro, gen, p.caption_dropout)
        t = torch.randint(0, T, (len(x),), generator=gen)
        return x, cond, t, torch.randn(x.shape, generator=gen)

    objective = MinSNRDenoising(scheduler.alphas_cumprod, p.snr_gamma, "v_prediction")

    def loss_fn(model, batch, gen):
        dev = next(model.parameters()).device
        x, cond, t, noise = (b.to(dev) for b in batch)
        alpha, sigma = (a.to(dev) for a in schedule.alpha_sigma(t))
        z = alpha * x + sigma * noise
        if teacher is None:
            v = diffusion.target(x, noise, alpha, sigma, "v_prediction")
        else:
            with torch.no_grad():
                v = teacher(z, t, cond, None)
        loss, mse = objective(model(z, t, encoder_hidden_states=cond).sample, v, t)
        return loss, {"mse": mse.item()}

    def memory_needed():
        return memory.unet_stage_memory(pipe.unet, [teacher_unet, pipe.text_encoder], p.train, base.mixed_precision,
                                      pipe.unet.config.sample_size, latents.uncond.shape[0])

    cpu = device == "cpu"
    pipe.unet = train(pipe.unet.train().requires_grad_(True), loss_fn, batch_fn, p.train, work, seed=base.seed,
                      resume=resume, mixed_precision=base.mixed_precision, cpu=cpu, name="vpred",
                      on_metrics=on_metrics, memory=memory_needed).model.cpu()
    pipe.scheduler = scheduler
    return pipe


def main(ctx) -> None:
    p, base = ctx.params.vpred, ctx.params.base
    pipe = load_pipeline(ctx.inputs["teacher"], needs=NEEDS)
    ctx.summary["teacher_prediction_type_is_v"] = float(pipe.scheduler.config.prediction_type == "v_prediction")
    with latent_data.from_disk(ctx.inputs["latents"], pipe, "vpred", ctx.inputs["teacher"].name, p.train, base.seed,
                               pick_device(base)) as latents:
        pipe = to_vpred(pipe, latents, p, base, ctx.work, resume=ctx.resume, on_metrics=ctx.log_metrics)
    pipe.save_pretrained(ctx.outputs["model"], safe_serialization=True)
