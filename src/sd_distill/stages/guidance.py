"""Stage ``guidance``: distill classifier-free guidance into a w-conditioned model (Meng et al. 2023, stage one).

The student is the v-model with a guidance-weight input: ``UNet2DConditionModel(time_cond_proj_dim=...)``
fed the Fourier features of w that ``StableDiffusionPipeline.get_guidance_scale_embedding`` computes (the
stock pipeline passes w = guidance_scale - 1 and then makes one UNet call per step, no CFG batch). It learns
the teacher's guided output (1 + w) v_cond - w v_uncond (Meng et al. 2023, eq. 6, in v form) for
w ~ U[w_min, w_max] and t ~ U{0..T-1}. The new projection starts at zero, so the student starts as the
teacher's conditional model. Output ``models/guided/``.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from sd_distill import diffusion
from sd_distill.data import latents as latent_data
from sd_distill.losses import Denoising
from sd_distill.models.parts import ModelError, Needs, frozen, load_pipeline, pick_device, source_of
from sd_distill.params import BaseParams, GuidanceParams
from sd_distill.training import memory
from sd_distill.training.loop import MetricsFn, train

NEEDS = Needs(stage="guidance", producer="vpred", prediction_type="v_prediction", guidance_input=False,
              vae="AutoencoderKL")


def with_guidance_input(unet: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """A copy of ``unet`` with a zero-initialised guidance projection of width ``dim``."""
    student = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"guidance: weight copy mismatch: missing={missing} unexpected={unexpected}, expected "
                           "missing=['time_embedding.cond_proj.weight'] unexpected=[]")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def distill_guidance(pipe, latents, p: GuidanceParams, base: BaseParams, work, *, resume: bool = False,
                     on_metrics: MetricsFn | None = None):
    """Train the w-conditioned student of ``pipe`` (a v-prediction pipeline); returns the new pipeline."""
    found, dim = pipe.scheduler.config.prediction_type, pipe.unet.config.time_cond_proj_dim
    if found != "v_prediction":
        raise ModelError(f"guidance: {source_of(pipe)} must predict v: its scheduler's prediction_type is {found!r}, "
                         "expected 'v_prediction'; `sd-distill run vpred` writes such a model")
    if dim is not None:
        raise ModelError(f"guidance: {source_of(pipe)} already has a guidance input: its UNet's time_cond_proj_dim is "
                         f"{dim}, expected null; `sd-distill run vpred` writes such a model")
    schedule = diffusion.Schedule.from_scheduler(pipe.scheduler)
    T = pipe.scheduler.config.num_train_timesteps
    device = pick_device(base)
    student = with_guidance_input(pipe.unet, p.embedding_dim)  # copied from the fp32 weights, before the cast
    teacher = frozen(pipe.unet, device, base.mixed_precision)
    guided = diffusion.cfg(diffusion.unet_denoiser(teacher, schedule, "v_prediction"))
    uncond = latents.uncond

    every_t = torch.arange(T)

    def batch_fn(step, micro, gen):
        return latents.draw_with_w(step, micro, gen, every_t, p.w_min, p.w_max)

    def loss_fn(model, batch, gen):
        dev = next(model.parameters()).device
        x, cond, t, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        with torch.no_grad():
            goal = guided(z, t, (cond, uncond.to(dev).expand_as(cond)), w)
        pred = diffusion.unet_denoiser(model, schedule, "v_prediction")(z, t, cond, w)
        return Denoising()(pred, goal), {}

    def memory_needed():
        return memory.unet_stage_memory(student, [teacher, pipe.text_encoder], p.train, base.mixed_precision,
                                      student.config.sample_size, uncond.shape[0])

    student = train(student, loss_fn, batch_fn, p.train, work, seed=base.seed, resume=resume,
                    mixed_precision=base.mixed_precision, cpu=device == "cpu", name="guidance",
                    on_metrics=on_metrics, memory=memory_needed).model
    pipe.unet = student.cpu()
    return pipe


def main(ctx) -> None:
    p, base = ctx.params.guidance, ctx.params.base
    pipe = load_pipeline(ctx.inputs["vpred"], needs=NEEDS)
    with latent_data.from_disk(ctx.inputs["latents"], pipe, "guidance", ctx.inputs["vpred"].name, p.train, base.seed,
                               pick_device(base)) as latents:
        pipe = distill_guidance(pipe, latents, p, base, ctx.work, resume=ctx.resume, on_metrics=ctx.log_metrics)
    pipe.save_pretrained(ctx.outputs["model"], safe_serialization=True)
    ctx.summary["time_cond_proj_dim"] = ctx.params.guidance.embedding_dim
