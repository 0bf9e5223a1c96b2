"""``make bench-one-step``: the one-step students measured where one run of the DAG cannot say enough.

Run in a project after ``make run``: it reads ``params.yaml``, ``models/``, ``data/`` and ``reports/metrics.json``
and writes only ``one_step.json`` / ``one_step.md`` (to ``--out``) and its scratch folder (``--work``). Every model
is scored by ``evaluate``'s own suite (the same prompts, sampling seeds and real-image reference as
``reports/metrics.json``), so its figures sit beside the teacher's there.

- ``seeds``: the ``dmd`` stage's training (``stages.dmd.refine``, the stage's code and params) once per training
  seed, each generator scored at one step: FID, accuracy and diversity as mean ± sd, and their ratios to the
  teacher at ``evaluate.sampling_steps`` CFG steps. 500-image FID moves by a few hundredths between seeds, the size of the
  gains looked for. The run whose seed is ``base.seed`` must end bit for bit on ``models/dmd`` (checked).
- ``ablations``: DMD2's rows, each at the default's stage time: ``objective`` dm (no GAN) and gan (no distribution
  matching), ``real_score`` guided (the w-input model, one call, instead of CFG on the guidance-free model). Their
  optimizer steps are the default's times the ratio of seconds per step measured on a short calibration run of
  each (same ratio of generator to fake-score updates), so each trains for about the same wall time.
- ``snapfusion``: SnapFusion's chain (Li et al. 2023): six halving rounds 64 -> 1 from ``models/vpred`` (no
  guidance stage, no pruning), students without a w input trained with ``halve.loss: cfg_aware`` (``halve.cfg_prob``,
  ``halve.ori_weight``) and sampled with CFG at ``evaluate.guidance``, against the w-input chain's ``models/steps-4``
  and ``models/steps-1`` at 4 and 1 steps: quality, UNet calls per image, parameters and latency, measured here side
  by side. Its students are kept in ``--work`` and reused by a later run with the same params.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("seeds", "ablations", "snapfusion")
ABLATIONS = ({"objective": "dm"}, {"objective": "gan"}, {"real_score": "guided"})
CALIBRATION_CYCLES = 4  # generator updates in a calibration run (fake-score updates: that times update_ratio)
QUALITY = ("fid", "accuracy", "diversity")
log = logging.getLogger("sd_distill.bench.one_step")


class Project:
    """A project after ``make run``: its params, input folders by the registry's roles, the evaluation suite and
    the teacher's figures from ``reports/metrics.json``."""

    def __init__(self, root: Path):
        from sd_distill import registry
        from sd_distill.errors import UserError
        from sd_distill.params import resolve
        from sd_distill.stages.reference import Reference

        self.root = Path(root)
        self.params = resolve(self.root / "params.yaml")
        metrics = self.root / "reports" / "metrics.json"
        if not metrics.is_file():
            raise UserError(f"{metrics}: not found; run `make run` (or `sd-distill repro`) in {self.root} first")
        self.metrics = json.loads(metrics.read_text())
        self.inputs = {role: self.root / path for role, path in registry.get("dmd").inputs.items()}
        self.models = self.root / "models"
        self.real = Reference(self.root / "data" / "reference")
        self._suite = None

    @property
    def suite(self):
        if self._suite is None:
            from sd_distill.models.parts import pick_device
            from sd_distill.scoring import DigitSuite, TextImageSuite
            from sd_distill.stages.reference import output_side

            p, seed = self.params.evaluate, self.params.base.seed
            if p.suite == "text-image":
                self._suite = TextImageSuite(p, seed, output_side(self.models / "teacher"),
                                             pick_device(self.params.base), self.real)
            else:
                self._suite = DigitSuite(self.root / "data" / "prepared", self.real, p, seed)
        return self._suite

    def teacher(self) -> dict:
        return {k: self.metrics["teacher"].get(k) for k in (*QUALITY, "unet_calls_per_image", "latency_ms")}

    def score(self, pipe, steps: int) -> dict:
        """``evaluate``'s figures for ``pipe`` at ``steps`` (quality, UNet calls, latency, parameters)."""
        from sd_distill.models.parts import count_parameters
        from sd_distill.stages import evaluate

        p = self.params.evaluate
        calls = steps * (1 if pipe.unet.config.time_cond_proj_dim is not None or p.guidance <= 1 else 2)
        metrics, _ = evaluate.score(pipe, self.suite, p, steps, calls)
        metrics.update(evaluate.latency(pipe, self.suite.latency_prompt, steps, p.guidance, p))
        metrics["unet_parameters"] = count_parameters(pipe.unet)
        teacher = self.metrics["teacher"]
        for key in QUALITY:
            if metrics.get(key) is not None and teacher.get(key):
                metrics[f"{key}_ratio"] = metrics[key] / teacher[key]
        return metrics


def train_dmd(project: Project, update: dict, seed: int, work: Path):
    """One run of the dmd stage's training with ``update`` applied to its params and training seed ``seed``;
    returns the generator's pipeline and the training seconds."""
    from sd_distill.data import latents as latent_data
    from sd_distill.models.parts import pick_device
    from sd_distill.stages import dmd

    params = project.params
    train = params.dmd.train.model_copy(update=update.pop("train", {}))
    p = params.dmd.model_copy(update={**update, "train": train})
    base = params.base.model_copy(update={"seed": seed})
    pipe, real_unet, fake_unet, _ = dmd.load_networks(project.inputs, p)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    with latent_data.from_disk(project.inputs["latents"], pipe, "dmd", "steps-1", p.train, base.seed,
                               pick_device(base)) as latents:
        pipe = dmd.refine(pipe, real_unet, fake_unet, latents, p, base, work)
    return pipe, time.perf_counter() - start, p


def same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def mean_sd(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def run_seeds(project: Project, seeds: list[int], work: Path) -> dict:
    from sd_distill.models.parts import load_pipeline

    runs = []
    for seed in seeds:
        pipe, seconds, p = train_dmd(project, {}, seed, work / f"dmd-seed{seed}")
        row = {"seed": seed, "train_seconds": seconds, "train_steps": p.train.steps,
               "generator_updates": p.generator_updates(), **project.score(pipe, 1)}
        if seed == project.params.base.seed and (project.models / "dmd").is_dir():
            row["same_weights_as_models_dmd"] = same_weights(pipe.unet, load_pipeline(project.models / "dmd").unet)
        runs.append(row)
        log.info("one-step bench: dmd seed %d: FID %.3f (ratio %.3f), accuracy %.3f, diversity %.3f, %.0f s", seed,
                 row["fid"], row.get("fid_ratio", float("nan")), row["accuracy"], row.get("diversity") or 0, seconds)
    summary = {key: mean_sd(runs, key) for key in (*QUALITY, *(f"{k}_ratio" for k in QUALITY), "train_seconds")}
    return {"runs": runs, "summary": summary}


def calibrate(project: Project, update: dict, seed: int, work: Path) -> float:
    """Seconds per loop step of a variant, on a short run with its update ratio and no warm-up."""
    ratio = update.get("update_ratio", project.params.dmd.update_ratio)
    steps = CALIBRATION_CYCLES * ratio
    train = {**update.get("train", {}), "steps": steps, "checkpoint_every": steps}
    _, seconds, _ = train_dmd(project, {**update, "fake_warmup": 0, "train": train}, seed, work)
    return seconds / steps


def parse_variant(spec: str) -> dict:
    """``objective=dm,train.learning_rate=1e-5`` -> a dmd params update (``train.`` keys into its train section);
    values are numbers where they read as one (``1e-5`` too, which YAML 1.1 takes for a string), else YAML."""
    import yaml

    def scalar(text: str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return yaml.safe_load(text)

    update: dict = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--variant {spec!r}: expected key=value[,key=value], found {item!r}")
        if key.startswith("train."):
            update.setdefault("train", {})[key[len("train."):]] = scalar(value)
        else:
            update[key] = scalar(value)
    return update


def variant_name(update: dict) -> str:
    flat = {**{k: v for k, v in update.items() if k != "train"},
            **{f"train.{k}": v for k, v in update.get("train", {}).items()}}
    return ", ".join(f"{k}={v}" for k, v in flat.items())


def run_ablations(project: Project, seed: int, work: Path, default_run: dict | None,
                  variants: tuple[dict, ...] = ABLATIONS) -> list[dict]:
    p = project.params.dmd
    per_step = {"default": calibrate(project, {}, seed, work / "calibrate-default")}
    rows = []
    if default_run is None and seed == project.params.base.seed:  # the DAG's own run: models/dmd
        default_run = {"train_steps": p.train.steps, "generator_updates": p.generator_updates(),
                       "train_seconds": None, **project.metrics.get("models", {}).get("dmd@1", {})}
    if default_run is not None:
        rows.append({"variant": "both, cfg (default)", "seed": seed, "per_step_seconds": per_step["default"],
                     **{k: v for k, v in default_run.items() if k != "seed"}})
    for i, update in enumerate(variants):
        name = variant_name(update)
        train = update.get("train", {})
        per_step[name] = calibrate(project, {**update, "train": dict(train)}, seed, work / f"calibrate-{i}")
        steps = max(p.fake_warmup + 1, round(p.train.steps * per_step["default"] / per_step[name]))
        pipe, seconds, q = train_dmd(project, {**update, "train": {**train, "steps": steps}}, seed,
                                     work / f"ablation-{i}")
        row = {"variant": name, "seed": seed, "per_step_seconds": per_step[name], "train_steps": steps,
               "generator_updates": q.generator_updates(), "train_seconds": seconds, **project.score(pipe, 1)}
        rows.append(row)
        log.info("one-step bench: %s: %d steps, FID %.3f, accuracy %.3f, %.0f s", name, steps, row["fid"],
                 row["accuracy"], seconds)
    return rows


def snapfusion_students(project: Project, work: Path) -> tuple[dict[int, Path], dict[int, float]]:
    """SnapFusion's chain from ``models/vpred`` (see the module docstring); students under ``work/snapfusion``,
    reused when their card records the same params."""
    from sd_distill.data import latents as latent_data
    from sd_distill.models.parts import Needs, load_pipeline, pick_device
    from sd_distill.names import MODEL_CARD
    from sd_distill.params import HALVING_STEPS
    from sd_distill.stages import halve

    params = project.params
    p = params.halve.model_copy(update={"loss": "cfg_aware"})
    recipe = {"loss": p.loss, "cfg_prob": p.cfg_prob, "ori_weight": p.ori_weight, "w_min": p.w_min, "w_max": p.w_max,
              "round_train_steps": {str(k): v for k, v in p.round_train_steps.items()}, "seed": params.base.seed}
    needs = Needs(stage="bench one-step", producer="vpred", prediction_type="v_prediction", guidance_input=False)
    source = project.models / "vpred"
    pipe = load_pipeline(source, needs=needs)
    folders, seconds = {}, {}
    teacher_steps = 2 * HALVING_STEPS[0]
    for n in HALVING_STEPS:
        folder = work / "snapfusion" / f"steps-{n}"
        card = folder / MODEL_CARD
        if card.is_file() and json.loads(card.read_text()).get("recipe") == recipe:
            pipe = load_pipeline(folder, needs=needs)
        else:
            start = time.perf_counter()
            with latent_data.from_disk(project.inputs["latents"], pipe, f"snapfusion@{n}", source.name,
                                       p.train_for(n), params.base.seed, pick_device(params.base)) as latents:
                pipe = halve.distill_round(pipe, latents, n, teacher_steps, p, params.base, work / f"snapfusion@{n}")
            seconds[n] = time.perf_counter() - start
            pipe.save_pretrained(folder, safe_serialization=True)
            card.write_text(json.dumps({"num_inference_steps": n, "sampling": "classifier-free guidance",
                                        "teacher_steps": teacher_steps, "recipe": recipe,
                                        "train_seconds": seconds[n]}, indent=2))
            log.info("one-step bench: SnapFusion round %d -> %d steps: %.0f s", teacher_steps, n, seconds[n])
        seconds.setdefault(n, json.loads(card.read_text()).get("train_seconds"))
        folders[n] = folder
        teacher_steps = n
    return folders, seconds


def run_snapfusion(project: Project, work: Path, steps: tuple[int, ...] = (4, 1)) -> list[dict]:
    from sd_distill.models.parts import load_pipeline

    folders, seconds = snapfusion_students(project, work)
    rows = []
    for n in steps:
        for chain, folder in (("w input (dvc.yaml: guidance, prune, halving)", project.models / f"steps-{n}"),
                              ("SnapFusion (from vpred, CFG-aware, sampled with CFG)", folders[n])):
            row = {"chain": chain, "steps": n, **project.score(load_pipeline(folder), n)}
            if folder == folders[n]:
                row["chain_train_seconds"] = sum(v for k, v in seconds.items() if k >= n and v is not None)
            rows.append(row)
            log.info("one-step bench: %s at %d steps: FID %.3f, accuracy %.3f, %d calls, %.1f ms", chain, n,
                     row["fid"], row["accuracy"], row["unet_calls_per_image"], row["latency_ms"])
    return rows


def _pm(summary: dict, key: str, digits: int = 3) -> str:
    s = summary.get(key) or {}
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}" if s else "–"


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(result: dict) -> str:
    t = result["teacher"]
    lines = [f"# One-step students ({result['machine']}, at {result['commit']}, {result['date']})", "",
             f"Teacher at {result['teacher_steps']} CFG steps (reports/metrics.json): FID {_f(t['fid'])}, accuracy "
             f"{_f(t['accuracy'])}, diversity {_f(t.get('diversity'))}, {t['unet_calls_per_image']} UNet calls, "
             f"{_f(t['latency_ms'], 1)} ms per image.", ""]
    if "seeds" in result:
        s = result["seeds"]["summary"]
        lines += ["## dmd over training seeds", "",
                  "| seed | train s | FID | FID / teacher | accuracy | diversity | diversity / teacher |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["seeds"]["runs"]:
            lines.append(f"| {r['seed']} | {r['train_seconds']:.0f} | {_f(r['fid'])} | {_f(r.get('fid_ratio'))} | "
                         f"{_f(r['accuracy'])} | {_f(r.get('diversity'))} | {_f(r.get('diversity_ratio'))} |")
        lines.append(f"| mean ± sd | {_pm(s, 'train_seconds', 0)} | {_pm(s, 'fid')} | {_pm(s, 'fid_ratio')} | "
                     f"{_pm(s, 'accuracy')} | {_pm(s, 'diversity')} | {_pm(s, 'diversity_ratio')} |")
        lines.append("")
    if "ablations" in result:
        lines += ["## Ablations at equal stage time (one seed)", "",
                  "| variant | s / step (calibration) | steps | generator updates | train s | FID | FID / teacher | "
                  "accuracy | diversity |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["ablations"]:
            lines.append(f"| {r['variant']} | {r['per_step_seconds']:.2f} | {r['train_steps']} | "
                         f"{r['generator_updates']} | {_f(r['train_seconds'], 0)} | {_f(r['fid'])} | "
                         f"{_f(r.get('fid_ratio'))} | {_f(r['accuracy'])} | {_f(r.get('diversity'))} |")
        lines.append("")
    if "snapfusion" in result:
        lines += ["## SnapFusion's chain against the w-input chain", "",
                  "| chain | steps | UNet calls / image | UNet params | FID | FID / teacher | accuracy | ms / image |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["snapfusion"]:
            lines.append(f"| {r['chain']} | {r['steps']} | {r['unet_calls_per_image']} | "
                         f"{r['unet_parameters'] / 1e6:.2f}M | {_f(r['fid'])} | {_f(r.get('fid_ratio'))} | "
                         f"{_f(r['accuracy'])} | {r['latency_ms']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_distill.bench.one_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("."), help="the project after `make run` (default .)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default all)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of the dmd runs (default 0,1,2)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="an ablation row of your own beside DMD2's (dmd params; train.* for its train section), "
                             "e.g. --variant train.learning_rate=1e-5; repeatable; with it, only these rows run")
    parser.add_argument("--out", type=Path, default=None, help="folder for one_step.json/.md (default PROJECT/reports)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: {', '.join(unknown)} not among {', '.join(PARTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        variants = tuple(parse_variant(v) for v in args.variant) or ABLATIONS
    except ValueError as exc:
        parser.error(f"--seeds: expected a comma list of integers, found {args.seeds!r}" if "--variant" not in str(exc)
                     else str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from sd_distill.bench import machine
    from sd_distill.bench.data import provenance
    from sd_distill.errors import UserError

    try:
        project = Project(args.project)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or project.root / "reports"
    work = args.work or Path(tempfile.mkdtemp(prefix="sd-distill-one-step-"))
    host = machine("cpu")
    result = {"machine": f"{host['cores']} cores, {host['cpu']}", "load_average_1m_at_start":
              host["load_average_1m_at_start"], **provenance(),
              "teacher_steps": project.params.evaluate.sampling_steps, "teacher": project.teacher()}
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every part, so a run stopped later keeps what it measured
        (out / "one_step.json").write_text(json.dumps(result, indent=2))
        (out / "one_step.md").write_text(render(result))

    if "seeds" in parts:
        result["seeds"] = run_seeds(project, seeds, work)
        write()
    if "ablations" in parts:
        default = next((r for r in result.get("seeds", {}).get("runs", []) if r["seed"] == seeds[0]), None)
        result["ablations"] = run_ablations(project, seeds[0], work, default, variants)
        write()
    if "snapfusion" in parts:
        result["snapfusion"] = run_snapfusion(project, work)
        write()
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
