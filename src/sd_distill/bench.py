"""``sd-distill bench``: what the student saves, measured side by side in one run.

Three parts, each a function of one ``Session`` (the timer, and every raw sample it took, by label):

1. ``arch``: SD v1.5 built from its published configs (``models.costs``, random weights) on the chosen device and
   dtype. Latency per call of the teacher UNet at batch B and 2B (CFG is one call at double batch), the guided
   (w-conditioned) UNet and BK-SDM base/small/tiny cut from it as ``prune`` cuts them, the full VAE decoder, the
   TAESD-shaped tiny decoder and the text encoder. Whole pipelines are composed from those calls:
   ms/image = (steps x UNet call + decode + text encoder) / B, next to FLOPs per image (``torch.utils.flop_counter``
   via ``models.costs``: matmuls and convolutions, counted once per shape on the meta device) and, on CUDA, the
   fraction of the device's dense peak.
2. ``models``: the project's ``models/teacher`` and ``models/student`` through the stock diffusers pipeline, same
   prompts and batch, in alternating runs; and the teacher with DPM-Solver++ at the fewest steps whose FID in
   ``reports/metrics.json`` (the evaluate stage) matches the student's.
3. ``train``: one optimizer step of a halving round and of the prune stage on synthetic latents, built from those
   stages' own functions; and a FLOP-based projection of a full sd15-profile run in A100-hours.

Every timing is the median of ``repeats`` timed calls after ``warmup`` untimed ones. CPU: ``time.perf_counter``;
CUDA: CUDA events, synchronized before they are read. torch is imported lazily: ``cli`` builds its parser from
``add_arguments`` for every command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sd_distill.errors import UserError

HELP = "time teacher against student: SD v1.5 shapes, the project's models, training steps"
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
PARTS = ("arch", "models", "train")
TRAIN_ARCHS = ("tiny", "sd15")
NO_PARAMS_FILE = Path("/nonexistent/params.yaml")  # ``resolve(..., profile=...)`` then gives the bare preset

# Dense tensor-core peaks (no sparsity), TFLOP/s, from the vendors' datasheets; float32 is the non-tensor-core
# peak (cuDNN may run float32 convolutions in TF32, so a float32 fraction can exceed what this suggests).
# Matched by substring of torch.cuda.get_device_name(), first match wins; unknown devices get no fraction.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.2}),
    ("H100 NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 60.0}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),  # SXM5 (HBM3)
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.1, "float16": 362.1, "float32": 91.6}),
)
A100_BF16_TFLOPS = 312.0
# published training costs, as the issue quotes them
PUBLISHED_A100_HOURS = (
    ("BK-SDM (Kim et al. 2023)", 300.0),
    ("LCM (Luo et al. 2023)", 32.0),
    ("progressive distillation of SD to 1 step: 108.8 A100-days (as InstaFlow, Liu et al. 2023, quotes it)",
     108.8 * 24),
)


def peak_tflops(device_name: str, dtype: str) -> float | None:
    return next((peaks[dtype] for key, peaks in PEAK_TFLOPS if key in device_name), None)


# --------------------------------------------------------------------------- timers
class CpuTimer:
    """Wall seconds of ``fn()`` by ``time.perf_counter``."""

    name = "time.perf_counter"

    def time(self, fn: Callable[[], object], label: str) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class CudaTimer:
    """Seconds between two CUDA events around ``fn()``; synchronizes before and before reading them."""

    name = "torch.cuda.Event"

    def time(self, fn: Callable[[], object], label: str) -> float:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


class FakeTimer:
    """For tests: runs ``fn`` (unless ``run=False``), returns the next of ``seconds[label]`` (cycled) or
    ``seconds(label)``, and keeps every (label, seconds) it returned in ``calls``."""

    name = "fake"

    def __init__(self, seconds: Mapping[str, Sequence[float]] | Callable[[str], float], run: bool = True):
        self.seconds, self.run, self.calls = seconds, run, []

    def time(self, fn: Callable[[], object], label: str) -> float:
        if self.run:
            fn()
        if callable(self.seconds):
            s = self.seconds(label)
        else:
            done = sum(1 for seen, _ in self.calls if seen == label)
            s = self.seconds[label][done % len(self.seconds[label])]
        self.calls.append((label, s))
        return s


def measure(fn: Callable[[], object], warmup: int, repeats: int, timer, label: str = "") -> list[float]:
    """Seconds of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timer.time(fn, label) for _ in range(repeats)]


@dataclass(frozen=True)
class Measurement:
    """The raw samples (seconds) of one timed call that makes ``batch`` images or training samples."""

    label: str
    samples: tuple[float, ...]
    batch: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_json(self) -> dict:
        return {"batch": self.batch, "median_s": self.median, "samples_s": list(self.samples)}


class Session:
    """One bench run: its timer, warm-up and repeats, and every ``Measurement`` it made, by label."""

    def __init__(self, timer, warmup: int, repeats: int):
        from tqdm.auto import tqdm

        self.timer, self.warmup, self.repeats = timer, warmup, repeats
        self.measurements: dict[str, Measurement] = {}
        self.bar = tqdm(desc="bench", unit="timing", disable=None)  # quiet when stderr is not a terminal

    def _keep(self, label: str, samples: list[float], batch: int) -> Measurement:
        if label in self.measurements:
            raise ValueError(f"bench: {label} measured twice in one run")
        self.measurements[label] = m = Measurement(label, tuple(samples), batch)
        self.bar.update()
        return m

    def measure(self, label: str, fn: Callable[[], object], batch: int) -> Measurement:
        self.bar.set_postfix_str(label)
        return self._keep(label, measure(fn, self.warmup, self.repeats, self.timer, label), batch)

    def alternate(self, runs: Mapping[str, tuple[Callable[[], object], int]], repeats: int) -> dict[str, Measurement]:
        """``runs`` (label -> (fn, batch)) timed in turn, ``repeats`` rounds after ``warmup`` untimed rounds, so
        that a slow drift of the machine touches every run alike."""
        for _ in range(self.warmup):
            for fn, _ in runs.values():
                fn()
        samples: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(repeats):
            for label, (fn, _) in runs.items():
                self.bar.set_postfix_str(label)
                samples[label].append(self.timer.time(fn, label))
        return {label: self._keep(label, samples[label], batch) for label, (_, batch) in runs.items()}


# --------------------------------------------------------------------------- shared helpers
@dataclass(frozen=True)
class Options:
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    resolution: int = 512
    compile: bool = False
    channels_last: bool = False


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _ready(module, o: Options, compiled: str | None = None):
    """``module`` on the device and dtype, frozen, optionally channels-last and compiled (``compiled``: compile that
    submodule instead, e.g. ``decoder``, where the timed method is not ``forward``)."""
    import torch

    module = module.to(o.device).eval().requires_grad_(False)
    if o.dtype != "float32":
        module = module.to(_torch_dtype(o.dtype))
    if o.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if o.compile:
        if compiled:
            setattr(module, compiled, torch.compile(getattr(module, compiled)))
        else:
            module = torch.compile(module)
    return module


def _flops(call) -> int:
    """Total FLOPs of ``call()`` (matmuls and convolutions), as ``models.costs`` counts them."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        call()
    return counter.get_total_flops()


def _vae_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _unet_config(arch, variant: str, guidance_dim: int | None) -> dict:
    from sd_distill.models import bk

    config = dict(arch.unet, time_cond_proj_dim=guidance_dim)
    return config if variant == "none" else bk.compact_config(config, variant)


# --------------------------------------------------------------------------- part 1: the architecture
UNETS = {  # key: (row title, BK-SDM variant, guidance input)
    "teacher": ("teacher UNet", "none", False),
    "guided": ("guided UNet (+w input)", "none", True),
    "bk-base": ("BK-SDM base UNet (+w)", "base", True),
    "bk-small": ("BK-SDM small UNet (+w)", "small", True),
    "bk-tiny": ("BK-SDM tiny UNet (+w)", "tiny", True),
}
DECODERS = {"full": "full VAE decoder", "tiny": "tiny decoder (TAESD-shaped)"}


@dataclass(frozen=True)
class Composed:
    """A way to make images from the timed calls: ``steps`` UNet calls (at 2B with CFG), one decode and the text
    encoder (with CFG on the prompt and the empty prompt, one call at 2B)."""

    name: str
    unet: str
    steps: int
    cfg: bool


COMPOSED = (
    Composed("teacher@64 CFG", "teacher", 64, True),
    Composed("teacher@25 CFG", "teacher", 25, True),
    Composed("guided@8", "guided", 8, False),
    Composed("student BK small@4", "bk-small", 4, False),
    Composed("student BK small@2", "bk-small", 2, False),
    Composed("student BK small@1", "bk-small", 1, False),
)
REFERENCE = ("teacher@64 CFG", "full")
FINAL = ("student BK small@1", "tiny")
FLOP_TARGET = 100.0


def count_arch(arch, resolution: int, decoder_arch, guidance_dim: int) -> dict[str, int]:
    """FLOPs of one call at batch 1 of every part that ``measure_arch`` times, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_distill.models import costs
    from sd_distill.models.parts import build_tiny_autoencoder

    latent = resolution // _vae_factor(arch.vae)
    seq = arch.text_encoder["max_position_embeddings"]
    flops = {}
    with torch.device("meta"):
        for key, (_, variant, guided) in UNETS.items():
            unet = UNet2DConditionModel.from_config(_unet_config(arch, variant, guidance_dim if guided else None))
            flops[f"unet/{key}"] = 2 * costs.unet_macs(unet, latent, latent, seq)["macs_total"]
        vae = AutoencoderKL.from_config(arch.vae)
        flops["decoder/full"] = 2 * costs.decoder_macs(vae, latent, latent)["macs_total"]
        tiny = build_tiny_autoencoder(arch.vae, decoder_arch)
        flops["decoder/tiny"] = 2 * costs.decoder_macs(tiny, latent, latent)["macs_total"]
        text = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
        ids = torch.zeros(1, seq, dtype=torch.long)
        flops["text"] = _flops(lambda: text(ids))
    return flops


def measure_arch(session: Session, arch, o: Options, decoder_arch, guidance_dim: int) -> dict[str, Measurement]:
    """Time every UNet of ``UNETS`` (the teacher also at 2B), both decoders and the text encoder (B and 2B),
    built from ``arch``'s configs with random weights, one at a time on ``o.device``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_distill.models.parts import build_tiny_autoencoder

    like = {"device": o.device, "dtype": _torch_dtype(o.dtype)}
    latent = o.resolution // _vae_factor(arch.vae)
    seq, width = arch.text_encoder["max_position_embeddings"], arch.text_encoder["hidden_size"]
    fmt = torch.channels_last if o.channels_last else torch.contiguous_format
    b = o.batch
    out: dict[str, Measurement] = {}

    def latents(n: int) -> torch.Tensor:
        return torch.randn(n, arch.unet["in_channels"], latent, latent, **like).to(memory_format=fmt)

    with torch.no_grad():
        for key, (_, variant, guided) in UNETS.items():
            dim = guidance_dim if guided else None
            with torch.device(o.device):
                unet = _ready(UNet2DConditionModel.from_config(_unet_config(arch, variant, dim)), o)
            for n in (b, 2 * b) if key == "teacher" else (b,):
                x, states = latents(n), torch.randn(n, seq, width, **like)
                t = torch.full((n,), 999, device=o.device, dtype=torch.long)
                cond = torch.randn(n, dim, **like) if dim else None
                label = f"unet/{key}/b{n}"
                call = lambda: unet(x, t, states, timestep_cond=cond, return_dict=False)  # noqa: E731
                out[label] = session.measure(label, call, n)
            del unet
        with torch.device(o.device):
            decoders = {"full": AutoencoderKL.from_config(arch.vae),
                        "tiny": build_tiny_autoencoder(arch.vae, decoder_arch)}
        z = latents(b)
        for key, vae in decoders.items():
            vae = _ready(vae, o, compiled="decoder")
            out[f"decoder/{key}/b{b}"] = session.measure(f"decoder/{key}/b{b}", lambda: vae.decode(z), b)
        del decoders, vae
        with torch.device(o.device):
            text = _ready(CLIPTextModel(CLIPTextConfig(**arch.text_encoder)), o)
        for n in (b, 2 * b):
            ids = torch.randint(0, arch.text_encoder["vocab_size"], (n, seq), device=o.device)
            out[f"text/b{n}"] = session.measure(f"text/b{n}", lambda: text(ids), n)
    return out


def call_rows(calls: Mapping[str, Measurement], flops: Mapping[str, int], peak: float | None) -> list[dict]:
    """One row per timed call: median ms, FLOPs of the call, achieved TFLOP/s and the fraction of ``peak``."""
    titles = {**{f"unet/{k}": v[0] for k, v in UNETS.items()}, **{f"decoder/{k}": v for k, v in DECODERS.items()},
              "text": "text encoder"}
    rows = []
    for label, m in calls.items():
        kind = label.rsplit("/", 1)[0]
        f = flops[kind] * m.batch
        rows.append({"name": titles[kind], "batch": m.batch, "from": [label], "ms": m.median * 1e3, "flops": f,
                     "tflops_per_s": f / m.median / 1e12,
                     "peak_fraction": f / m.median / (peak * 1e12) if peak else None})
    return rows


def compose(calls: Mapping[str, Measurement], flops: Mapping[str, int], batch: int, peak: float | None) -> list[dict]:
    """Per-image cost of every ``COMPOSED`` pipeline with each decoder, from the timed calls at ``batch``:
    seconds = (steps x UNet call + decode + text encoder) / batch, CFG's calls at 2 x batch; FLOPs per image the same
    sum of the counted calls; speedup and FLOP ratio against ``REFERENCE``."""
    rows = []
    for c in COMPOSED:
        k = 2 if c.cfg else 1
        for dec in DECODERS:
            unet, decode, text = (calls[f"unet/{c.unet}/b{k * batch}"], calls[f"decoder/{dec}/b{batch}"],
                                  calls[f"text/b{k * batch}"])
            seconds = (c.steps * unet.median + decode.median + text.median) / batch
            f = c.steps * k * flops[f"unet/{c.unet}"] + flops[f"decoder/{dec}"] + k * flops["text"]
            rows.append({"pipeline": c.name, "decoder": dec, "steps": c.steps, "unet_calls_per_image": c.steps * k,
                         "from": [unet.label, decode.label, text.label], "ms_per_image": seconds * 1e3,
                         "images_per_s": 1 / seconds, "flops_per_image": f,
                         "peak_fraction": f / seconds / (peak * 1e12) if peak else None})
    ref = next(r for r in rows if (r["pipeline"], r["decoder"]) == REFERENCE)
    for r in rows:
        r["speedup"] = ref["ms_per_image"] / r["ms_per_image"]
        r["flop_ratio"] = ref["flops_per_image"] / r["flops_per_image"]
    return rows


def run_arch(session: Session, o: Options, arch, decoder_arch, guidance_dim: int, peak: float | None) -> dict:
    flops = count_arch(arch, o.resolution, decoder_arch, guidance_dim)
    calls = measure_arch(session, arch, o, decoder_arch, guidance_dim)
    pipelines = compose(calls, flops, o.batch, peak)
    final = next(r for r in pipelines if (r["pipeline"], r["decoder"]) == FINAL)
    target = {"name": f"{FINAL[0]} + {FINAL[1]} decoder: FLOPs/image at least {FLOP_TARGET:.0f}x fewer than "
                      f"{REFERENCE[0]} + {REFERENCE[1]} VAE",
              "value": final["flop_ratio"], "threshold": FLOP_TARGET, "pass": final["flop_ratio"] >= FLOP_TARGET,
              "measured_latency_ratio": final["speedup"], "from": final["from"] + next(
                  r["from"] for r in pipelines if (r["pipeline"], r["decoder"]) == REFERENCE)}
    return {"title": arch.title, "resolution": o.resolution, "batch": o.batch, "flops_per_call_b1": flops,
            "calls": call_rows(calls, flops, peak), "pipelines": pipelines, "targets": [target]}


# --------------------------------------------------------------------------- part 2: the project's models
def equal_quality(metrics: dict) -> dict:
    """From evaluate's ``metrics.json``: the student's row and the fewest-step ``teacher-dpmpp@N`` row whose FID is
    at most the student's (``match`` None when no step count reaches it)."""
    models = metrics.get("models", {})
    student = next((name for name in models if name.startswith("student@")), None)
    if student is None:
        return {"student": None, "match": None, "note": "no student@N row (run the evaluate stage after assemble)"}
    fid = models[student]["fid"]
    found = sorted((m["steps"], name) for name, m in models.items()
                   if name.startswith("teacher-dpmpp@") and m.get("fid") is not None and m["fid"] <= fid)
    out = {"student": student, "student_fid": fid, "match": found[0][1] if found else None}
    if found:
        out.update(match_steps=found[0][0], match_fid=models[found[0][1]]["fid"])
    else:
        out["note"] = f"no teacher-dpmpp@N row reaches the student's FID {fid:.4g}"
    return out


def run_models(session: Session, o: Options, project: Path, params) -> dict:
    """Images/s of models/teacher at ``evaluate.steps`` guided steps, the teacher with DPM-Solver++ at the steps that
    match the student's FID, and models/student, through the stock pipeline in alternating runs."""
    folders = {role: project / "models" / role for role in ("teacher", "student")}
    missing = [str(f) for f in folders.values() if not (f / "model_index.json").is_file()]
    if missing:
        return {"skipped": f"part 2 skipped: {' and '.join(missing)} not found (no model_index.json); `make run` "
                           "makes the tiny profile's models"}
    import torch

    from sd_distill.data.sources import DIGIT_WORDS
    from sd_distill.models.parts import load_pipeline
    from sd_distill.stages.evaluate import Candidate, with_solver
    from sd_distill.stages.halve import MODEL_CARD

    p = params.evaluate
    metrics_file = project / "reports" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    quality = (equal_quality(metrics) if metrics
               else {"match": None, "note": f"{metrics_file} not found: run the evaluate stage for the FID match"})
    card = folders["student"] / MODEL_CARD
    if not card.is_file():
        raise UserError(f"{card}: missing; the assemble stage writes it with the student's num_inference_steps")
    student_steps = json.loads(card.read_text())["num_inference_steps"]
    prompts = [p.prompt_template.format(word=DIGIT_WORDS[i % 10]) for i in range(o.batch)]
    todo = [Candidate(f"teacher@{p.steps}", "teacher", "own", p.steps)]
    if quality["match"]:
        todo.append(Candidate(quality["match"], "teacher", "dpmpp", quality["match_steps"]))
    todo.append(Candidate(f"student@{student_steps}", "student", "own", student_steps))
    pipes = {c.name: with_solver(load_pipeline(folders[c.model], o.device, _torch_dtype(o.dtype)), c.solver)
             for c in todo}

    def run(pipe, steps: int):
        def call():
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]  # the same seeds every run
            return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=p.guidance, generator=gens,
                        output_type="np")
        return call

    repeats = max(5, session.repeats)
    timed = session.alternate({f"models/{c.name}": (run(pipes[c.name], c.steps), o.batch) for c in todo}, repeats)
    rows = []
    for c in todo:
        m = timed[f"models/{c.name}"]
        calls = c.unet_calls(pipes[c.name].unet.config.time_cond_proj_dim is not None, p.guidance)
        rows.append({"name": c.name, "folder": str(folders[c.model].relative_to(project)), "solver": c.solver,
                     "steps": c.steps, "unet_calls_per_image": calls, "from": [m.label],
                     "ms_per_image": m.median / m.batch * 1e3, "images_per_s": m.batch / m.median,
                     "fid": metrics.get("models", {}).get(c.name, {}).get("fid")})
    student, teacher = rows[-1], rows[0]
    targets = [{"name": f"student images/s at least 30x {teacher['name']}", "threshold": 30.0,
                "value": student["images_per_s"] / teacher["images_per_s"], "from": student["from"] + teacher["from"]}]
    if quality["match"]:
        dpm = rows[1]
        targets.append({"name": f"student images/s at least 4x {dpm['name']} (its FID matches the student's)",
                        "threshold": 4.0, "value": student["images_per_s"] / dpm["images_per_s"],
                        "from": student["from"] + dpm["from"]})
    else:
        targets.append({"name": "student images/s at least 4x the teacher with DPM-Solver++ at the steps that match "
                                f"its FID: not checkable ({quality['note']})", "threshold": 4.0, "value": None,
                        "from": []})
    for t in targets:
        t["pass"] = None if t["value"] is None else t["value"] >= t["threshold"]
    return {"batch": o.batch, "prompts": prompts, "guidance": p.guidance, "repeats": repeats,
            "equal_quality": quality, "rows": rows, "targets": targets}


# --------------------------------------------------------------------------- part 3: training throughput
def _train_step(model, loss_of: Callable, draw: Callable, tp, o: Options) -> Callable[[], None]:
    """One optimizer step as ``training.loop.train`` takes it: loss (autocast unless float32), backward, gradient
    clipping, AdamW, EMA."""
    import torch
    from diffusers.training_utils import EMAModel

    opt = torch.optim.AdamW(model.parameters(), lr=tp.learning_rate, weight_decay=tp.weight_decay)
    ema = EMAModel(model.parameters(), decay=tp.ema_decay) if tp.ema_decay > 0 else None

    def step() -> None:
        with torch.autocast(o.device, dtype=_torch_dtype(o.dtype), enabled=o.dtype != "float32"):
            loss = loss_of(draw())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tp.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())

    return step


def run_train(session: Session, o: Options, params, shapes: str, batch: int | None) -> list[dict]:
    """Samples/s of one step of a halving round (the teacher's two DDIM steps without grad, the student's
    forward/backward) and of the prune stage (student and parent forward, output and feature KD), on synthetic
    latents; ``shapes`` ``tiny`` (the profile's own batch sizes) or ``sd15`` (SD v1.5 at ``o.resolution``,
    ``batch``)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from sd_distill import diffusion
    from sd_distill.data.latents import LatentData
    from sd_distill.models import bk, costs, parts
    from sd_distill.stages import guidance, halve, prune, vpred

    t = params.teacher
    if shapes == "tiny":
        latent = params.prepare.resolution // 2 ** (len(t.vae.block_out_channels) - 1)
        seq, width, channels = t.text_encoder.max_length, t.text_encoder.hidden_size, t.vae.latent_channels
        with torch.device("meta"):
            config = parts.build_unet(t.unet, latent, channels, width).config
        batches = {"halve": params.halve.train.batch_size, "prune": params.prune.train.batch_size}
    else:
        latent, seq, width, channels = o.resolution // 8, 77, 768, 4
        config = costs.SD15_UNET_CONFIG
        batches = {"halve": batch, "prune": batch}
    # time_cond_proj_dim explicit: listed in diffusers' _use_default_values, from_config() in with_guidance_input
    # would set it back to None
    parent = UNet2DConditionModel.from_config(
        {**{k: v for k, v in config.items() if k != "_use_default_values"}, "time_cond_proj_dim": None})
    guided = guidance.with_guidance_input(parent, params.guidance.embedding_dim)
    del parent
    variant = params.prune.variant
    pruned = prune.compact_unet(guided, variant)[0] if variant != "none" else guided
    scheduler = vpred.v_scheduler(parts.build_sampling_scheduler(t).config, params.vpred.zero_terminal_snr)
    schedule = diffusion.Schedule.from_scheduler(scheduler)
    T = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(0)
    n = max(batches.values())
    latents = LatentData(mean=torch.randn(n, channels, latent, latent, generator=gen), std=torch.full(
        (n, channels, latent, latent), 0.1), scaling=0.18215, table=torch.randn(9, seq, width, generator=gen),
        prompt_index=torch.randint(0, 8, (n,), generator=gen))
    dev, rows = o.device, []

    def timed(stage: str, title: str, student, loss_of, timesteps, sp, size: int) -> None:
        draw = lambda: latents.draw_with_w(size, gen, timesteps, sp.w_min, sp.w_max)  # noqa: E731
        label = f"train/{stage}/{shapes}/b{size}"
        m = session.measure(label, _train_step(student, loss_of, draw, sp.train, o), size)
        rows.append({"name": title, "shapes": shapes, "batch": size, "from": [label],
                     "ms_per_step": m.median * 1e3, "samples_per_s": size / m.median})

    # halve: round N learns one student step from two teacher DDIM steps (any N costs the same; N = 1 here)
    grid = halve.student_timesteps(scheduler, 1)
    pruned = pruned.to(dev).eval().requires_grad_(False)
    teacher = diffusion.unet_denoiser(pruned, schedule, "v_prediction")  # the first round's teacher: prune's output
    student = copy.deepcopy(pruned).train().requires_grad_(True)

    def halve_loss(batch):
        x, cond, ts, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        goal = halve.teacher_target(teacher, z, ts, cond, w, halve.teacher_path(ts, 1, 2, T), schedule)
        pred = diffusion.unet_denoiser(student, schedule, "v_prediction")(z, ts, cond, w)
        return F.mse_loss(pred.float(), goal.float())

    timed("halve", "halve round: 2 teacher DDIM steps + student fwd/bwd", student, halve_loss, grid,
          params.halve, batches["halve"])
    del teacher, student
    if variant == "none":
        return rows
    # prune: the BK-SDM student against its parent (output and feature KD; the task loss adds no model call)
    p = params.prune
    parent = guided.to(dev).eval().requires_grad_(False)
    student = copy.deepcopy(pruned).to(dev).train().requires_grad_(True)
    pairs = bk.feature_pairs(student, parent, variant)
    parent_tap = prune.FeatureTap({theirs: module for _, _, theirs, module in pairs})
    student_tap = prune.FeatureTap({mine: module for mine, module, _, _ in pairs})

    def prune_loss(batch):
        x, cond, ts, w, noise, z, alpha, sigma = diffusion.noised_w_batch(batch, schedule, dev)
        with torch.no_grad():
            goal = diffusion.unet_denoiser(parent, schedule, "v_prediction")(z, ts, cond, w)
        pred = diffusion.unet_denoiser(student, schedule, "v_prediction")(z, ts, cond, w).float()
        feat = sum(F.mse_loss(student_tap.features[mine].float(), parent_tap.features[theirs].float())
                   for mine, _, theirs, _ in pairs)
        return p.out_kd_weight * F.mse_loss(pred, goal.float()) + p.feat_kd_weight * feat

    try:
        timed("prune", f"prune ({variant}): parent fwd + student fwd/bwd, feature KD", student, prune_loss,
              torch.arange(T), p, batches["prune"])
    finally:
        parent_tap.close()
        student_tap.close()
    return rows


def project_sd15(mfu: float) -> dict:
    """A FLOP-based projection of the sd15 profile's training stages in A100-hours: samples x training FLOPs per
    sample (forward + backward = 3x forward, plus the frozen teacher's forwards) / (A100 bf16 peak x ``mfu``).
    Not a measurement: it leaves out data loading, the one-off encoding of the dataset, evaluation and checkpoints."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sd_distill.models import costs
    from sd_distill.models.parts import build_tiny_autoencoder
    from sd_distill.params import HALVING_STEPS, resolve

    params = resolve(NO_PARAMS_FILE, profile="sd15")
    arch = costs.ARCHS["sd15"]
    resolution = params.prepare.resolution
    latent = resolution // _vae_factor(arch.vae)
    variant = params.prune.variant
    with torch.device("meta"):
        unet = {key: UNet2DConditionModel.from_config(_unet_config(arch, v, dim)) for key, v, dim in (
            ("teacher", "none", None), ("guided", "none", params.guidance.embedding_dim),
            ("pruned", variant, params.guidance.embedding_dim))}
        f = {key: 2 * costs.unet_macs(u, latent, latent)["macs_total"] for key, u in unet.items()}
        tiny = build_tiny_autoencoder(arch.vae, params.decoder.arch)
        f["decoder"] = 2 * costs.decoder_macs(AutoencoderKL.from_config(arch.vae), latent, latent)["macs_total"]
        f["tiny_decoder"] = 2 * costs.decoder_macs(tiny, latent, latent)["macs_total"]
        image = torch.zeros(1, 3, resolution, resolution)
        f["tiny_encoder"] = _flops(lambda: tiny.encode(image))
    h = params.halve
    teacher_steps = {n: 2 if h.mode == "progressive" else h.steps_from // n for n in HALVING_STEPS}
    stages = [  # (stage, train params, FLOPs per sample, what they are)
        ("vpred", params.vpred.train, 3 * f["teacher"] + (f["teacher"] if params.vpred.targets == "teacher" else 0),
         "3 x UNet + teacher UNet"),
        ("guidance", params.guidance.train, 3 * f["guided"] + 2 * f["teacher"],
         "3 x guided UNet + CFG teacher (2 calls)"),
        *([("prune", params.prune.train, 3 * f["pruned"] + f["guided"], f"3 x BK {variant} + guided parent")]
          if variant != "none" else []),
        *[(f"halve@{n}", h.train_for(n), (3 + teacher_steps[n]) * f["pruned"],
           f"3 x student + {teacher_steps[n]} teacher steps") for n in HALVING_STEPS],
        ("decoder", params.decoder.train, f["decoder"] + 3 * (f["tiny_decoder"] + f["tiny_encoder"]),
         "full decode + 3 x tiny decode and encode"),
    ]
    rate = A100_BF16_TFLOPS * 1e12 * mfu
    rows = []
    for name, tp, per, what in stages:
        samples = tp.steps * tp.batch_size * tp.grad_accum
        rows.append({"stage": name, "steps": tp.steps, "batch": tp.batch_size * tp.grad_accum, "samples": samples,
                     "flops_per_sample": per, "flops_per_sample_is": what, "flops": samples * per,
                     "a100_hours": samples * per / rate / 3600})
    total = sum(r["a100_hours"] for r in rows)
    return {"kind": "FLOP-based projection, not a measurement", "profile": "sd15", "resolution": resolution,
            "a100_bf16_peak_tflops": A100_BF16_TFLOPS, "assumed_mfu": mfu, "rows": rows, "total_a100_hours": total,
            "published_a100_hours": [{"name": n, "a100_hours": v} for n, v in PUBLISHED_A100_HOURS],
            "not_counted": "the teacher stage (sd15 downloads SD v1.5), the one-off VAE/text encoding of the data, "
                           "the prune task loss and decoder critic (no extra UNet/VAE call), evaluation"}


# --------------------------------------------------------------------------- the run, its record and its tables
def machine(device: str) -> dict:
    import diffusers
    import torch

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(), "os": platform.platform(),
            "load_average_1m_at_start": os.getloadavg()[0]}
    info["device_name"] = torch.cuda.get_device_name() if device == "cuda" else f"CPU: {cpu}"
    return info


def run(session: Session, o: Options, parts: Sequence[str], project: Path, *, train_shapes: Sequence[str] = ("tiny",),
        train_batch: int = 2, mfu: float = 0.4, arch=None, decoder_arch=None, guidance_dim: int | None = None,
        device_name: str | None = None) -> dict:
    """Every part in ``parts``; ``arch`` / ``decoder_arch`` / ``guidance_dim`` default to SD v1.5, TAESD and the
    sd15 profile's guidance embedding (tests pass tiny ones). Returns the JSON record."""
    from sd_distill.models import costs
    from sd_distill.params import resolve

    sd15 = resolve(NO_PARAMS_FILE, profile="sd15")
    project_params = project / "params.yaml"
    params = resolve(project_params) if project_params.is_file() else resolve(NO_PARAMS_FILE, profile="tiny")
    info = machine(o.device)
    if device_name:
        info["device_name"] = device_name
    peak = peak_tflops(info["device_name"], o.dtype) if o.device == "cuda" else None
    result = {"machine": info, "settings": {**vars(o), "timer": session.timer.name, "warmup": session.warmup,
                                            "repeats": session.repeats, "attention": "torch SDPA (diffusers default)",
                                            "peak_tflops": peak, "parts": list(parts)}}
    if "arch" in parts:
        result["arch"] = run_arch(session, o, arch or costs.ARCHS["sd15"], decoder_arch or costs.TAESD,
                                  guidance_dim or sd15.guidance.embedding_dim, peak)
    if "models" in parts:
        result["models"] = run_models(session, o, project, params)
    if "train" in parts:
        tiny = resolve(NO_PARAMS_FILE, profile="tiny")
        result["train"] = {"rows": [row for s in train_shapes
                                    for row in run_train(session, o, tiny if s == "tiny" else sd15, s, train_batch)],
                           "projection": project_sd15(mfu)}
    session.bar.close()
    result["measurements"] = {label: m.to_json() for label, m in session.measurements.items()}
    return result


def _n(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows), ""]


def _targets(targets: list[dict]) -> list[str]:
    out = []
    for t in targets:
        beside = (f"; measured latency ratio {_n(t['measured_latency_ratio'])}x"
                  if "measured_latency_ratio" in t else "")
        if t["pass"] is None:
            out.append(f"- target: {t['name']}")
            continue
        out.append(f"- target: {t['name']}: {_n(t['value'])}x{beside} -> **{'PASS' if t['pass'] else 'FAIL'}**")
    return out + [""]


def render(result: dict) -> str:
    """The run's tables as Markdown (also what is printed); every number comes from ``result``."""
    m, s = result["machine"], result["settings"]
    host = f"{m['cpu']}, {m['cores']} cores"
    where = host if s["device"] == "cpu" else f"{m['device_name']} (host: {host})"
    out = ["# sd-distill bench", "", f"Machine: {where}; torch {m['torch']}, diffusers {m['diffusers']}. Run: "
           f"{s['device']} {s['dtype']}, batch {s['batch']}, timer {s['timer']}, median of {s['repeats']} after "
           f"{s['warmup']} warm-up; compile {s['compile']}, channels-last {s['channels_last']}, attention "
           f"{s['attention']}.", ""]
    if "arch" in result:
        a = result["arch"]
        out += [f"## 1. {a['title']} architecture at {a['resolution']}x{a['resolution']} px (random weights)", ""]
        out += _table(["one call", "batch", "ms", "GFLOP", "TFLOP/s", "% peak"],
                      [[r["name"], str(r["batch"]), _n(r["ms"]), _n(r["flops"] / 1e9), _n(r["tflops_per_s"]),
                        _pct(r["peak_fraction"])] for r in a["calls"]])
        out += _table(["pipeline", "decoder", "UNet calls", "ms/image", "images/s", "speedup", "GFLOP/image",
                       "FLOP ratio", "% peak"],
                      [[r["pipeline"], r["decoder"], str(r["unet_calls_per_image"]), _n(r["ms_per_image"]),
                        _n(r["images_per_s"]), f"{_n(r['speedup'])}x", _n(r["flops_per_image"] / 1e9),
                        f"{_n(r['flop_ratio'])}x", _pct(r["peak_fraction"])] for r in a["pipelines"]])
        out += _targets(a["targets"])
    if "models" in result:
        md = result["models"]
        out += ["## 2. The project's models through the stock pipeline", ""]
        if "skipped" in md:
            out += [md["skipped"], ""]
        else:
            q = md["equal_quality"]
            out += [f"Batch {md['batch']}, guidance {md['guidance']}, alternating runs, median of {md['repeats']}. "
                    + (f"Equal quality (reports/metrics.json): {q['match']} FID {q['match_fid']:.4g} <= "
                       f"{q['student']} FID {q['student_fid']:.4g}." if q["match"] else q["note"] + "."), ""]
            out += _table(["model", "folder", "solver", "steps", "UNet calls/image", "ms/image", "images/s",
                           "FID (evaluate)"],
                          [[r["name"], r["folder"], r["solver"], str(r["steps"]), str(r["unet_calls_per_image"]),
                            _n(r["ms_per_image"]), _n(r["images_per_s"]),
                            "-" if r["fid"] is None else f"{r['fid']:.4g}"] for r in md["rows"]])
            out += _targets(md["targets"])
    if "train" in result:
        tr, pj = result["train"], result["train"]["projection"]
        out += ["## 3. Training throughput (synthetic latents, one optimizer step)", ""]
        out += _table(["step", "shapes", "batch", "ms/step", "samples/s"],
                      [[r["name"], r["shapes"], str(r["batch"]), _n(r["ms_per_step"]), _n(r["samples_per_s"])]
                       for r in tr["rows"]])
        out += [f"Projection of a full sd15-profile run at {pj['resolution']} px ({pj['kind']}): A100 bf16 peak "
                f"{pj['a100_bf16_peak_tflops']:.0f} TFLOP/s at an assumed MFU of {pj['assumed_mfu']}.", ""]
        out += _table(["stage", "samples", "TFLOP/sample", "A100-hours", "per sample"],
                      [[r["stage"], str(r["samples"]), _n(r["flops_per_sample"] / 1e12), _n(r["a100_hours"]),
                        r["flops_per_sample_is"]] for r in pj["rows"]]
                      + [["total", str(sum(r["samples"] for r in pj["rows"])), "", _n(pj["total_a100_hours"]), ""]])
        published = "; ".join(f"{p['name']}: {_n(p['a100_hours'])} A100-hours" for p in pj["published_a100_hours"])
        out += [f"Not counted: {pj['not_counted']}.", "", f"Published: {published}.", ""]
    return "\n".join(out)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call (default 1)")
    parser.add_argument("--resolution", type=int, default=512, help="part 1 (and --train-arch sd15) pixels per "
                        "side, a multiple of 64 (default 512; 256 for a quick CPU run)")
    parser.add_argument("--compile", action="store_true", help="torch.compile part 1's modules")
    parser.add_argument("--channels-last", action="store_true", help="part 1 in channels-last memory format")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5; part 2 at "
                        "least 5); the median is reported")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of arch, models, train (default all)")
    parser.add_argument("--train-arch", default="tiny", help="comma list of tiny (the tiny profile's shapes and "
                        "batch sizes) and sd15 (SD v1.5 at --resolution, --train-batch) for part 3 (default tiny)")
    parser.add_argument("--train-batch", type=int, default=2, help="batch of part 3 at sd15 shapes (default 2)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed by the A100-hours "
                        "projection (default 0.4)")
    parser.add_argument("--project", type=Path, default=Path("."), help="project folder holding models/ and "
                        "reports/ (default .)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench.json and bench.md (default "
                        "PROJECT/reports)")


def _choices(option: str, value: str, allowed: Sequence[str]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UserError(f"{option}: expected a comma list of {', '.join(allowed)}, found {value!r}")
    return items


def options(args) -> Options:
    """Check every option; a bad one raises ``UserError`` naming it (exit status 2)."""
    import torch

    from sd_distill.models import costs

    if args.device not in DEVICES:
        raise UserError(f"--device: expected one of {', '.join(DEVICES)}, found {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                        "use --device cpu")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, found {args.dtype!r}")
    arch = costs.ARCHS["sd15"]
    step = _vae_factor(arch.vae) * 2 ** (len(arch.unet["block_out_channels"]) - 1)
    if args.resolution < step or args.resolution % step:
        raise UserError(f"--resolution: expected a positive multiple of {step} (SD v1.5's VAE and UNet downsample "
                        f"{step}x), found {args.resolution}")
    for name in ("batch", "repeats", "train_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected at least 1, found {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup: expected 0 or more, found {args.warmup}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu: expected a fraction in (0, 1], found {args.mfu}")
    return Options(args.device, args.dtype, args.batch, args.resolution, args.compile, args.channels_last)


def main(args) -> int:
    o = options(args)
    parts = _choices("--parts", args.parts, PARTS)
    shapes = _choices("--train-arch", args.train_arch, TRAIN_ARCHS)
    if not args.project.is_dir():
        raise UserError(f"--project: {args.project} is not a folder")
    out = args.out or args.project / "reports"
    session = Session(CudaTimer() if o.device == "cuda" else CpuTimer(), args.warmup, args.repeats)
    result = run(session, o, parts, args.project, train_shapes=shapes, train_batch=args.train_batch, mfu=args.mfu)
    text = render(result)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "bench.json", json.dumps(result, indent=2) + "\n")
    _write(out / "bench.md", text)
    print(text)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
