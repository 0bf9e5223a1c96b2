"""The denoiser as a callable and the small wrappers step distillation needs.

Notation (Salimans & Ho 2022, sec. 2): ``z_t = alpha_t x + sigma_t eps`` with ``alpha_t^2 = alphas_cumprod[t]``
and ``sigma_t^2 = 1 - alpha_t^2``; ``v = alpha_t eps - sigma_t x``. Every denoiser here returns ``v``;
conversions from ``epsilon`` and ``sample`` predictions are thin functions. Tensors are latents
(B, C, H, W); timesteps are integer indices into the training schedule (B,).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# D(z_t, t, cond, w) -> v ; w is the guidance weight (None for models without a guidance input)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """alpha/sigma lookups for a DDPM/DDIM schedule; ``final_alpha_cumprod`` is used for t < 0 (DDIM's last step)."""

    alphas_cumprod: torch.Tensor  # (T,) float64
    final_alpha_cumprod: float

    @classmethod
    def from_scheduler(cls, scheduler) -> "Schedule":
        final = getattr(scheduler, "final_alpha_cumprod", scheduler.alphas_cumprod[0])
        return cls(scheduler.alphas_cumprod.double(), float(final))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) int timesteps (may be < 0) -> alpha, sigma as (B, 1, 1, 1) float32."""
        t = t.long().cpu()
        a2 = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.tensor(self.final_alpha_cumprod,
                                                                                     dtype=torch.float64))
        alpha, sigma = a2.sqrt(), (1 - a2).clamp(min=0).sqrt()
        return alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)


class WBatch(NamedTuple):
    """A batch of the w-conditioned stages on one device, with its noised latents z_t = alpha x + sigma eps."""

    x: torch.Tensor
    cond: torch.Tensor
    t: torch.Tensor
    w: torch.Tensor
    noise: torch.Tensor
    z: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor


def noised_w_batch(batch, schedule: Schedule, device) -> WBatch:
    """``LatentBatches.draw_with_w``'s (x, cond, t, w, noise) moved to ``device``, plus z_t, alpha_t and sigma_t."""
    x, cond, t, w, noise = (b.to(device) for b in batch)
    alpha, sigma = (a.to(device) for a in schedule.alpha_sigma(t))
    return WBatch(x, cond, t, w, noise, alpha * x + sigma * noise, alpha, sigma)


def to_x_eps(pred: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
             prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A model output of any prediction type -> (x, eps) (DDIM, Song et al. 2021, eq. 12)."""
    if prediction_type == "epsilon":
        return (z - sigma * pred) / alpha, pred
    if prediction_type == "sample":
        return pred, (z - alpha * pred) / sigma
    if prediction_type == "v_prediction":
        return alpha * z - sigma * pred, sigma * z + alpha * pred
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, found {prediction_type!r}")


def target(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
           prediction_type: str) -> torch.Tensor:
    """The regression target of a model of ``prediction_type`` for clean ``x`` and noise ``eps``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x  # Salimans & Ho 2022, eq. (5) / appendix D
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, found {prediction_type!r}")


def ddim_step(z: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Deterministic DDIM update z_t -> z_s from a v prediction (eta = 0), as ``DDIMScheduler.step`` does it."""
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    x, eps = to_x_eps(v, z, a_t, s_t, "v_prediction")
    return a_s * x + s_s * eps


def halving_target(z_t: torch.Tensor, t: torch.Tensor, z_s: torch.Tensor, s: torch.Tensor,
                   schedule: Schedule) -> torch.Tensor:
    """The v a student must predict at z_t so that ONE DDIM step t -> s lands on z_s (the teacher's two steps).

    Salimans & Ho 2022, Algorithm 2: x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),
    then expressed as v with eps~ = (z_t - alpha_t x~) / sigma_t.
    """
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    ratio = s_s / s_t
    x = (z_s - ratio * z_t) / (a_s - ratio * a_t)
    eps = (z_t - a_t * x) / s_t
    return a_t * eps - s_t * x


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 10 and its v/x forms): min(SNR, gamma) divided by
    SNR for an epsilon target, by SNR + 1 for a v target, by 1 for an x (``sample``) target."""
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    a = alphas_cumprod[t].float()
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Fourier features of the guidance weight w (B,) -> (B, dim), exactly as
    ``StableDiffusionPipeline.get_guidance_scale_embedding`` feeds ``time_cond_proj_dim`` UNets (Meng et al. 2023)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float().cpu(), embedding_dim=dim)


def unet_denoiser(unet, schedule: Schedule, prediction_type: str) -> Denoiser:
    """Wrap a ``UNet2DConditionModel`` as D(z, t, cond, w) -> v; ``w`` reaches it only if it has ``time_cond_proj_dim``."""
    dim = unet.config.time_cond_proj_dim

    def D(z, t, cond, w=None):
        cond_emb = None
        if dim is not None:
            if w is None:
                raise ValueError("this UNet has a guidance input (time_cond_proj_dim); pass w")
            cond_emb = guidance_embedding(w, dim).to(z.device, z.dtype)
        out = unet(z, t.to(z.device), encoder_hidden_states=cond, timestep_cond=cond_emb).sample
        if prediction_type == "v_prediction":
            return out
        a, s = schedule.alpha_sigma(t)
        x, eps = to_x_eps(out, z, a.to(z.device), s.to(z.device), prediction_type)
        return a.to(z.device) * eps - s.to(z.device) * x

    return D


def cfg(D: Denoiser) -> Denoiser:
    """Classifier-free guidance as a wrapper (Ho & Salimans 2022): (1 + w) D(cond) - w D(uncond), one batched call.

    ``cond`` is a pair (cond, uncond) of (B, L, E) embeddings; ``w`` = guidance_scale - 1 (diffusers convention).
    """

    def guided(z, t, cond, w):
        c, u = cond
        both = D(torch.cat([z, z]), torch.cat([t, t]), torch.cat([c, u]), None)
        v_c, v_u = both.chunk(2)
        w = w.to(z.device, z.dtype).view(-1, 1, 1, 1)
        return (1 + w) * v_c - w * v_u

    return guided
