"""Timers for every latency sd-distill reports (``evaluate``'s latency, the decoder stage's speed-up, ``sd-distill
bench``): one call of ``fn`` in seconds, and ``measure``'s timed repeats after untimed warm-ups.

CPU: ``time.perf_counter``. CUDA: two CUDA events around the call, synchronized before the call and before they are
read, so queued kernels count and nothing queued earlier does. ``FakeTimer`` returns given seconds, for tests.
torch is imported only by ``CudaTimer``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol


class CpuTimer:
    """Wall seconds of ``fn()`` by ``time.perf_counter``."""

    name = "time.perf_counter"

    def time(self, fn: Callable[[], object], label: str = "") -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class CudaTimer:
    """Seconds between two CUDA events around ``fn()``; synchronizes before and before reading them."""

    name = "torch.cuda.Event"

    def time(self, fn: Callable[[], object], label: str = "") -> float:
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

    def time(self, fn: Callable[[], object], label: str = "") -> float:
        if self.run:
            fn()
        if callable(self.seconds):
            s = self.seconds(label)
        else:
            done = sum(1 for seen, _ in self.calls if seen == label)
            s = self.seconds[label][done % len(self.seconds[label])]
        self.calls.append((label, s))
        return s


class Timer(Protocol):
    name: str

    def time(self, fn: Callable[[], object], label: str = "") -> float: ...


def timer_for(device) -> CpuTimer | CudaTimer:
    """The timer for work on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``)."""
    return CudaTimer() if str(device).split(":")[0] == "cuda" else CpuTimer()


def measure(fn: Callable[[], object], warmup: int, repeats: int, timer: Timer, label: str = "") -> list[float]:
    """Seconds of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timer.time(fn, label) for _ in range(repeats)]
