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
   stages' own functions; and ``sd-distill plan``'s FLOP-based projection of a full sd15-profile run in
   A100-hours.

Every timing is the median of ``repeats`` timed calls after ``warmup`` untimed ones. CPU: ``time.perf_counter``;
CUDA: CUDA events, synchronized before they are read. torch is imported lazily: ``cli`` builds its parser from
``add_arguments`` for every command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from sd_distill.bench.arch import (COMPOSED, DECODERS, FINAL, FLOP_TARGET, REFERENCE, UNETS, call_rows, compose,
                                   count_arch, measure_arch, run_arch)
from sd_distill.bench.models import equal_quality, run_models
from sd_distill.bench.timing import NO_PARAMS_FILE, PEAK_TFLOPS, Measurement, Options, Session, _vae_factor, peak_tflops
from sd_distill.bench.train import project_sd15, run_train
from sd_distill.errors import UserError
from sd_distill.timing import CpuTimer, CudaTimer, FakeTimer, measure, timer_for

__all__ = ["COMPOSED", "DECODERS", "FINAL", "FLOP_TARGET", "PEAK_TFLOPS", "REFERENCE", "UNETS", "CpuTimer", "CudaTimer",
           "FakeTimer", "Measurement", "Options", "Session", "add_arguments", "call_rows", "compose", "count_arch",
           "equal_quality", "main", "measure", "measure_arch", "peak_tflops", "project_sd15", "render", "run",
           "run_arch", "run_models", "run_train"]
HELP = "time teacher against student: SD v1.5 shapes, the project's models, training steps"
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
PARTS = ("arch", "models", "train")
TRAIN_ARCHS = ("tiny", "sd15")


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
        out += [f"Projection of a full sd15-profile run at {pj['resolution']} px (`sd-distill plan`, {pj['kind']}): "
                f"{pj['gpu']['title']}, bf16 peak {pj['gpu']['peak_tflops']:.0f} TFLOP/s at an assumed MFU of "
                f"{pj['assumed_mfu']}; `sd-distill plan --profile sd15` adds each stage's GPU memory.", ""]
        out += _table(["stage", "samples", "TFLOP/sample", "A100-hours", "per sample"],
                      [[r["stage"], str(r["samples"]), _n(r["flops_per_sample"] / 1e12), _n(r["gpu_hours"]),
                        r["flops_per_sample_is"]] for r in pj["rows"]]
                      + [["total", str(sum(r["samples"] for r in pj["rows"])), "", _n(pj["total_gpu_hours"]), ""]])
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
    session = Session(timer_for(o.device), args.warmup, args.repeats)
    result = run(session, o, parts, args.project, train_shapes=shapes, train_batch=args.train_batch, mfu=args.mfu)
    text = render(result)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "bench.json", json.dumps(result, indent=2) + "\n")
    _write(out / "bench.md", text)
    print(text)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
