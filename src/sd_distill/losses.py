"""Training losses as small named objects, called the same way by the stages, ``bench`` and the tests
(the style of EDM's ``training/loss.py``): each is a frozen dataclass holding its constants, called on tensors.

The one-step terms follow DMD2 as coded (Yin et al. 2024, tianweiy/DMD2 ``main/sd_guidance.py``):

- ``DistributionMatching``: the generator's gradient is the difference of the fake and the real score's
  denoised estimates (x0), normalised per sample by the mean absolute distance of the real estimate from the
  sample (DMD's adaptive weight), applied through ``0.5 * MSE(x, sg(x - grad))`` so that d loss / d x is
  ``grad / numel``. Comparisons are in x0 whatever the networks predict.
- ``GeneratorGAN`` / ``DiscriminatorGAN``: the non-saturating logistic losses of a diffusion GAN,
  ``softplus(-D(fake))`` and ``softplus(D(fake)) + softplus(-D(real))``, means over the batch.
- ``Denoising``: MSE to a target (the v of the v-prediction stages), the fake score's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DistributionMatching:
    """DMD2's distribution-matching loss on generator samples ``x`` given the real and fake x0 estimates at the
    same noised point. ``eps`` guards the normaliser (FastGen adds 1e-6); non-finite gradients become 0 as DMD2's
    ``nan_to_num``."""

    eps: float = 1e-6

    def gradient(self, x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
        """(fake - real) / mean_{C,H,W} |x - real|, per sample, in float32 and without a graph."""
        x, x0_real, x0_fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
        scale = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        return torch.nan_to_num((x0_fake - x0_real) / (scale + self.eps))

    def __call__(self, x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
        grad = self.gradient(x, x0_real, x0_fake)
        return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad))


@dataclass(frozen=True)
class GeneratorGAN:
    """Non-saturating generator loss: mean softplus(-logits of the generated samples) (log 2 at zero logits)."""

    def __call__(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(-fake_logits.float()).mean()


@dataclass(frozen=True)
class DiscriminatorGAN:
    """Logistic discriminator loss: mean softplus(fake logits) + mean softplus(-real logits) (2 log 2 at zero)."""

    def __call__(self, fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


@dataclass(frozen=True)
class Denoising:
    """Mean squared error of a prediction to its target, in float32 (v-MSE = (1 + SNR)-weighted x-MSE)."""

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred.float(), target.float())
