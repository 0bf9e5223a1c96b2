"""What a person reads: the comparison table (terminal and Markdown), the quality/latency Pareto front and plot.

Everything here works from ``reports/metrics.json`` alone (no torch import), so ``sd-distill report`` is fast and
the same table appears in the terminal, in ``reports/report.md`` and in the evaluate stage's MLflow run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sd_distill.errors import UserError


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _millions(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def _giga(value: Any) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}G"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: Callable[[Any], str]
    right: bool = True


QUALITY_KEYS = ("fid", "fid_ratio", "accuracy", "accuracy_ratio", "diversity", "diversity_ratio", "clip_score",
                "inception_score")
COLUMNS = (
    Column("name", "model", str, right=False),
    Column("unet_calls_per_image", "UNet calls", lambda v: _num(v, "d")),
    Column("fid", "FID", lambda v: _num(v, ".3f")),
    Column("fid_ratio", "FID / teacher", lambda v: _num(v, ".2f") + ("x" if v is not None else "")),
    Column("accuracy", "accuracy", lambda v: _num(v, ".3f")),
    Column("diversity", "diversity", lambda v: _num(v, ".3f")),
    Column("clip_score", "CLIP", lambda v: _num(v, ".2f")),
    Column("inception_score", "IS", lambda v: _num(v, ".2f")),
    Column("latency_ms", "ms / image", lambda v: _num(v, ".1f")),
    Column("speedup", "speedup", lambda v: _num(v, ".1f") + ("x" if v is not None else "")),
    Column("peak_memory_mb", "peak MiB", lambda v: _num(v, ".0f")),
    Column("unet_parameters", "UNet params", _millions),
    Column("unet_macs_per_image", "UNet MACs / image", _giga),
    Column("decoder", "decoder", lambda v: {"AutoencoderKL": "VAE", "AutoencoderTiny": "tiny"}.get(v, str(v)),
           right=False),
)


def load(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no metrics file; run the pipeline first (`make run` or `sd-distill run evaluate`)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(metrics.get("models"), dict) or not metrics["models"]:
        raise UserError(f"{path}: expected a non-empty 'models' mapping (written by the evaluate stage), "
                        f"found keys {sorted(metrics)}")
    return metrics


def rows(metrics: dict) -> list[dict]:
    """One row per evaluated model, in evaluation order, with the speedup against the reference teacher."""
    models = metrics["models"]
    teacher = metrics.get("teacher") or next(iter(models.values()))
    base = teacher.get("latency_ms")
    out = []
    for name, m in models.items():
        row = {"name": name, **m}
        lat = m.get("latency_ms")
        row["speedup"] = base / lat if base and lat else None
        out.append(row)
    return out


def columns_for(table: list[dict]) -> list[Column]:
    """The columns that hold a value for at least one row (CLIP/IS only in sd15, accuracy only in tiny...)."""
    return [c for c in COLUMNS if any(r.get(c.key) is not None for r in table)]


def pareto(table: list[dict], quality: str = "fid") -> list[dict]:
    """Rows with latency and quality, ``front`` true where no other model is both faster and better (lower)."""
    points = [r for r in table if r.get("latency_ms") is not None and r.get(quality) is not None]
    out = []
    for r in points:
        dominated = any(o["latency_ms"] <= r["latency_ms"] and o[quality] <= r[quality]
                        and (o["latency_ms"] < r["latency_ms"] or o[quality] < r[quality]) for o in points)
        out.append({"model": r["name"], "unet_calls_per_image": r.get("unet_calls_per_image"),
                    "latency_ms": r["latency_ms"], quality: r[quality], "accuracy": r.get("accuracy"),
                    "front": int(not dominated)})
    return out


def plot_pareto(points: list[dict], path: Path, quality: str = "fid", title: str = "") -> None:
    """Quality against latency, one labelled point per model; the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for p in points:
        family = p["model"].split("@")[0].split("-")[0]
        marker = {"teacher": "s", "student": "*"}.get(family, "o")
        ax.scatter(p["latency_ms"], p[quality], marker=marker, s=70 if marker == "*" else 30,
                   color="tab:red" if p["front"] else "tab:blue", zorder=3)
        ax.annotate(p["model"], (p["latency_ms"], p[quality]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = sorted((p for p in points if p["front"]), key=lambda p: p["latency_ms"])
    if len(front) > 1:
        ax.plot([p["latency_ms"] for p in front], [p[quality] for p in front], color="tab:red", lw=1, zorder=2,
                label="Pareto front")
        ax.legend(loc="upper right")
    ax.set_xscale("log")
    ax.set_xlabel("latency per image, ms (batch 1, median; log scale)")
    ax.set_ylabel(f"{quality.upper()} (lower is better)")
    ax.set_title(title or f"{quality.upper()} against latency")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cells(table: list[dict], cols: list[Column]) -> list[list[str]]:
    return [[c.fmt(r.get(c.key)) for c in cols] for r in table]


def markdown_table(table: list[dict]) -> str:
    cols = columns_for(table)
    lines = ["| " + " | ".join(c.header for c in cols) + " |",
             "|" + "|".join("---:" if c.right else ":---" for c in cols) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(table, cols)]
    return "\n".join(lines)


def product_lines(product: dict) -> list[str]:
    """Which UNet ``models/student`` holds and why (``assemble.source``; auto: the validation FIDs compared)."""
    source, selection = product.get("source"), product.get("selection") or {}
    if not source:
        return []
    fids = selection.get("fid")
    if not fids:
        return [f"`models/student` holds the `{source}` UNet (named by `assemble.source`).", ""]
    others = ", ".join(f"`{name}` {value:.3f}" for name, value in fids.items() if name != source)
    return [f"`models/student` holds the `{source}` UNet: `assemble.source: auto` chose it as the one-step model with "
            f"the lower FID on {selection['images']} validation captions against their {selection['real_images']} "
            f"images ({selection['features']}): {fids[source]:.3f}, against {others}. The validation split is "
            "not the test split the table below is scored on.", ""]


def markdown(metrics: dict, pictures: dict[str, str]) -> str:
    """``reports/report.md``: the headline, the full table, the pictures and how to read them."""
    table = rows(metrics)
    teacher = metrics.get("teacher", {})
    student = next((r for r in table if r["name"].startswith("student@")), None)
    lines = [f"# sd-distill report ({metrics.get('profile', '?')} profile)", ""]
    if student and teacher:
        lines += [
            f"The student makes an image in **{student['unet_calls_per_image']} UNet call(s)** against the "
            f"teacher's {teacher.get('unet_calls_per_image')}"
            + (f", **{student['speedup']:.1f}x faster** end to end" if student.get("speedup") else "")
            + f", with FID {student['fid']:.3f} against the teacher's {teacher['fid']:.3f} "
            f"({student['fid_ratio']:.2f}x)"
            + (f" and accuracy {student['accuracy']:.3f} against {teacher['accuracy']:.3f}"
               if student.get("accuracy") is not None else "")
            + ".", ""]
    lines += product_lines(metrics.get("product") or {})
    lines += ["## All models, same prompts, seeds and guidance", "", markdown_table(table), ""]
    fid_kind = metrics.get("fid_features", "digit-classifier features" if "classifier" in metrics else "Inception")
    lines += [f"FID is computed on {fid_kind} against the real held-out images"
              + (f" (two real splits score {metrics['reference']['fid_val_vs_test']:.3f} against each other)"
                 if "reference" in metrics else "") + ". Latency is the median wall time of one image at batch 1 "
              f"over repeats after a warm-up on {metrics.get('device', 'the evaluation device')}; "
              "peak memory is measured on CUDA only.", ""]
    real_diversity = metrics.get("reference", {}).get("diversity")
    if real_diversity is not None:
        lines += ["Diversity is the root-mean-square distance between two samples of the same prompt in the same "
                  "feature space, averaged over the prompts (higher: more varied samples per prompt); the real test "
                  f"images of each digit score {real_diversity:.3f}. A model can buy a lower FID with fewer modes "
                  "per prompt: read the two together.", ""]
    baselines = [r for r in table if r["name"].startswith("teacher-")]
    if baselines:
        lines += ["Rows `teacher-dpmpp@N` and `teacher-ddim@N` are what a user would run instead of distilling: "
                  "the teacher with DPM-Solver++ or DDIM at N steps (2N UNet calls with classifier-free guidance).", ""]
    for title, key in (("Samples", "grid"), ("Quality against latency", "pareto")):
        if key in pictures:
            lines += [f"## {title}", "", f"![{key}]({pictures[key]})", ""]
    if "grid" in pictures:
        lines += ["Rows, top to bottom: " + ", ".join(metrics.get("grid_rows", [])) + "; columns: the same prompts "
                  "and seeds in every row.", ""]
    return "\n".join(lines)


def print_table(metrics: dict, console=None) -> None:
    """The comparison table in the terminal (rich), with the reference teacher first."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: no terminal width to fit, keep every column whole
            console = Console(width=220)
    table = rows(metrics)
    cols = columns_for(table)
    out = Table(title=f"sd-distill: {len(table)} models, {metrics.get('profile', '?')} profile", show_lines=False)
    for c in cols:
        out.add_column(c.header, justify="right" if c.right else "left", no_wrap=True)
    for r, cells in zip(table, _cells(table, cols)):
        style = "bold" if r["name"].startswith(("student@", "teacher@")) else None
        out.add_row(*cells, style=style)
    console.print(out)
