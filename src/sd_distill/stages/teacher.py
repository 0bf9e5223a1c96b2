"""Stage ``teacher``: the epsilon-prediction latent diffusion teacher every later stage distills from.

tiny/smoke: trained from scratch on the prepared digits out of Stable Diffusion's own parts (an
``AutoencoderKL`` trained first, a frozen CLIP text encoder with an offline tokenizer, an SD-shaped
``UNet2DConditionModel``), with caption dropout so classifier-free guidance works.
sd15: ``teacher.source`` (a hub id or a local diffusers folder) is loaded and saved as the same folder.
Output ``models/teacher/``: a stock ``StableDiffusionPipeline`` folder (safetensors).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sd_distill import diffusion
from sd_distill.data.latents import encode_images, in_memory, to_model_range
from sd_distill.data.shards import Split, read_split
from sd_distill.diffusion import Schedule
from sd_distill.losses import MinSNRDenoising, VAELoss
from sd_distill.models import parts
from sd_distill.models.parts import count_parameters, pick_device
from sd_distill.models.tokenizer import build_tokenizer
from sd_distill.params import BaseParams, TeacherParams
from sd_distill.training.loop import MetricsFn, train

log = logging.getLogger(__name__)


def train_teacher(data: Split, p: TeacherParams, base: BaseParams, work: Path, *, resume: bool = False,
                  on_metrics: MetricsFn | None = None):
    """Train VAE, then UNet, on ``data`` (N, H, W, 3 uint8 + captions); returns a ``StableDiffusionPipeline``."""
    device = pick_device(base)
    cpu = device == "cpu"
    seed = base.seed
    torch.manual_seed(seed)
    images = to_model_range(data.images)  # (N, 3, H, W) in [-1, 1]
    n = len(images)

    tokenizer = build_tokenizer(data.captions, p.text_encoder.max_length)
    text_encoder = parts.build_text_encoder(p.text_encoder, tokenizer).eval().requires_grad_(False)

    # 1. the autoencoder (Rombach et al. 2022, sec. 3: reconstruction + a small KL toward N(0, I))
    vae = parts.build_vae(p.vae)

    def vae_batch(step, micro, gen):
        return images[torch.randint(0, n, (p.vae_train.batch_size,), generator=gen)]

    vae_objective = VAELoss(p.kl_weight)

    def vae_loss(model, x, gen):
        x = x.to(next(model.parameters()).device)
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample(generator=None if x.is_cuda else gen)).sample
        loss, mse, kl = vae_objective(recon, x, posterior)
        return loss, {"mse": mse.item(), "kl": kl.item()}

    vae = train(vae, vae_loss, vae_batch, p.vae_train, work / "vae", seed=seed, resume=resume,
                mixed_precision=base.mixed_precision, cpu=cpu, name="vae", on_metrics=on_metrics).model
    vae.requires_grad_(False)

    # 2. SD's scaling factor makes the latents unit variance; then cache posteriors and prompt embeddings
    mean, std = encode_images(vae, images)
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    latents = in_memory(vae, tokenizer, text_encoder, data.images, data.captions, p.unet_train.batch_size)
    log.info("teacher: VAE latents %s, scaling_factor %.4f", tuple(mean.shape[1:]), latents.scaling)

    # 3. the UNet on scaled-linear betas, caption dropout for CFG (Ho & Salimans 2022)
    unet = parts.build_unet(p.unet, sample_size=mean.shape[-1], in_channels=mean.shape[1],
                            cross_attention_dim=p.text_encoder.hidden_size)
    noise_scheduler = parts.build_noise_scheduler(p)
    schedule = Schedule.from_scheduler(noise_scheduler)
    objective = MinSNRDenoising(noise_scheduler.alphas_cumprod, p.snr_gamma, p.prediction_type)

    def unet_batch(step, micro, gen):
        x, cond, _ = latents.draw(step, micro, gen, p.caption_dropout)
        t = torch.randint(0, p.num_train_timesteps, (len(x),), generator=gen)
        return x, cond, t, torch.randn(x.shape, generator=gen)

    def unet_loss(model, batch, gen):
        dev = next(model.parameters()).device
        x, cond, t, noise = (b.to(dev) for b in batch)
        alpha, sigma = (a.to(dev) for a in schedule.alpha_sigma(t))
        pred = model(alpha * x + sigma * noise, t, encoder_hidden_states=cond).sample
        loss, mse = objective(pred, diffusion.target(x, noise, alpha, sigma, p.prediction_type), t)
        return loss, {"mse": mse.item()}

    unet = train(unet, unet_loss, unet_batch, p.unet_train, work / "unet", seed=seed, resume=resume,
                 mixed_precision=base.mixed_precision, cpu=cpu, name="unet", on_metrics=on_metrics).model

    return parts.assemble(vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu(), parts.build_sampling_scheduler(p))


def fetch_teacher(source: str):
    """sd15: a hub id (its safetensors files are downloaded) or a local diffusers folder (checked like every model
    folder: safetensors only, no pickle-bearing file), loaded as a ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    if Path(source).exists():
        if not (Path(source) / "model_index.json").is_file():
            raise parts.MissingModel(f"teacher.source: {source} is a path but holds no model_index.json")
        return parts.load_pipeline(source)
    parts.quiet_loading_bars()
    try:
        return StableDiffusionPipeline.from_pretrained(
            source, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    except parts.LOAD_ERRORS as exc:
        raise parts.ModelError(f"teacher.source: {source!r} cannot be loaded from the hub as a safetensors "
                               f"StableDiffusionPipeline ({type(exc).__name__}: "
                               f"{(str(exc).strip().splitlines() or [''])[0][:300]})") from None


def main(ctx) -> None:
    p: TeacherParams = ctx.params.teacher
    if p.source:
        pipe = fetch_teacher(p.source)
    else:
        train_split = read_split(ctx.inputs["data"], "train")
        pipe = train_teacher(train_split, p, ctx.params.base, ctx.work, resume=ctx.resume,
                             on_metrics=ctx.log_metrics)
    pipe.save_pretrained(ctx.outputs["model"], safe_serialization=True)
    ctx.summary["unet_parameters"] = count_parameters(pipe.unet)
    ctx.summary["vae_parameters"] = count_parameters(pipe.vae)
    ctx.summary["text_encoder_parameters"] = count_parameters(pipe.text_encoder)
