"""Stage ``evaluate`` (first version): is the teacher good enough to distill from?

tiny/smoke: samples ``samples_per_prompt`` images for each digit prompt with the stock pipeline (DDIM,
``steps``, guidance ``guidance``), then scores prompt adherence as the digit classifier's accuracy and FID in
the classifier's feature space against the real test split (torchmetrics FID with a custom feature
extractor). Writes ``reports/metrics.json`` and ``reports/teacher_samples.png`` (rows: digits 0-9).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from sd_distill.data.shards import read_split
from sd_distill.data.sources import DIGIT_WORDS
from sd_distill.models.classifier import DigitClassifier, FeatureExtractor, predict, to_tensor
from sd_distill.models.parts import load_pipeline
from sd_distill.params import EvaluateParams

log = logging.getLogger(__name__)


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int) -> np.ndarray:
    """One image per (prompt, seed) through the stock pipeline; returns (N, H, W, 3) uint8."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sample", unit="batch", disable=None):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch_size]]
        images = pipe(prompt=prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, output_type="np").images
        out.append((images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def fid(extractor: FeatureExtractor, real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between classifier features of two (N, H, W, 3) uint8 sets."""
    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    metric.update(to_tensor(real), real=True)
    metric.update(to_tensor(fake), real=False)
    return float(metric.compute())


def grid(images: np.ndarray, rows: int, cols: int, scale: int = 4, gap: int = 1) -> Image.Image:
    """(rows * cols, H, W, 3) uint8, row-major -> one picture, upscaled ``scale``x (nearest), with ``gap``-pixel
    grey lines between tiles (before scaling) so that tiles whose ink touches the border stay apart."""
    h, w = images.shape[1:3]
    tiles = np.pad(images[: rows * cols], ((0, 0), (0, gap), (0, gap), (0, 0)), constant_values=160)
    hh, ww = h + gap, w + gap
    canvas = tiles.reshape(rows, cols, hh, ww, 3).transpose(0, 2, 1, 3, 4).reshape(rows * hh, cols * ww, 3)
    canvas = canvas[: rows * hh - gap, : cols * ww - gap]
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


def evaluate_teacher(pipe, classifier: DigitClassifier, real_test: np.ndarray, p: EvaluateParams, seed: int) -> tuple[dict, np.ndarray]:
    """Accuracy (overall and per digit) and FID of the teacher's samples; returns metrics and the samples."""
    labels = np.repeat(np.arange(10), p.samples_per_prompt)
    prompts = [p.prompt_template.format(word=DIGIT_WORDS[d]) for d in labels]
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))]
    start = time.perf_counter()
    images = sample(pipe, prompts, seeds, p.steps, p.guidance, p.batch_size)
    seconds = time.perf_counter() - start
    predicted = predict(classifier, to_tensor(images)).numpy()
    correct = predicted == labels
    metrics = {
        "accuracy": float(correct.mean()),
        "accuracy_per_digit": {DIGIT_WORDS[d]: float(correct[labels == d].mean()) for d in range(10)},
        "fid": fid(FeatureExtractor(classifier), real_test, images),
        "samples": len(images),
        "steps": p.steps,
        "guidance": p.guidance,
        "unet_calls_per_image": p.steps * (2 if p.guidance > 1 else 1),
        "seconds_per_image": seconds / len(images),
    }
    return metrics, images


def main(ctx) -> None:
    p: EvaluateParams = ctx.params.evaluate
    if ctx.params.profile == "sd15":
        raise NotImplementedError("evaluate: the sd15 evaluation (FID/IS/CLIP on MS-COCO, PartiPrompts, HPSv2) "
                                  "is not built yet (issue #5); the tiny and smoke profiles are supported")
    data = ctx.inputs["data"]
    classifier = DigitClassifier.load(data / "classifier")
    test, val = read_split(data, "test"), read_split(data, "val")
    pipe = load_pipeline(ctx.inputs["teacher"])
    teacher, images = evaluate_teacher(pipe, classifier, test.images, p, ctx.params.base.seed)
    extractor = FeatureExtractor(classifier)
    report = {
        "profile": ctx.params.profile,
        "teacher": teacher,
        "classifier": {"test_accuracy": json.loads((data / "classifier" / "config.json").read_text())["test_accuracy"]},
        "reference": {"fid_val_vs_test": fid(extractor, test.images, val.images), "val_images": len(val),
                      "test_images": len(test)},
    }
    ctx.outputs["metrics"].write_text(json.dumps(report, indent=2) + "\n")
    cols = min(p.grid_columns, p.samples_per_prompt)
    picks = np.concatenate([images[d * p.samples_per_prompt:][:cols] for d in range(10)])
    grid(picks, rows=10, cols=cols).save(ctx.outputs["samples"])
    ctx.summary.update({"teacher_accuracy": teacher["accuracy"], "teacher_fid": teacher["fid"],
                        "reference_fid_val_vs_test": report["reference"]["fid_val_vs_test"]})
    log.info("evaluate: teacher accuracy %.4f, FID %.3f (real val vs test: %.3f)", teacher["accuracy"],
             teacher["fid"], report["reference"]["fid_val_vs_test"])
