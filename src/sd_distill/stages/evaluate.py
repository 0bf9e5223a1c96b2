"""Stage ``evaluate``: every model the pipeline made, and what a user would run instead, on the same prompts.

Through the stock pipeline, with the same prompts and seeds for every model: the teacher at ``steps`` (CFG,
DDIM), the teacher with DPM-Solver++ and DDIM at each of ``baseline_sampling_steps``, the guided and pruned models at
``steps``, every ``steps-N`` student at N steps, the DMD2 one-step model, and the assembled student with its tiny
decoder and with the teacher's VAE. Quality comes from the profile's suite (``sd_distill.scoring``): tiny/smoke score digit prompts by
classifier accuracy, FID and diversity (per prompt, the RMS distance between two samples) in the classifier's
feature space; sd15 scores the COCO / PartiPrompts / HPSv2 prompt
sets by FID and Inception Score (COCO), CLIP score and HPSv2. A model's images are scored batch by batch as the
sampler makes them, against the ``reference`` stage's real-image statistics (``data/reference``, made once and
checked against the extractor, images and resolution used here): no array of all a model's images exists, only
running sums and the grid's tiles, so 30,000 images per set need no more memory than 1,000. Each model also gets
UNet calls per image, UNet and decoder parameters and MACs (``models.costs``, attention matmuls included),
throughput at the evaluation batch, and latency: the median time of one image at batch 1 over
``latency_repeats`` runs after ``latency_warmup`` (``sd_distill.timing``; CUDA: CUDA events, with peak memory).

Writes ``reports/metrics.json`` (DVC metrics), ``reports/quality_vs_steps.csv`` and ``reports/pareto.csv`` (DVC
plots), ``reports/grid.png`` (rows: the teacher, the students at ``grid_sampling_steps``, the assembled student; columns:
the same prompts and seeds), ``reports/pareto.png`` (FID against latency) and ``reports/report.md``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from tqdm.auto import tqdm

from sd_distill import report
from sd_distill.models.costs import describe
from sd_distill.models.parts import load_pipeline, pick_device
from sd_distill.names import MODEL_CARD
from sd_distill.params import EvaluateParams
from sd_distill.scoring import DigitSuite, TextImageSuite
from sd_distill.stages.reference import Reference, output_side
from sd_distill.timing import Timer, measure, timer_for

log = logging.getLogger(__name__)


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int,
           consume: Callable[[int, np.ndarray], None]) -> float:
    """One image per (prompt, seed) through the stock pipeline, ``batch_size`` at a time: each batch goes to
    ``consume(start, images)`` ((n, H, W, 3) uint8, the images of prompts ``start ... start + n - 1``) as it is
    made and is not kept. Returns the seconds spent sampling (``consume``'s time left out)."""
    seconds = 0.0
    for i in tqdm(range(0, len(prompts), batch_size), desc="sample", unit="batch", disable=None):
        start = time.perf_counter()
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch_size]]
        images = pipe(prompt=prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, output_type="np").images
        images = (images * 255).round().clip(0, 255).astype(np.uint8)
        seconds += time.perf_counter() - start
        consume(i, images)
    return seconds


def grid(images: np.ndarray, rows: int, cols: int, scale: int = 4, gap: int = 1) -> Image.Image:
    """(rows * cols, H, W, 3) uint8, row-major -> one picture, upscaled ``scale``x (nearest), with ``gap``-pixel
    grey lines between tiles (before scaling) so that tiles whose ink touches the border stay apart."""
    h, w = images.shape[1:3]
    tiles = np.pad(images[: rows * cols], ((0, 0), (0, gap), (0, gap), (0, 0)), constant_values=160)
    hh, ww = h + gap, w + gap
    canvas = tiles.reshape(rows, cols, hh, ww, 3).transpose(0, 2, 1, 3, 4).reshape(rows * hh, cols * ww, 3)
    canvas = canvas[: rows * hh - gap, : cols * ww - gap]
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


@dataclass(frozen=True)
class Candidate:
    """One way to make images: a model folder (input role), a solver, a step count."""

    name: str
    model: str  # input role in the registry record
    solver: str  # "own" (the folder's scheduler), "dpmpp" or "ddim"
    steps: int
    vae: str | None = None  # input role whose VAE replaces the folder's own (the student with the full VAE)

    def unet_calls(self, guided_input: bool, guidance: float) -> int:
        return self.steps * (1 if guided_input or guidance <= 1 else 2)


def candidates(p: EvaluateParams, roles: list[str], student_steps: int | None = None) -> list[Candidate]:
    """The teacher at ``p.sampling_steps``, the teacher with each baseline solver, the guided and pruned models at
    ``p.sampling_steps``, every ``steps-N`` student, the DMD2 one-step model, and the assembled student with its tiny decoder
    and with the VAE."""
    out = [Candidate(f"teacher@{p.sampling_steps}", "teacher", "own", p.sampling_steps)]
    out += [Candidate(f"teacher-{solver}@{n}", "teacher", solver, n)
            for solver in p.baseline_solvers for n in p.baseline_sampling_steps]
    for role in ("guided", "pruned"):
        if role in roles:
            out.append(Candidate(f"{role}@{p.sampling_steps}", role, "own", p.sampling_steps))
    for role in sorted((r for r in roles if r.startswith("steps-")), key=lambda r: -int(r.split("-")[1])):
        n = int(role.split("-")[1])
        out.append(Candidate(f"{role}@{n}", role, "own", n))
    if "dmd" in roles:
        out.append(Candidate("dmd@1", "dmd", "own", 1))
    if "student" in roles and student_steps:
        out.append(Candidate(f"student@{student_steps}", "student", "own", student_steps))
        out.append(Candidate(f"student-vae@{student_steps}", "student", "own", student_steps, vae="teacher"))
    return out


def with_solver(pipe, solver: str):
    """Swap in a baseline solver with trailing spacing, the best-known choice at few steps (Lin et al. 2024)."""
    if solver == "dpmpp":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                                 solver_order=2, timestep_spacing="trailing")
    elif solver == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def score(pipe, suite, p: EvaluateParams, steps: int, calls: int) -> tuple[dict, np.ndarray]:
    """The suite's quality figures for ``pipe``'s samples (the same prompts and seeds for every model), scored
    batch by batch; returns them and the grid's tiles ((len(suite.grid_index), H, W, 3) uint8), the only images
    kept."""
    scorer = suite.start()
    seconds = sample(pipe, suite.prompts, suite.seeds, steps, p.guidance, p.batch_size, scorer.add)
    metrics = scorer.result()
    n = len(suite.prompts)
    metrics.update({"samples": n, "steps": steps, "guidance": p.guidance, "unet_calls_per_image": calls,
                    "seconds_per_image": seconds / n})
    return metrics, scorer.grid()


@torch.no_grad()
def latency(pipe, prompt: str, steps: int, guidance: float, p: EvaluateParams, timer: Timer | None = None) -> dict:
    """Median milliseconds of one image (batch 1, decode included) after a warm-up, by ``timer`` (default the
    device's: CUDA events on CUDA); CUDA: also the peak memory of the timed runs."""
    cuda = pipe.device.type == "cuda"
    timer = timer if timer is not None else timer_for(pipe.device)

    def once() -> None:
        pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(0), output_type="np")

    for _ in range(p.latency_warmup):
        once()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = measure(once, 0, p.latency_repeats, timer, "latency")
    return {"latency_ms": float(np.median(times)) * 1e3, "latency_repeats": len(times),
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def grid_rows(p: EvaluateParams, names: list[str], student_steps: int | None) -> list[str]:
    """Candidates shown in ``grid.png``, top to bottom: the teacher, the students at ``grid_sampling_steps``, the DMD2 model,
    the product."""
    wanted = [f"teacher@{p.sampling_steps}", *(f"steps-{n}@{n}" for n in p.grid_sampling_steps), "dmd@1"]
    if student_steps:
        wanted.append(f"student@{student_steps}")
    return [n for n in wanted if n in names]


def thumbnails(images: np.ndarray, size: int = 128) -> np.ndarray:
    """Tiles for the grid: images larger than ``size`` are shrunk to it (sd15's 512 px), smaller ones kept."""
    if images.shape[1] <= size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])


def labelled_grid(rows: dict[str, np.ndarray]) -> Image.Image:
    """One row of tiles per model with its name on the left; tiny images are upscaled 4x (nearest)."""
    from PIL import ImageDraw

    names = list(rows)
    scale = 4 if next(iter(rows.values())).shape[1] < 64 else 1
    cols = len(next(iter(rows.values())))
    body = grid(np.concatenate([rows[n] for n in names]), rows=len(names), cols=cols, scale=scale)
    row_h = body.height / len(names)
    margin = 8 + 7 * max(len(n) for n in names)
    canvas = Image.new("RGB", (body.width + margin, body.height), (255, 255, 255))
    canvas.paste(body, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((4, int(i * row_h + row_h / 2 - 6)), name, fill=(0, 0, 0))
    return canvas


def quality_table(models: dict[str, dict], p: EvaluateParams, keys: tuple[str, ...]) -> list[dict]:
    """Rows for ``quality_vs_steps.csv``: per step count, the students' and each solver's quality figures."""
    keys = tuple(k for k in keys if any(m.get(k) is not None for m in models.values()))
    rows = []
    for n in sorted(p.baseline_sampling_steps):
        student = models.get(f"steps-{n}@{n}", {})
        row = {"steps": n, **{f"student_{k}": student.get(k, "") for k in keys}}
        for solver in p.baseline_solvers:
            m = models[f"teacher-{solver}@{n}"]
            row.update({f"{solver}_{k}": m.get(k, "") for k in keys})
        rows.append(row)
    return rows


def write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(ctx) -> None:
    p: EvaluateParams = ctx.params.evaluate
    seed = ctx.params.base.seed
    device = pick_device(ctx.params.base)
    real = Reference(ctx.inputs["reference"])
    if p.suite == "text-image":  # the reference's real images must be at the teacher's own output size
        suite = TextImageSuite(p, seed, output_side(ctx.inputs["teacher"]), device, real)
    else:
        suite = DigitSuite(ctx.inputs["data"], real, p, seed)
    models: dict[str, dict] = {}
    shown: dict[str, np.ndarray] = {}
    student_steps, product = None, {}
    if "student" in ctx.inputs:
        card = json.loads((ctx.inputs["student"] / MODEL_CARD).read_text())
        student_steps = card["num_inference_steps"]
        product = {"source": card.get("source"), "selection": card.get("selection")}
    todo = candidates(p, list(ctx.inputs), student_steps)
    in_grid = grid_rows(p, [c.name for c in todo], student_steps)
    for cand in tqdm(todo, desc="evaluate", unit="model", disable=None):
        pipe = with_solver(load_pipeline(ctx.inputs[cand.model], device), cand.solver)
        if cand.vae:
            pipe.vae = load_pipeline(ctx.inputs[cand.vae], device).vae
        calls = cand.unet_calls(pipe.unet.config.time_cond_proj_dim is not None, p.guidance)
        models[cand.name], tiles = score(pipe, suite, p, cand.steps, calls)
        cost = describe(pipe.unet, pipe.vae, seq_len=pipe.tokenizer.model_max_length)
        models[cand.name].update({
            "model": cand.model, "solver": cand.solver, "decoder": cost["decoder_class"],
            "unet_parameters": cost["parameters"]["unet"], "decoder_parameters": cost["parameters"]["vae_decoder"],
            "unet_macs_per_call": cost["unet_call"]["macs_total"], "decoder_macs": cost["decoder_call"]["macs_total"],
            "unet_macs_per_image": cost["unet_call"]["macs_total"] * calls})
        models[cand.name].update(latency(pipe, suite.latency_prompt, cand.steps, p.guidance, p))
        if cand.name in in_grid:
            shown[cand.name] = thumbnails(tiles)
        log.info("evaluate: %-18s %s  %7.1f ms/image  (%d UNet calls per image)", cand.name,
                 "  ".join(f"{k} {models[cand.name][k]:.3f}" for k in suite.ratio_keys
                           if models[cand.name].get(k) is not None), models[cand.name]["latency_ms"], calls)
    reference = models[f"teacher@{p.sampling_steps}"]
    for m in models.values():
        for key in suite.ratio_keys:
            if m.get(key) is not None and reference.get(key):
                m[f"{key}_ratio"] = m[key] / reference[key]
    summary = {"profile": ctx.params.profile, "device": device, **suite.context(), "grid_rows": in_grid,
               "teacher": reference, "product": product, "models": models}
    ctx.outputs["metrics"].write_text(json.dumps(summary, indent=2) + "\n")
    write_csv(ctx.outputs["quality"], quality_table(models, p, suite.ratio_keys))
    points = report.pareto(report.rows(summary))
    write_csv(ctx.outputs["pareto"], points)
    labelled_grid(shown).save(ctx.outputs["grid"])
    report.plot_pareto(points, ctx.outputs["pareto_plot"],
                       title=f"FID against latency per image ({ctx.params.profile} profile, {device})")
    ctx.outputs["report"].write_text(report.markdown(summary, {"grid": "grid.png", "pareto": "pareto.png"}))
    ctx.summary.update({f"teacher_{k}": reference[k] for k in suite.ratio_keys if reference.get(k) is not None})
    ctx.summary.update({f"{name.replace('@', '_at_')}_{k}": m[k] for name, m in models.items()
                        for k in suite.ratio_keys if m.get(k) is not None})
