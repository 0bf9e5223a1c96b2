"""Stage ``prune``: BK-SDM block removal with distillation (Kim et al. 2023), applied to the guided model.

The compact UNet is the parent's config with the variant's blocks removed (``models.bk``: base, small, tiny),
initialised with the kept blocks' weights, so it keeps the guidance input (``time_cond_proj_dim``). It learns
from the parent with BK-SDM's three losses, each weighted in params:

- task: the denoising loss on the data, v = alpha * eps - sigma * x. The parent is w-conditioned and the data's
  v is the right target only for w = 0 (the conditional model), so a ``task_share`` of every batch is drawn at
  w = 0 and the task loss applies to those samples;
- output KD: MSE to the parent's output for the same (z, t, prompt, w);
- feature KD: MSE between the features at the end of every kept stage (the last block before any resampling,
  see ``bk.stage_features``) of student and parent, summed over stages.

``variant: none`` copies the guided model through unchanged. Output ``models/pruned/`` (+ ``prune.json``).
"""

from __future__ import annotations

import json
import logging
import shutil

import torch
from diffusers import UNet2DConditionModel

from sd_distill import diffusion
from sd_distill.data import latents as latent_data
from sd_distill.losses import BKDistillation
from sd_distill.models import bk
from sd_distill.models.parts import (ModelError, Needs, check_pipeline, count_parameters, frozen, load_pipeline,
                                     pick_device, source_of)
from sd_distill.names import PARAMS_RECORD
from sd_distill.params import BaseParams, PruneParams
from sd_distill.training import memory
from sd_distill.training.loop import MetricsFn, train

log = logging.getLogger(__name__)
MODEL_CARD = "prune.json"
NEEDS = Needs(stage="prune", producer="guidance", prediction_type="v_prediction", guidance_input=True,
              vae="AutoencoderKL")


def compact_unet(parent: UNet2DConditionModel, variant: str) -> tuple[UNet2DConditionModel, dict[str, list[str]]]:
    """The variant's compact UNet with every kept block copied from ``parent``; also the copy report."""
    try:
        config = bk.compact_config(dict(parent.config), variant)
    except bk.VariantError as exc:
        raise bk.VariantError(f"prune.variant={variant}: {exc}; the parent UNet cannot lose these blocks "
                              "(choose another variant, or none)") from None
    student = UNet2DConditionModel.from_config(config)
    with torch.no_grad():
        report = bk.copy_kept_weights(student, parent, variant)
    return student, report


class FeatureTap:
    """Forward hooks that keep the latest output of each named module (tuples: their first element)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._keep(name)) for name, m in modules.items()]

    def _keep(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.features[name] = getattr(out, "sample", out)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def tapped_pairs(student: FeatureTap, parent: FeatureTap, pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student feature, parent feature) of each ``bk.feature_pairs`` pair, as the last forward passes left them."""
    return [(student.features[mine], parent.features[theirs]) for mine, _, theirs, _ in pairs]


def distill_compact(pipe, latents, p: PruneParams, base: BaseParams, work, *, resume: bool = False,
                    on_metrics: MetricsFn | None = None):
    """Train the ``p.variant`` compact UNet of ``pipe`` (the guided model); returns (pipeline, summary)."""
    config = pipe.scheduler.config
    dim = pipe.unet.config.time_cond_proj_dim
    if config.prediction_type != "v_prediction" or dim is None:
        raise ModelError(f"prune: {source_of(pipe)} must be the guided model (w-conditioned, predicting v): its "
                         f"scheduler's prediction_type is {config.prediction_type!r} and its UNet's time_cond_proj_dim "
                         f"is {dim}, expected 'v_prediction' and an integer; `sd-distill run guidance` writes such a "
                         "model")
    schedule = diffusion.Schedule.from_scheduler(pipe.scheduler)
    device = pick_device(base)
    student, copy_report = compact_unet(pipe.unet, p.variant)  # copied from the fp32 weights, before the cast
    parent = frozen(pipe.unet, device, base.mixed_precision)
    log.info("prune: %s keeps %d tensors from the parent, %d start fresh", p.variant, len(copy_report["copied"]),
             len(copy_report["fresh"]))
    pairs = bk.feature_pairs(student, parent, p.variant)
    parent_tap = FeatureTap({theirs: module for _, _, theirs, module in pairs})
    student_tap = FeatureTap({mine: module for mine, module, _, _ in pairs})
    every_t = torch.arange(config.num_train_timesteps)
    n_task = round(p.task_share * p.train.batch_size)

    def batch_fn(step, micro, gen):
        x, cond, t, w, noise = latents.draw_with_w(step, micro, gen, every_t, p.w_min, p.w_max)
        w[:n_task] = 0.0  # the task-loss share: the conditional model, whose target the data gives
        return x, cond, t, w, noise

    objective = BKDistillation(p.task_weight, p.out_kd_weight, p.feat_kd_weight)

    def loss_fn(model, batch, gen):
        dev = next(model.parameters()).device
        x, cond, t, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        with torch.no_grad():
            goal = diffusion.unet_denoiser(parent, schedule, "v_prediction")(z, t, cond, w)
        pred = diffusion.unet_denoiser(model, schedule, "v_prediction")(z, t, cond, w)
        task = (pred[:n_task], diffusion.target(x, noise, alpha, sigma, "v_prediction")[:n_task]) if n_task else ()
        loss, terms = objective(pred, goal, tapped_pairs(student_tap, parent_tap, pairs), *task)
        return loss, {k: v.item() for k, v in terms.items()}

    def memory_needed():
        return memory.unet_stage_memory(student, [parent, pipe.text_encoder], p.train, base.mixed_precision,
                                      student.config.sample_size, latents.uncond.shape[0])

    try:
        student = train(student.train(), loss_fn, batch_fn, p.train, work, seed=base.seed, resume=resume,
                        mixed_precision=base.mixed_precision, cpu=device == "cpu", name="prune",
                        on_metrics=on_metrics, memory=memory_needed).model
    finally:
        parent_tap.close()
        student_tap.close()
    summary = {"parent_parameters": count_parameters(parent), "unet_parameters": count_parameters(student),
               "copied_tensors": len(copy_report["copied"]), "fresh_tensors": len(copy_report["fresh"]),
               "kd_stages": len(pairs)}
    pipe.unet = student.cpu()
    return pipe, summary


def main(ctx) -> None:
    p: PruneParams = ctx.params.prune
    out = ctx.outputs["model"]
    check_pipeline(ctx.inputs["guided"], NEEDS)
    if p.variant == "none":
        shutil.copytree(ctx.inputs["guided"], out, ignore=shutil.ignore_patterns(PARAMS_RECORD))
        n = count_parameters(load_pipeline(out).unet)
        summary = {"parent_parameters": n, "unet_parameters": n}
    else:
        pipe = load_pipeline(ctx.inputs["guided"], needs=NEEDS)
        base = ctx.params.base
        with latent_data.from_disk(ctx.inputs["latents"], pipe, "prune", ctx.inputs["guided"].name, p.train, base.seed,
                                   pick_device(base)) as latents:
            pipe, summary = distill_compact(pipe, latents, p, base, ctx.work, resume=ctx.resume,
                                            on_metrics=ctx.log_metrics)
        pipe.save_pretrained(out, safe_serialization=True)
    summary["parameter_ratio"] = summary["unet_parameters"] / summary["parent_parameters"]
    (out / MODEL_CARD).write_text(json.dumps({"variant": p.variant, **summary}, indent=2))
    ctx.summary.update(summary)
