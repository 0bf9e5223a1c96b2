"""``make bench-data``: how ``prepare``, ``encode`` and a training stage scale with the number of samples.

For each N: N synthetic LAION-like pairs (JPEG images of random shapes on noise, every caption different) in a
folder with ``metadata.jsonl``, and a project whose teacher is a local folder with SD v1.5's structure at reduced
width (``sd_shaped_teacher``; random weights: throughput and memory do not depend on them). Each stage runs as its
own ``sd-distill run`` process, as an orchestrator runs it, and is measured from outside:

- seconds and images per second (``prepare`` with 1 and 2 workers, ``encode``);
- peak resident memory (the largest ``ru_maxrss`` of the stage's processes, DataLoader workers included);
- for the training stage (``vpred``), the time from process start to its first optimizer step (the loop's
  ``step 1/`` log line), its samples/s from the first to the last step with rows read from ``data/latents`` by
  DataLoader workers, and the time it waited for them (``Prefetch``'s log line): samples/s with that wait taken out
  is what the same steps give on latents already in memory, so equal figures mean loading is not the bottleneck.

Writes ``bench_data.json`` (every figure and the machine) and ``bench_data.md`` (the table) to ``--out``. Every
stage's figures carry the commit and the date they were measured at. ``--stages encode`` (for example) measures only
that stage (the others run as set-up, unmeasured) and replaces its figures in the rows already in ``--out``, so a
change to one stage is re-measured without repeating the hours the others take; the table names the stages
measured at another commit than the rest of their row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess  # nosec B404: runs sd-distill from this environment, an argument list, no shell
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("red", "blue", "green", "old", "small", "large", "bright", "dark", "wooden", "stone", "cat", "dog", "house",
         "tree", "car", "river", "mountain", "street", "boat", "bird", "painting", "photo", "portrait", "city")
# time.time() and ru_maxrss of a stage run in a child process; printed as one JSON line on stdout
BATCH = 16  # the training stage's batch
# data.feed.Prefetch's line at the end of a training stage: seconds waited for the first batch and for the others
WAITED = re.compile(r"waited ([\d.]+) s for the first \(workers starting\) and ([\d.]+) s for all later ones")
PROBE = ("import json, resource, subprocess, sys, time; start = time.time(); "
         "rc = subprocess.run(sys.argv[1:]).returncode; "
         "print(json.dumps({'rc': rc, 'start': start, 'end': time.time(), "
         "'peak_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def synthetic_pairs(folder: Path, n: int, side: int, seed: int = 0) -> None:
    """``n`` JPEG images (``side`` px, random rectangles and ellipses on noise) and a ``metadata.jsonl`` whose
    captions are all different (random words and the sample's number), as web-crawled pairs are."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as index:
        for i in range(n):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            for _ in range(4):
                x0, y0 = rng.integers(0, side // 2, 2)
                x1, y1 = (x0, y0) + rng.integers(side // 8, side // 2, 2)
                shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
                shape((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            name = f"images/{i:07d}.jpg"
            image.save(folder / name, quality=90)
            words = " ".join(rng.choice(WORDS, size=6))
            index.write(json.dumps({"file_name": name, "text": f"a {words}, picture {i}"}) + "\n")


def sd_shaped_teacher(folder: Path, side: int) -> None:
    """A stock ``StableDiffusionPipeline`` folder with SD v1.5's structure at reduced width, random weights: a UNet
    of four stages with two layers each (cross-attention in the outer three), 768-wide cross-attention from a
    77-token CLIP text encoder, an 8x ``AutoencoderKL`` with 4 latent channels."""
    from sd_distill.models import parts
    from sd_distill.models.tokenizer import build_tokenizer
    from sd_distill.params import TeacherParams, TextArch, UnetArch, VaeArch

    vae = parts.build_vae(VaeArch(block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8))
    tokenizer = build_tokenizer([f"a {' '.join(WORDS)}, picture 0123456789"], 77)
    text = TextArch(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=512,
                    max_length=77)
    text_encoder = parts.build_text_encoder(text, tokenizer)
    unet = parts.build_unet(UnetArch(block_out_channels=(32, 64, 128, 128), layers_per_block=2, attention_head_dim=8,
                                     norm_num_groups=8), sample_size=side // 8, in_channels=4, cross_attention_dim=768)
    scheduler = parts.build_sampling_scheduler(TeacherParams())
    parts.assemble(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(folder, safe_serialization=True)


def run_stage(project: Path, stage: str, sets: list[str]) -> dict:
    """``sd-distill run STAGE`` in ``project`` as its own process; seconds, peak RSS and the first step's time."""
    cli = Path(sys.executable).with_name("sd-distill")
    args = [sys.executable, "-c", PROBE, str(cli), "run", stage, "--params", str(project / "params.yaml"), "--force"]
    for item in sets:
        args += ["--set", item]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    proc = subprocess.Popen(  # nosec B603: this Python and the sd-distill beside it, an argument list, no shell
        args, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first_step = last_step = waited = None
    for line in proc.stderr:  # the loop logs "name: step k/N ..." after each optimizer step (log_every 1)
        step = re.search(r": step (\d+)/(\d+) ", line)
        if step and step[1] == "1" and first_step is None:
            first_step = time.time()
        if step and step[1] == step[2]:
            last_step = time.time()
        wait = WAITED.search(line)
        if wait:
            waited = float(wait[2])
    out = proc.stdout.read()
    proc.wait()
    record = json.loads(out.strip().splitlines()[-1])
    if record["rc"]:
        raise RuntimeError(f"bench-data: {stage} failed with status {record['rc']} in {project}")
    done = json.loads((project / "checkpoints" / f"{stage}.done.json").read_text())
    return {"seconds": record["end"] - record["start"], "peak_rss_mb": record["peak_rss_kb"] / 1024,
            "first_step_seconds": None if first_step is None else first_step - record["start"],
            "first_to_last_step_seconds": None if last_step is None else last_step - first_step,
            "data_wait_seconds": waited, "summary": done.get("summary", {})}


STAGES = ("prepare", "encode", "vpred")


def provenance() -> dict:
    """The commit of the code measured (``+dirty`` with uncommitted changes) and today's date."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str:
        argv = ["git", *args]
        return subprocess.run(argv, cwd=root, capture_output=True, text=True).stdout.strip()  # nosec B603: git, no shell

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return {"commit": commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""),
            "date": time.strftime("%Y-%m-%d")}


def bench_size(work: Path, teacher: Path, n: int, side: int, train_steps: int,
               stages: tuple[str, ...] = STAGES) -> dict:
    """One row: the figures of ``stages`` at N = ``n`` (the stages before them run unmeasured, as set-up)."""
    project = work / f"n{n}"
    synthetic_pairs(project / "raw", n, side)
    (project / "params.yaml").write_text(json.dumps({
        "profile": "smoke",
        "base": {"device": "cpu", "log_model_artifacts": False},
        "prepare": {"source": "folder", "path": str(project / "raw"), "resolution": side, "min_size": side,
                    "max_images": None, "shard_size": 1000, "max_reject_rate": 0.05},
        "teacher": {"source": str(teacher)},
        "encode": {"embeddings": "computed", "batch_size": 64},
        "vpred": {"train": {"steps": train_steps, "batch_size": BATCH, "grad_accum": 1, "log_every": 1,
                            "checkpoint_every": 1000, "warmup_steps": 0}}}))
    row, made = {"n": n}, provenance()
    last = max(STAGES.index(s) for s in stages)
    for workers in (1, 2) if "prepare" in stages else (2,):
        m = run_stage(project, "prepare", [f"prepare.workers={workers}"])
        if "prepare" in stages:
            row[f"prepare_w{workers}"] = {**m, "images_per_second": n / m["seconds"], **made}
    run_stage(project, "teacher", [])
    if last >= STAGES.index("encode"):
        m = run_stage(project, "encode", [])
        if "encode" in stages:
            row["encode"] = {**m, "images_per_second": n / m["seconds"], **made}
    if "vpred" in stages:
        v = row["vpred"] = {**run_stage(project, "vpred", []), **made}
        samples = (train_steps - 1) * BATCH  # the steps after the first, whose rows the workers read ahead
        v["samples_per_second"] = samples / v["first_to_last_step_seconds"]
        v["samples_per_second_without_data_wait"] = samples / (v["first_to_last_step_seconds"]
                                                               - v["data_wait_seconds"])
    shutil.rmtree(project / "raw")
    return row


def merge(result: dict, row: dict) -> None:
    """Put ``row``'s stages into ``result``'s row of the same N (a new row if there is none)."""
    for old in result["rows"]:
        if old["n"] == row["n"]:
            old.update(row)
            return
    result["rows"].append(row)
    result["rows"].sort(key=lambda r: r["n"])


def render(result: dict) -> str:
    lines = [f"# Data-scale benchmark ({result['side']} px, {result['machine']})", "",
             "| N | prepare img/s (1 worker) | prepare img/s (2 workers) | prepare peak RSS MB | encode img/s | "
             "encode peak RSS MB | vpred peak RSS MB | vpred s to first step | vpred samples/s (data from disk) | "
             "vpred samples/s (data wait removed) | vpred s waiting for data |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['n']:,} | {r['prepare_w1']['images_per_second']:.0f} | "
                     f"{r['prepare_w2']['images_per_second']:.0f} | {r['prepare_w1']['peak_rss_mb']:.0f} / "
                     f"{r['prepare_w2']['peak_rss_mb']:.0f} | {r['encode']['images_per_second']:.0f} | "
                     f"{r['encode']['peak_rss_mb']:.0f} | {r['vpred']['peak_rss_mb']:.0f} | "
                     f"{r['vpred']['first_step_seconds']:.1f} | {r['vpred']['samples_per_second']:.1f} | "
                     f"{r['vpred']['samples_per_second_without_data_wait']:.1f} | "
                     f"{r['vpred']['data_wait_seconds']:.2f} |")
    def at(commit: str, date: str) -> str:
        return f"{commit} ({date})" if date else commit

    notes = [f"- N={r['n']:,}: {', '.join(f'{k} at {at(*v)}' for k, v in stages.items())}"
             for r in result["rows"] if len(set((stages := measured(r)).values())) > 1]
    if notes:
        lines += ["", "Measured at different commits (stage: commit, date):", *notes]
    return "\n".join(lines) + "\n"


def measured(row: dict) -> dict[str, tuple[str, str]]:
    """Stage -> (commit, date) of a row's figures (figures written before they carried one: 'an
    earlier commit', no date)."""
    return {k: (v.get("commit", "an earlier commit"), v.get("date", "")) for k, v in row.items()
            if k in ("prepare_w1", "prepare_w2", "encode", "vpred")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_distill.bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="comma list of sample counts N")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--train-steps", type=int, default=20,
                        help="optimizer steps of the training stage (at least 2: samples/s is timed after the first)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for bench_data.json/.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma list of the stages to measure (default: all); with fewer, their figures replace "
                             "those in --out's bench_data.json, whose rows must then exist")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = tuple(s for s in STAGES if s in args.stages.split(","))
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown or not stages:
        parser.error(f"--stages: {', '.join(sorted(unknown)) or args.stages!r} not among {', '.join(STAGES)}")
    import platform

    result = {"side": args.resolution, "machine": f"{os.cpu_count()} cores, {platform.processor() or 'cpu'}",
              "rows": []}
    if stages != STAGES:
        if not (args.out / "bench_data.json").is_file():
            parser.error(f"--stages {args.stages}: no {args.out / 'bench_data.json'} to update; measure every stage "
                         f"first")
        result = json.loads((args.out / "bench_data.json").read_text())
        missing = [n for n in sizes if n not in {r["n"] for r in result["rows"]}]
        if result["side"] != args.resolution or missing:
            parser.error(f"--stages {args.stages}: {args.out / 'bench_data.json'} has no full row for N={missing} "
                         f"at {args.resolution} px (found {result['side']} px); measure every stage first")
    work = args.work or Path(tempfile.mkdtemp(prefix="sd-distill-bench-data-"))
    teacher = work / "teacher"
    if not teacher.is_dir():
        sd_shaped_teacher(teacher, args.resolution)
    args.out.mkdir(parents=True, exist_ok=True)
    for n in sizes:  # the files are rewritten after every N, so a run stopped at a large N keeps the smaller ones
        merge(result, bench_size(work, teacher, n, args.resolution, args.train_steps, stages))
        (args.out / "bench_data.json").write_text(json.dumps(result, indent=2))
        (args.out / "bench_data.md").write_text(render(result))
        print(f"bench-data: N={n:,} done", file=sys.stderr)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
