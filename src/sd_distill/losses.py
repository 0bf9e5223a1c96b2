"""Training losses as small named objects, called the same way by the stages, ``bench`` and the tests
(the style of EDM's ``training/loss.py``): each is a frozen dataclass holding its constants, called on tensors.

The one-step terms follow DMD2 as coded (Yin et al. 2024, tianweiy/DMD2 ``main/sd_guidance.py``):

- ``DistributionMatching``: the generator's gradient is the difference of the fake and the real score's
  denoised estimates (x0), normalised per sample by the mean absolute distance of the real estimate from the
  sample (DMD's adaptive weight), applied through ``0.5 * MSE(x, sg(x - grad))`` so that d loss / d x is
  ``grad / numel``. Comparisons are in x0 whatever the networks predict.
- ``GeneratorGAN`` / ``DiscriminatorGAN``: the non-saturating logistic losses of a diffusion GAN,
  ``softplus(-D(fake))`` and ``softplus(D(fake)) + softplus(-D(real))``, means over the batch.
- ``Denoising``: MSE to a target: the guidance and halving students' regression onto their teacher's v
  (MSE on v = (1 + SNR)-weighted MSE on x, Salimans & Ho 2022 sec. 4) and the fake score's loss.

The other stages' losses:

- ``MinSNRDenoising``: the teacher's and vpred's per-sample MSE weighted by Min-SNR-gamma (Hang et al. 2023).
- ``VAELoss``: reconstruction MSE plus a small KL toward N(0, I) (Rombach et al. 2022, sec. 3).
- ``BKDistillation``: BK-SDM's task + output-KD + feature-KD sum (Kim et al. 2023, eq. 1-3).
- ``DecoderDistillation``: TAESD-style decoder MSE to the VAE's decode plus the encoder's latent MSE.
- ``HingeGAN``: hinge losses (Lim & Ye 2017) of the decoder's optional critic, both halves in one backward.
- ``SnapFusionDistillation``: SnapFusion's step-distillation objective (Li et al. 2023, eq. 11), the distillation
  MSE plus a share of the plain denoising loss whose weight follows the distillation loss' size.

Each returns the loss to step on, or (loss, the terms a run logs); the stages, ``bench`` and the tests call these,
so a number pinned in a test is the number a stage trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from sd_distill.diffusion import min_snr_weight


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


@dataclass(frozen=True, eq=False)
class MinSNRDenoising:
    """Per-sample MSE of ``pred`` to ``target`` (float32), weighted by Min-SNR-gamma at the samples' timesteps
    ``t`` (``diffusion.min_snr_weight``; ``gamma=None``: weight 1). Returns (loss, the unweighted mean MSE)."""

    alphas_cumprod: torch.Tensor
    gamma: float | None
    prediction_type: str

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = min_snr_weight(self.alphas_cumprod, t.cpu(), self.gamma, self.prediction_type)
        return (per_sample * weights.to(per_sample.device)).mean(), per_sample.mean()


@dataclass(frozen=True)
class VAELoss:
    """Reconstruction MSE (float32) + ``kl_weight`` x the posterior's mean KL to N(0, I); returns (loss, mse, kl)."""

    kl_weight: float

    def __call__(self, recon: torch.Tensor, x: torch.Tensor, posterior) -> tuple[torch.Tensor, ...]:
        mse = F.mse_loss(recon.float(), x)
        kl = posterior.kl().mean()
        return mse + self.kl_weight * kl, mse, kl


@dataclass(frozen=True)
class BKDistillation:
    """BK-SDM's objective: ``task_weight`` x the task loss (the student's v on its first rows against the data's
    v; 0 without them) + ``out_kd_weight`` x MSE to the parent's output + ``feat_kd_weight`` x the sum over the
    paired blocks of their outputs' MSE. Returns (loss, {"task", "out_kd", "feat_kd"})."""

    task_weight: float
    out_kd_weight: float
    feat_kd_weight: float

    def __call__(self, pred: torch.Tensor, goal: torch.Tensor, features: list[tuple[torch.Tensor, torch.Tensor]],
                 task_pred: torch.Tensor | None = None, task_target: torch.Tensor | None = None):
        pred = pred.float()
        out_kd = F.mse_loss(pred, goal.float())
        feat_kd = sum(F.mse_loss(mine.float(), theirs.float()) for mine, theirs in features)
        task = F.mse_loss(task_pred.float(), task_target.float()) if task_pred is not None else pred.new_zeros(())
        loss = self.task_weight * task + self.out_kd_weight * out_kd + self.feat_kd_weight * feat_kd
        return loss, {"task": task, "out_kd": out_kd, "feat_kd": feat_kd}


@dataclass(frozen=True)
class DecoderDistillation:
    """The tiny autoencoder's objective: MSE of its decode to the VAE's decode of the same latents + ``encoder_weight``
    x MSE of its encoding to the VAE's (scaled) posterior mean, float32. Returns (loss, decoder mse, encoder mse)."""

    encoder_weight: float

    def __call__(self, decoded: torch.Tensor, goal: torch.Tensor, encoded: torch.Tensor, goal_latents: torch.Tensor):
        dec = F.mse_loss(decoded.float(), goal)
        enc = F.mse_loss(encoded.float(), goal_latents)
        return dec + self.encoder_weight * enc, dec, enc


@dataclass(frozen=True)
class HingeGAN:
    """Hinge GAN losses (Lim & Ye 2017) in one backward pass: (critic loss, generator loss).

    The critic loss sees detached images, so it trains only the critic; the generator loss runs the critic with
    detached weights, so it trains only the generator. The shared loop's one optimizer can then step both (one
    learning-rate schedule and one gradient-norm clip over both)."""

    margin: float = 1.0

    def __call__(self, critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor):
        d_loss = F.relu(self.margin - critic(real.detach())).mean() + F.relu(self.margin + critic(fake.detach())).mean()
        frozen = {name: w.detach() for name, w in critic.named_parameters()}
        g_loss = -functional_call(critic, frozen, (fake,)).mean()
        return d_loss, g_loss


@dataclass(frozen=True)
class SnapFusionDistillation:
    """L = L_dstl + gamma L_ori (SnapFusion, Li et al. 2023, eq. 11): ``L_dstl`` the v-MSE of the student's
    (CFG-combined or conditional) prediction to its teacher's target, ``L_ori`` the v-MSE of the student's conditional
    prediction to the data's v. The paper calls gamma "dynamic" and scales it to the distillation loss without a
    formula; here gamma = ``ori_weight`` x sg(L_dstl) / sg(L_ori), so L_ori adds ``ori_weight`` times the distillation
    loss' value and its gradient direction. Returns (loss, {"dstl", "ori"})."""

    ori_weight: float
    eps: float = 1e-12

    def __call__(self, pred: torch.Tensor, goal: torch.Tensor, cond_pred: torch.Tensor, data_v: torch.Tensor):
        dstl = F.mse_loss(pred.float(), goal.float())
        if self.ori_weight == 0:
            return dstl, {"dstl": dstl, "ori": dstl.new_zeros(())}
        ori = F.mse_loss(cond_pred.float(), data_v.float())
        gamma = self.ori_weight * dstl.detach() / (ori.detach() + self.eps)
        return dstl + gamma * ori, {"dstl": dstl, "ori": ori}
