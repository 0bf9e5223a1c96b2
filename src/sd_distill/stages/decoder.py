"""Stage ``decoder``: a TAESD-style tiny autoencoder distilled from the teacher's VAE (output distillation).

The student is a diffusers ``AutoencoderTiny`` with TAESD's layout (``parts.build_tiny_autoencoder``) that works
in the UNet's *scaled* latent space (its ``scaling_factor`` is 1.0): the stock ``StableDiffusionPipeline`` decodes
``latents / vae.config.scaling_factor``, so ``pipe.vae = AutoencoderTiny.from_pretrained("models/decoder")``
decodes the UNet's latents directly, as ``madebyollin/taesd`` does for SD. For a batch of training images x
in [-1, 1], with sf the teacher's scaling factor:

- decoder: MSE(tiny.decode(z), vae.decode(z / sf)) on z = sf * (a posterior sample of x) + ``latent_noise`` * n,
  so the tiny decoder copies the full decoder also on the imperfect latents a sampler makes;
- encoder: ``encoder_weight`` * MSE(tiny.encode(x), sf * posterior mean of x);
- adversarial (optional, as SDXS (Song et al. 2024) adds to its decoder distillation): a patch discriminator
  with hinge losses, the full decoder's images as real and the tiny decoder's as fake. The discriminator trains in
  the same module, optimizer and backward pass as the student (see ``losses.HingeGAN``), so checkpoints and
  ``--resume`` hold it too; ``adversarial_weight`` weighs both halves, and the logged ``decoder/loss`` is their sum
  with the MSEs. Only the ``AutoencoderTiny`` is saved.

Held-out evaluation (``test`` split): PSNR of the tiny decoder against the full decoder on the same latents,
PSNR of both round trips (full encoder -> each decoder) against the images, parameter counts and the decode-time
ratio. Outputs ``models/decoder/`` (an ``AutoencoderTiny`` folder, safetensors) and ``reports/decoder.json``.
"""

from __future__ import annotations

import json
import logging
import statistics
from itertools import islice
from pathlib import Path

import numpy as np

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torchmetrics.functional.image import peak_signal_noise_ratio

from sd_distill.data.feed import KeyedRows, Prefetch, draw_indices
from sd_distill.data.latents import encode_images, to_model_range
from sd_distill.data.shards import PreparedImages, iter_split
from sd_distill.data.store import LatentsError, LatentStore, check_models
from sd_distill.losses import DecoderDistillation, HingeGAN
from sd_distill.models import parts
from sd_distill.models.parts import count_parameters, pick_device
from sd_distill.params import BaseParams, DecoderParams
from sd_distill.timing import measure, timer_for
from sd_distill.training import memory
from sd_distill.training.loop import MetricsFn, train

log = logging.getLogger(__name__)
TIMING_WARMUP = 2
TIMING_REPEATS = 7


class TinyWithCritic(torch.nn.Module):
    """What the shared loop trains: the tiny autoencoder and, with the adversarial loss on, its discriminator.

    One module, so the loop's optimizer, checkpoints and ``--resume`` cover the discriminator too; only ``tiny``
    is saved as the stage's output.
    """

    def __init__(self, tiny: AutoencoderTiny, critic: torch.nn.Module | None = None):
        super().__init__()
        self.tiny = tiny
        self.critic = critic


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB over a whole set of images in [-1, 1], compared in [0, 1]."""
    return float(peak_signal_noise_ratio((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2, data_range=1.0))


def _median_seconds(fn, device: str) -> float:
    return statistics.median(measure(fn, TIMING_WARMUP, TIMING_REPEATS, timer_for(device)))


def _count(*modules: torch.nn.Module | None) -> int:
    return sum(count_parameters(m) for m in modules)


@torch.no_grad()
def evaluate_decoder(vae: AutoencoderKL, tiny: AutoencoderTiny, images: torch.Tensor, batch: int, *,
                     timing: bool = True) -> dict:
    """Quality and cost of ``tiny`` against ``vae`` on (N, 3, H, W) images in [-1, 1], ``batch`` at a time.

    PSNRs are in dB over the whole set; the round trips start from the full encoder's posterior mean. Decode
    times are the median of several runs on one batch of latents after a warm-up (``timing=False`` skips them).
    """
    sf = vae.config.scaling_factor
    device = vae.device
    x = images.to(device)
    z = encode_images(vae, images, batch)[0].to(device) * sf  # the UNet's latents of these images
    full = _batched(lambda v: vae.decode(v / sf).sample, z, batch)
    small = _batched(lambda v: tiny.decode(v).sample, z, batch)
    small_rt = _batched(lambda v: tiny.decode(tiny.encode(v).latents).sample, x, batch)
    quality = {
        "psnr_tiny_vs_full": _psnr(small, full),
        "psnr_full_vs_real": _psnr(full, x),
        "psnr_tiny_vs_real": _psnr(small, x),
        "psnr_tiny_roundtrip_vs_real": _psnr(small_rt, x),  # tiny encoder -> tiny decoder
    }
    if not timing:
        return quality
    timed = z[:batch]
    full_s = _median_seconds(lambda: vae.decode(timed / sf), device.type)
    tiny_s = _median_seconds(lambda: tiny.decode(timed), device.type)
    return {
        **quality,
        "tiny_decoder_parameters": _count(tiny.decoder),
        "full_decoder_parameters": _count(vae.decoder, vae.post_quant_conv),
        "tiny_encoder_parameters": _count(tiny.encoder),
        "full_encoder_parameters": _count(vae.encoder, vae.quant_conv),
        "full_decode_seconds": full_s,
        "tiny_decode_seconds": tiny_s,
        "decode_speedup": full_s / tiny_s,
        "eval_images": len(x),
        "timing_batch": len(timed),
    }


class PosteriorsAndPixels:
    """Rows of the decoder's batches: posteriors from ``data/latents``, pixels from the prepared shards (a class, not
    a closure, so that DataLoader workers started by ``spawn`` can unpickle it)."""

    def __init__(self, store: LatentStore, pixels: PreparedImages):
        self.store, self.pixels = store, pixels

    def __call__(self, idx) -> dict[str, torch.Tensor]:
        return {"posterior": self.store.rows(idx)["posterior"], "pixels": torch.from_numpy(self.pixels.images(idx))}


def training_rows(latents: Path, data: Path, vae: AutoencoderKL, p: DecoderParams, seed: int) -> tuple[int, Prefetch]:
    """The train split's posteriors (``data/latents``, checked to come from ``vae``) and pixels (the prepared
    shards, by random access), read ahead for the loop: (samples, prefetch)."""
    store = LatentStore(latents)
    check_models(store.manifest, latents, "decoder", "the teacher", vae)
    pixels = PreparedImages(data, "train")
    if len(pixels) != len(store):
        raise LatentsError(f"decoder: {latents} holds {len(store)} train samples, {data} {len(pixels)}; the latents "
                           "were encoded from other prepared data. Rerun `sd-distill run encode`")

    rows = KeyedRows(PosteriorsAndPixels(store, pixels), len(store), p.train.batch_size, seed)
    prefetch = Prefetch(rows, p.train.steps, p.train.grad_accum, p.train.loader_workers, p.train.prefetch_batches,
                        pin=vae.device.type == "cuda", verifier=store.verifier, name="decoder")
    return len(store), prefetch


def distill_decoder(vae: AutoencoderKL, tiny: AutoencoderTiny, n: int, prefetch: Prefetch, p: DecoderParams,
                    base: BaseParams, work: Path, *, resume: bool = False, on_metrics: MetricsFn | None = None,
                    resolution: int | None = None) -> AutoencoderTiny:
    """Train ``tiny`` to copy ``vae`` (frozen, on its device) on ``n`` training samples whose posteriors and pixels
    ``prefetch`` reads (see ``training_rows``); returns it. ``resolution`` (the images' side in pixels) sizes the
    memory estimate checked on CUDA before step 1; the VAE's ``sample_size`` when not given.

    The VAE stays in float32 also under mixed precision (its 84 M parameters are 0.3 GB): the evaluation encodes
    with the same module, and autocast runs its convolutions in half precision anyway."""
    sf = vae.config.scaling_factor
    torch.manual_seed(base.seed)
    critic = parts.patch_discriminator(p.arch.channels) if p.adversarial_weight > 0 else None

    def batch_fn(step, micro, gen):
        idx = draw_indices(n, p.train.batch_size, gen)
        ahead, rows = prefetch.get(step, micro)
        if not torch.equal(ahead, idx):
            raise RuntimeError(f"decoder: the rows read ahead for step {step}, micro-batch {micro} are not the ones "
                               f"the loop drew (read ahead {ahead[:4].tolist()}…, drawn {idx[:4].tolist()}…)")
        mean, std = rows["posterior"][:, 0].float(), rows["posterior"][:, 1].float()
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        z = sf * sample + p.latent_noise * torch.randn(sample.shape, generator=gen)
        return to_model_range(rows["pixels"].numpy()), z, sf * mean

    objective, hinge = DecoderDistillation(p.encoder_weight), HingeGAN()

    def loss_fn(model, batch, gen):
        dev = next(model.parameters()).device
        x, z, goal_latents = (b.to(dev) for b in batch)
        with torch.no_grad():
            goal = vae.decode(z / sf).sample.float()
        fake = model.tiny.decode(z).sample.float()
        loss, dec, enc = objective(fake, goal, model.tiny.encode(x).latents, goal_latents)
        extra = {"decoder_mse": dec.item(), "encoder_mse": enc.item()}
        if model.critic is not None:
            d_loss, g_loss = hinge(model.critic, goal, fake)
            loss = loss + p.adversarial_weight * (g_loss + d_loss)
            extra.update(critic_hinge=d_loss.item(), generator_hinge=g_loss.item())
        return loss, extra

    model = TinyWithCritic(tiny, critic)

    def memory_needed():
        acts = memory.tiny_activations(tiny, resolution or vae.config.sample_size,
                                       p.arch.channels if critic is not None else None, base.mixed_precision)
        return memory.estimate(count_parameters(model, trainable_only=True), memory.module_bytes(vae), p.train,
                               base.mixed_precision, acts)

    trained = train(model, loss_fn, batch_fn, p.train, work, seed=base.seed, resume=resume,
                    mixed_precision=base.mixed_precision, cpu=vae.device.type == "cpu", name="decoder",
                    on_metrics=on_metrics, memory=memory_needed).model
    return trained.tiny


def load_teacher_vae(teacher: Path) -> AutoencoderKL:
    """The teacher pipeline's ``vae/`` (safetensors only; an ``AutoencoderTiny`` there is refused)."""
    parts.refuse_pickles(teacher)
    return parts.load_model(AutoencoderKL, Path(teacher) / "vae", producer="teacher")


def main(ctx) -> None:
    p: DecoderParams = ctx.params.decoder
    device = pick_device(ctx.params.base)
    vae = load_teacher_vae(ctx.inputs["teacher"]).to(device).eval().requires_grad_(False)
    held_out = islice(iter_split(ctx.inputs["data"], "test"), p.eval_images)
    test_images = to_model_range(np.stack([s.image for s in held_out]))

    torch.manual_seed(ctx.params.base.seed)
    tiny = parts.build_tiny_autoencoder(dict(vae.config), p.arch).to(device).eval()
    baseline = evaluate_decoder(vae, tiny, test_images, p.train.batch_size, timing=False)["psnr_tiny_vs_full"]
    n, prefetch = training_rows(ctx.inputs["latents"], ctx.inputs["data"], vae, p, ctx.params.base.seed)
    try:
        tiny = distill_decoder(vae, tiny, n, prefetch, p, ctx.params.base, ctx.work, resume=ctx.resume,
                               on_metrics=ctx.log_metrics, resolution=test_images.shape[-1])
    finally:
        prefetch.close()
    prefetch.finish()
    metrics = {**evaluate_decoder(vae, tiny, test_images, p.train.batch_size),
               "psnr_tiny_vs_full_untrained": baseline}
    log.info("decoder: PSNR %.2f dB vs the full decoder (untrained %.2f), %.1fx faster decode",
             metrics["psnr_tiny_vs_full"], baseline, metrics["decode_speedup"])

    tiny.cpu().save_pretrained(ctx.outputs["model"], safe_serialization=True)
    ctx.outputs["metrics"].write_text(json.dumps(metrics, indent=2))
    ctx.summary.update(metrics)
