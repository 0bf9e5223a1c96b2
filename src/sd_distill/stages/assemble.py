"""Stage ``assemble``: the product, ``models/student``, one stock ``StableDiffusionPipeline`` folder.

It joins a distilled UNet with the guidance input (pruned when ``prune.variant`` is not ``none``), the distilled
tiny decoder (``AutoencoderTiny``; ``assemble.decoder: full`` keeps the teacher's VAE), the teacher's text encoder
and tokenizer, and the student's DDIM scheduler (v_prediction, trailing spacing).
``StableDiffusionPipeline.from_pretrained("models/student")`` loads it offline and makes one UNet call per step;
``distill.json`` says how many steps, which guidance range it was trained for and where the UNet came from.

Which UNet (``assemble.source``): ``dmd`` (the DMD2 one-step model), ``steps-N`` (the N-step halving student),
or ``auto`` (the default): the one-step model, ``dmd`` or ``steps-1``, with the lower FID on the validation
split, measured here on ``select_images`` validation captions (one image each, seeds of their own, each folder's
own VAE: the teacher's in both) against those captions' own images: the digit classifier's features
for digits, the FID Inception (``assemble.inception``) otherwise. The test split, which ``evaluate`` reports on,
plays no part in the choice. Both figures are in the model card and in ``reports/report.md``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny

from sd_distill.data.shards import iter_split
from sd_distill.errors import UserError
from sd_distill.models.parts import (MissingModel, ModelError, Needs, assemble, check_pipeline, count_parameters,
                                     load_model, load_pipeline, name_source, pick_device)
from sd_distill.names import MODEL_CARD
from sd_distill.params import AssembleParams
from sd_distill.stages.halve import check_card, teacher_needs

log = logging.getLogger(__name__)
ONE_STEP = ("dmd", "steps-1")  # auto's candidates, in the order a tie is broken
SELECT_SEED_OFFSET = 900_001  # auto's sampling seeds differ from evaluate's (seed * 1_000_003 + i)


def producer(source: str) -> str:
    """The stage that writes ``models/<source>`` (``dmd`` or ``halve@N``)."""
    return "dmd" if source == "dmd" else f"halve@{source.split('-')[1]}"


def source_steps(source: str) -> int:
    return 1 if source == "dmd" else int(source.split("-")[1])


def validation_pairs(data: Path, n: int) -> tuple[list[str], np.ndarray]:
    """The captions of the first ``n`` validation samples (cycled when the split has fewer) and the split's
    images among them ((min(n, split), H, W, 3) uint8, each once)."""
    samples = list(itertools.islice(iter_split(data, "val"), n))
    if len(samples) < 2:
        raise UserError(f"assemble.source=auto: {data} has {len(samples)} validation sample(s), FID needs at least "
                        "2; prepare more data or set assemble.source to dmd or steps-N")
    captions = [s.caption for s in itertools.islice(itertools.cycle(samples), n)]
    return captions, np.stack([s.image for s in samples])


def feature_extractor(data: Path, p: AssembleParams, device: str) -> tuple[torch.nn.Module, str]:
    """The digit classifier's features when the prepared data have one, else the FID Inception file."""
    if (data / "classifier" / "config.json").is_file():
        from sd_distill.models.classifier import DigitClassifier, FeatureExtractor
        from sd_distill.scoring import DIGIT_FEATURES

        return FeatureExtractor(DigitClassifier.load(data / "classifier")).to(device), DIGIT_FEATURES
    from sd_distill.scoring import INCEPTION_FILE, load_inception, need_path

    what = INCEPTION_FILE + " (or set assemble.source to dmd or steps-N to skip the measurement)"
    path = need_path(p.inception, "assemble.inception", what)
    return load_inception(p.inception, device, key="assemble.inception"), f"Inception pool3 ({path.name})"


@torch.no_grad()
def validation_fid(folder: Path, captions: list[str], real: np.ndarray, extractor, p: AssembleParams, seed: int,
                   device: str) -> float:
    """FID of ``folder``'s one-step samples of ``captions`` against the validation images ``real``."""
    from sd_distill.scoring import fid_metric, nchw
    from sd_distill.stages.evaluate import sample

    metric = fid_metric(extractor, device=device)
    for i in range(0, len(real), p.batch_size):
        metric.update(nchw(real[i:i + p.batch_size]).to(device), real=True)
    pipe = load_pipeline(folder, device)
    seeds = [seed * 1_000_003 + SELECT_SEED_OFFSET + i for i in range(len(captions))]

    def consume(start: int, images: np.ndarray) -> None:
        if images.shape[1:] != real.shape[1:]:
            raise ModelError(f"assemble: {folder} samples {images.shape[1]}x{images.shape[2]} images, the validation "
                             f"images are {real.shape[1]}x{real.shape[2]}; the model was not trained on these data")
        metric.update(nchw(images).to(device), real=False)

    sample(pipe, captions, seeds, 1, p.guidance, p.batch_size, consume)
    return float(metric.compute())


def choose(p: AssembleParams, inputs: dict[str, Path], seed: int, device: str) -> tuple[str, dict | None]:
    """``assemble.source``, or for ``auto`` the one-step model with the lower validation FID and the figures."""
    if p.source != "auto":
        return p.source, None
    for name in ONE_STEP:
        needs = teacher_needs("assemble", producer(name))
        check_pipeline(inputs[name], needs)
        check_card(inputs[name], 1, "assemble", producer(name))
    captions, real = validation_pairs(inputs["data"], p.select_images)
    extractor, features = feature_extractor(inputs["data"], p, device)
    fids = {name: validation_fid(inputs[name], captions, real, extractor, p, seed, device) for name in ONE_STEP}
    broken = [name for name, value in fids.items() if not math.isfinite(value)]
    if broken:
        raise ModelError(f"assemble.source=auto: the validation FID of {', '.join(broken)} is not finite ({fids}); "
                         "raise assemble.select_images or name the model in assemble.source")
    chosen = min(ONE_STEP, key=lambda name: fids[name])  # min keeps the first of equals: dmd on a tie
    for name in ONE_STEP:
        log.info("assemble: %-8s validation FID %.4f%s", name, fids[name], "  <- chosen" if name == chosen else "")
    return chosen, {"metric": "fid", "split": "val", "features": features, "images": len(captions),
                    "real_images": len(real), "guidance_scale": p.guidance, "fid": fids}


def build_student(source: str, source_dir, teacher_dir, decoder_dir, p: AssembleParams):
    """The assembled pipeline and its model card."""
    steps, needs = source_steps(source), teacher_needs("assemble", producer(source))
    check_pipeline(source_dir, needs)
    check_card(source_dir, steps, "assemble", producer(source))
    model = load_pipeline(source_dir, needs=needs)
    if p.decoder == "tiny":
        if not (decoder_dir / "config.json").is_file():
            raise MissingModel(f"{decoder_dir}: no AutoencoderTiny folder (config.json); run `sd-distill run "
                               "decoder` first, or set assemble.decoder=full")
        vae = load_model(AutoencoderTiny, decoder_dir, producer="decoder")
        name_source(vae, decoder_dir.name)
    else:
        vae = load_pipeline(teacher_dir, needs=Needs(stage="assemble", producer="teacher", vae="AutoencoderKL")).vae
    pipe = assemble(vae, model.text_encoder, model.tokenizer, model.unet, model.scheduler)
    card = json.loads((source_dir / MODEL_CARD).read_text())
    card.update({
        "decoder": p.decoder,
        "decoder_class": type(vae).__name__,
        "guidance_scale": p.guidance,
        "unet_parameters": count_parameters(pipe.unet),
        "decoder_parameters": count_parameters(vae.decoder),
        "unet": str(source_dir.name),
        "source": source,
    })
    lo, hi = card["guidance_scale_range"]
    if not lo <= p.guidance <= hi:
        raise UserError(f"assemble.guidance={p.guidance} is outside the range the student was trained for "
                         f"[{lo}, {hi}] ({'dmd' if source == 'dmd' else 'halve'}.w_min/w_max + 1)")
    return pipe, card


def main(ctx) -> None:
    p: AssembleParams = ctx.params.assemble
    source, selection = choose(p, ctx.inputs, ctx.params.base.seed, pick_device(ctx.params.base))
    pipe, card = build_student(source, ctx.inputs[source], ctx.inputs["teacher"], ctx.inputs["decoder"], p)
    card["selection"] = selection or {"by": "assemble.source"}
    out = ctx.outputs["model"]
    pipe.save_pretrained(out, safe_serialization=True)
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    ctx.summary.update({"steps": card["num_inference_steps"], "unet_parameters": card["unet_parameters"],
                        "decoder_parameters": card["decoder_parameters"], "source_is_dmd": int(source == "dmd")})
    if selection:
        ctx.summary.update({f"val_fid_{name.replace('-', '_')}": value for name, value in selection["fid"].items()})
