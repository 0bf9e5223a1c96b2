"""The one timer: evaluate's latency, the decoder's speed-up and the bench all measure through ``sd_distill.timing``."""

import torch

from sd_distill import bench
from sd_distill.params import EvaluateParams
from sd_distill.stages import decoder, evaluate
from sd_distill.timing import CpuTimer, CudaTimer, FakeTimer, measure, timer_for


def test_cuda_work_is_timed_by_cuda_events_and_everything_else_by_the_wall_clock():
    for device in ("cuda", "cuda:1", torch.device("cuda:0")):
        assert isinstance(timer_for(device), CudaTimer)
    for device in ("cpu", torch.device("cpu"), "mps"):
        assert isinstance(timer_for(device), CpuTimer)
    assert bench.CudaTimer is CudaTimer and bench.measure is measure  # the bench's timers are these


class FakePipe:
    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)


def test_latency_is_the_median_of_the_timed_runs_after_untimed_warmups():
    pipe, timer = FakePipe(), FakeTimer({"latency": [0.030, 0.010, 0.020, 0.500]})
    out = evaluate.latency(pipe, "a seven", 2, 1.0, EvaluateParams(latency_warmup=2, latency_repeats=3), timer)
    assert out == {"latency_ms": 20.0, "latency_repeats": 3, "peak_memory_mb": None}
    assert len(pipe.calls) == 5 and {c["num_inference_steps"] for c in pipe.calls} == {2}  # 2 untimed, 3 timed
    assert timer.calls == [("latency", 0.030), ("latency", 0.010), ("latency", 0.020)]


def test_decoder_timing_is_the_median_of_measured_repeats(monkeypatch):
    ran = []
    timer = FakeTimer({"": [0.4, 0.1, 0.3, 0.2, 0.9, 0.5, 0.6]})
    monkeypatch.setattr(decoder, "timer_for", lambda device: timer)
    assert decoder._median_seconds(lambda: ran.append(1), "cpu") == 0.4  # median of the 7 samples
    assert len(ran) == decoder.TIMING_WARMUP + decoder.TIMING_REPEATS and len(timer.calls) == decoder.TIMING_REPEATS
