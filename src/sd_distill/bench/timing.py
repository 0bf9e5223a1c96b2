"""Timing for ``sd-distill bench``: measurements and the run's session (its timers are ``sd_distill.timing``'s),
device peaks, and the helpers every part shares (options, dtype, module preparation, FLOP counting)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sd_distill.timing import measure

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
def peak_tflops(device_name: str, dtype: str) -> float | None:
    return next((peaks[dtype] for key, peaks in PEAK_TFLOPS if key in device_name), None)


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

