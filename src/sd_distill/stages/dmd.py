"""Stage ``dmd``: a one-step student refined by distribution matching and a diffusion GAN (DMD2, Yin et al. 2024;
tianweiy/DMD2 ``main/sd_guidance.py``, ``main/train_sd.py``), after ``halve@1``.

Three networks train or serve together:

- the **generator** G, initialised from ``models/steps-1`` (w input kept), samples in one DDIM step from pure noise at
  the student's own timestep (999, trailing): x = DDIM(z, G(z, 999, c, w), 999 -> end), as the stock pipeline does;
- the **real score**, frozen: the guidance-free v model (``models/vpred``) with classifier-free guidance at the
  generator's w (``real_score: cfg``, two calls), or the w-input model (``models/guided``, one call);
- the **fake score**, a w-conditioned v model initialised from ``models/pruned`` or ``models/guided``, trained by
  denoising on detached generator samples; its deepest encoder feature carries the critic head (``models.critic``).

One loop step updates the fake score and the head; the generator also updates on the steps ``UpdateSchedule`` names
(after ``fake_warmup`` fake-only steps, every ``update_ratio``-th). All three live in one module trained by the one
loop, each term's gradient reaching only its own network (the generator's GAN gradient is taken with respect to
its samples, so the critic is not trained to help it), so the checkpoints hold every network, the optimizer and the
step: a resumed run ends with the weights of an uninterrupted one on CPU. w ~ U[w_min, w_max] per sample, the same
for generator, real and fake. Output ``models/dmd/``: the steps-1 folder with the new UNet (same config).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sd_distill import diffusion
from sd_distill.data import latents as latent_data
from sd_distill.errors import UserError
from sd_distill.losses import Denoising, DiscriminatorGAN, DistributionMatching, GeneratorGAN
from sd_distill.models import critic as critic_lib
from sd_distill.models.parts import (Needs, check_pipeline, count_parameters, frozen, load_pipeline, pick_device,
                                     read_config)
from sd_distill.names import MODEL_CARD
from sd_distill.params import BaseParams, DMDParams
from sd_distill.stages.halve import check_card, student_timesteps, teacher_needs
from sd_distill.training import memory
from sd_distill.training.loop import MetricsFn, train

log = logging.getLogger(__name__)
REAL_NEEDS = {
    "cfg": Needs(stage="dmd", producer="vpred", prediction_type="v_prediction", guidance_input=False),
    "guided": Needs(stage="dmd", producer="guidance", prediction_type="v_prediction", guidance_input=True),
}


@dataclass(frozen=True)
class UpdateSchedule:
    """Which loop steps (0-based) also update the generator: ``warmup`` fake-only steps, then every ``ratio``-th
    step starting with the first after the warmup (DMD2 ``train_sd.py``: ``step % dfake_gen_update_ratio == 0``)."""

    warmup: int
    ratio: int

    def generator_step(self, step: int) -> bool:
        return step >= self.warmup and (step - self.warmup) % self.ratio == 0


class Nets(nn.Module):
    """What the loop trains: the generator, the fake score and the critic head (one module, one optimizer)."""

    _supports_gradient_checkpointing = True  # through its two UNets' own (the head is a few convolutions)

    def __init__(self, generator: nn.Module, fake: nn.Module, head: nn.Module, generator_lr: float | None = None):
        super().__init__()
        self.generator, self.fake, self.head = generator, fake, head
        self.generator_lr = generator_lr

    def optimizer_groups(self, lr: float) -> list[dict]:
        """The loop's AdamW groups: the generator at ``generator_lr`` (None: ``lr``), the fake score and head at
        ``lr``."""
        rest = [p for name, p in self.named_parameters() if not name.startswith("generator.")]
        return [{"params": list(self.generator.parameters()), "lr": self.generator_lr or lr}, {"params": rest, "lr": lr}]

    def enable_gradient_checkpointing(self) -> None:
        self.generator.enable_gradient_checkpointing()
        self.fake.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.generator.disable_gradient_checkpointing()
        self.fake.disable_gradient_checkpointing()

    def critic(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(B, 1) logits of noised latents z_t from the fake score's deepest encoder feature."""
        w_emb = diffusion.guidance_embedding(w, self.fake.config.time_cond_proj_dim).to(z.device, z.dtype)
        return self.head(critic_lib.encoder_features(self.fake, z, t.to(z.device), cond, w_emb))


def x0_of(v: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return diffusion.to_x_eps(v, z, alpha, sigma, "v_prediction")[0]


class Objective:
    """The loss of one loop step on ``Nets`` (see the module docstring); returns (loss, logged terms)."""

    def __init__(self, p: DMDParams, schedule: diffusion.Schedule, student_t: int, end_t: int,
                 real: diffusion.Denoiser, uncond: torch.Tensor):
        self.p, self.schedule, self.uncond = p, schedule, uncond
        # the real score: classifier-free guidance around the guidance-free model, or the w-input model as is
        self.real = diffusion.cfg(real) if p.real_score == "cfg" else real
        self.student_t, self.end_t = student_t, end_t  # the generator's one DDIM step: student_t -> end_t
        self.updates = UpdateSchedule(p.fake_warmup, p.update_ratio)
        self.dm, self.gen_gan, self.disc_gan, self.denoise = (DistributionMatching(), GeneratorGAN(),
                                                               DiscriminatorGAN(), Denoising())

    def noised(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        alpha, sigma = (a.to(x.device) for a in self.schedule.alpha_sigma(t))
        return alpha * x + sigma * noise, alpha, sigma

    def real_x0(self, z, t, cond, w, alpha, sigma) -> torch.Tensor:
        c = (cond, self.uncond.to(cond.device, cond.dtype).expand_as(cond)) if self.p.real_score == "cfg" else cond
        return x0_of(self.real(z, t, c, w), z, alpha, sigma)

    def __call__(self, nets: Nets, batch: dict, gen: torch.Generator):
        p = self.p
        dev = next(nets.parameters()).device
        b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        cond, w, z = b["cond"], b["w"], b["gen_noise"]
        n = len(z)
        t_gen = torch.full((n,), self.student_t, dtype=torch.long)
        G = diffusion.unet_denoiser(nets.generator, self.schedule, "v_prediction")
        fake = diffusion.unet_denoiser(nets.fake, self.schedule, "v_prediction")
        train_generator = self.updates.generator_step(b["step"])
        with torch.set_grad_enabled(train_generator):
            x = diffusion.ddim_step(z, G(z, t_gen, cond, w), t_gen, torch.full_like(t_gen, self.end_t), self.schedule)
        loss = torch.zeros((), device=dev)
        terms: dict[str, float] = {}
        if train_generator:
            if p.objective in ("both", "dm"):
                with torch.no_grad():
                    z_t, alpha, sigma = self.noised(x.detach(), b["dm_t"], b["dm_noise"])
                    x0_real = self.real_x0(z_t, b["dm_t"], cond, w, alpha, sigma)
                    x0_fake = x0_of(fake(z_t, b["dm_t"], cond, w), z_t, alpha, sigma)
                dm = self.dm(x, x0_real, x0_fake)
                loss = loss + p.dm_weight * dm
                terms["dm"] = float(dm.detach())
            if p.objective in ("both", "gan"):
                z_t, _, _ = self.noised(x, b["gan_fake_t"], b["gan_fake_noise"])
                probe = z_t.detach().requires_grad_(True)
                g_gan = self.gen_gan(nets.critic(probe, b["gan_fake_t"], cond, w))
                (grad,) = torch.autograd.grad(g_gan, probe)  # the critic's parameters get no gradient from it
                surrogate = (z_t * grad).sum()
                loss = loss + p.gen_gan_weight * (surrogate - surrogate.detach() + g_gan.detach())
                terms["gen_gan"] = float(g_gan.detach())
        # the fake score's and the critic's turn, on detached samples
        sample = x.detach()
        z_t, alpha, sigma = self.noised(sample, b["fake_t"], b["fake_noise"])
        fake_loss = self.denoise(fake(z_t, b["fake_t"], cond, w), diffusion.target(sample, b["fake_noise"], alpha,
                                                                                   sigma, "v_prediction"))
        loss = loss + fake_loss
        terms["fake"] = float(fake_loss.detach())
        if p.objective in ("both", "gan"):
            z_fake, _, _ = self.noised(sample, b["gan_fake_t"], b["gan_fake_noise"])
            z_real, _, _ = self.noised(b["real"], b["gan_real_t"], b["gan_real_noise"])
            fake_logits = nets.critic(z_fake, b["gan_fake_t"], cond, w)
            real_logits = nets.critic(z_real, b["gan_real_t"], cond, w)
            disc = self.disc_gan(fake_logits, real_logits)
            loss = loss + p.disc_gan_weight * disc
            terms.update({"disc": float(disc.detach()),  # DMD2 logs these as pred_realism_on_real / _on_fake
                          "p_real_on_real": float(torch.sigmoid(real_logits.detach()).mean()),
                          "p_real_on_fake": float(torch.sigmoid(fake_logits.detach()).mean())})
        terms.update({"sample_mean": float(sample.mean()), "sample_std": float(sample.std())})
        return loss, terms


def draw(latents, p: DMDParams, T: int, step: int, micro: int, gen: torch.Generator) -> dict:
    """One micro-batch from the loop's generator: real latents and their captions (also the generator's prompts),
    w, the generator's noise, and the timesteps and noise of each loss term, in a fixed order."""
    x, cond, _ = latents.draw(step, micro, gen)
    n = len(x)
    w = p.w_min + (p.w_max - p.w_min) * torch.rand(n, generator=gen)
    out = {"step": step, "real": x, "cond": cond, "w": w,
           "gen_noise": torch.randn(x.shape, generator=gen)}
    for name, lo, hi in (("dm", p.dm_t_min, p.dm_t_max + 1), ("fake", 0, T), ("gan_fake", 0, p.gan_t_max),
                         ("gan_real", 0, p.gan_t_max)):
        out[f"{name}_t"] = torch.randint(lo, hi, (n,), generator=gen)
        out[f"{name}_noise"] = torch.randn(x.shape, generator=gen)
    return out


def check_steps(p: DMDParams, T: int, card: dict, source: Path) -> None:
    """The stage's timestep ranges must fit the schedule, and its w range the generator's."""
    for key in ("dm_t_max", "gan_t_max"):
        if getattr(p, key) > T:
            raise UserError(f"dmd.{key} is {getattr(p, key)}, beyond the schedule's {T} training timesteps")
    lo, hi = card.get("guidance_scale_range", [None, None])
    if lo is not None and not (lo <= 1 + p.w_min and 1 + p.w_max <= hi):
        raise UserError(f"dmd.w_min/w_max [{p.w_min}, {p.w_max}] (guidance scale [{1 + p.w_min}, {1 + p.w_max}]) is "
                        f"outside the range {source / MODEL_CARD} was trained for [{lo}, {hi}]")


def refine(generator_pipe, real_unet, fake_unet, latents, p: DMDParams, base: BaseParams, work, *,
           resume: bool = False, on_metrics: MetricsFn | None = None):
    """Train the DMD2 generator from ``generator_pipe`` (the one-step student); returns the pipeline with it."""
    sched = generator_pipe.scheduler
    schedule = diffusion.Schedule.from_scheduler(sched)
    T = sched.config.num_train_timesteps
    (student_t,) = student_timesteps(sched, 1).tolist()
    device = pick_device(base)
    for unet, role in ((generator_pipe.unet, "generator"), (fake_unet, "fake score")):
        critic_lib.check_plain_unet(unet, "dmd")
        if unet.config.time_cond_proj_dim is None:
            raise UserError(f"dmd: the {role} must have a guidance input (time_cond_proj_dim)")
    generator = generator_pipe.unet.__class__.from_config(generator_pipe.unet.config)
    generator.load_state_dict(generator_pipe.unet.state_dict())
    channels, side = critic_lib.deepest_geometry(fake_unet.config)
    torch.manual_seed(base.seed)  # the head's initial weights
    nets = Nets(generator, fake_unet, critic_lib.Head(channels, side), p.generator_learning_rate)
    real = frozen(real_unet, device, base.mixed_precision)
    # trailing one-step sampling goes from 999 to -1 (the final alpha), as DDIMScheduler.step does it
    objective = Objective(p, schedule, student_t, student_t - T,
                          diffusion.unet_denoiser(real, schedule, "v_prediction"), latents.uncond)
    log.info("dmd: %d steps, %d of them update the generator (warm-up %d, ratio %d), objective %s, real score %s, "
             "learning rate %g (generator %g)", p.train.steps, p.generator_updates(), p.fake_warmup, p.update_ratio,
             p.objective, p.real_score, p.train.learning_rate, p.generator_learning_rate or p.train.learning_rate)

    def memory_needed():  # activations: the generator's and about two fake-score passes (denoising, critic)
        latent, seq = generator.config.sample_size, latents.uncond.shape[0]
        acts = sum(k * memory.unet_activations(m.config, latent, seq, p.train.gradient_checkpointing,
                                               base.mixed_precision) for k, m in ((1, generator), (2, fake_unet)))
        return memory.estimate(count_parameters(nets, trainable_only=True),
                               memory.module_bytes(real, generator_pipe.text_encoder), p.train, base.mixed_precision,
                               acts)

    nets = train(nets.train(), objective, lambda step, micro, gen: draw(latents, p, T, step, micro, gen), p.train,
                 work, seed=base.seed, resume=resume, mixed_precision=base.mixed_precision, cpu=device == "cpu",
                 name="dmd", on_metrics=on_metrics, memory=memory_needed).model
    generator_pipe.unet = nets.generator.cpu()
    return generator_pipe


def load_networks(inputs: dict[str, Path], p: DMDParams):
    """The stage's three starting networks from its input folders (``inputs``: the registry's roles): the
    generator's pipeline (``models/steps-1``), the real score's and the fake score's UNets, and the generator's card;
    every folder is checked before a weight is read."""
    source = inputs["generator"]
    needs = teacher_needs("dmd", "halve@1")
    check_pipeline(source, needs)
    check_card(source, 1, "dmd", "halve@1")
    card = read_config(source / MODEL_CARD)
    pipe = load_pipeline(source, needs=needs)
    check_steps(p, pipe.scheduler.config.num_train_timesteps, card, source)
    real_dir = inputs["vpred" if p.real_score == "cfg" else "guided"]
    check_pipeline(real_dir, REAL_NEEDS[p.real_score])
    real_unet = load_pipeline(real_dir, needs=REAL_NEEDS[p.real_score]).unet
    fake_dir = inputs[p.fake_init]
    fake_needs = teacher_needs("dmd", "prune" if p.fake_init == "pruned" else "guidance")
    check_pipeline(fake_dir, fake_needs)
    fake_unet = load_pipeline(fake_dir, needs=fake_needs).unet
    return pipe, real_unet, fake_unet, card


def main(ctx) -> None:
    p: DMDParams = ctx.params.dmd
    base = ctx.params.base
    source = ctx.inputs["generator"]
    pipe, real_unet, fake_unet, card = load_networks(ctx.inputs, p)
    with latent_data.from_disk(ctx.inputs["latents"], pipe, "dmd", source.name, p.train, base.seed,
                               pick_device(base)) as latents:
        pipe = refine(pipe, real_unet, fake_unet, latents, p, base, ctx.work, resume=ctx.resume,
                      on_metrics=ctx.log_metrics)
    out = ctx.outputs["model"]
    pipe.save_pretrained(out, safe_serialization=True)
    card.update({"num_inference_steps": 1, "method": "dmd2", "objective": p.objective, "real_score": p.real_score,
                 "fake_init": p.fake_init, "generator_updates": p.generator_updates(),
                 "generator_init": str(source.relative_to(ctx.root)),
                 "guidance_scale_range": [1 + p.w_min, 1 + p.w_max]})
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    ctx.summary["generator_updates"] = p.generator_updates()
