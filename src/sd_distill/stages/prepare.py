"""Stage ``prepare``: image-caption pairs -> checked, deterministically split tar shards with a manifest.

Output ``data/prepared/``: ``{train,val,test}-NNNNN.tar``, ``manifest.json`` (sha256 per shard, counts,
rejects by reason), ``rejects.jsonl`` (one line per skipped sample) and, for the digits source,
``classifier/`` (the FID feature extractor and prompt-adherence judge, with its test accuracy).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sd_distill.data.checks import Checker, Reject
from sd_distill.data.shards import MANIFEST, SPLITS, Sample, read_split, write_split
from sd_distill.data.sources import read_source
from sd_distill.errors import UserError
from sd_distill.params import PrepareParams

log = logging.getLogger(__name__)


class TooManyRejects(UserError, ValueError):
    """More samples were rejected than ``prepare.max_reject_rate`` allows."""


@dataclass(frozen=True)
class Prepared:
    splits: dict[str, list[Sample]]
    rejects: list[Reject]
    seen: int

    @property
    def reject_rate(self) -> float:
        counted = sum(r.counts_against_rate for r in self.rejects)
        return counted / max(self.seen, 1)


def split_indices(n: int, p: PrepareParams, seed: int) -> dict[str, np.ndarray]:
    """Seeded permutation cut into test, val, train (in that order), each kept in input order."""
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * p.test_fraction), round(n * p.val_fraction)
    cuts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {k: np.sort(v) for k, v in cuts.items()}


def prepare(p: PrepareParams, seed: int) -> Prepared:
    """Read the source, check every sample, split the accepted ones. Pure: writes nothing."""
    checker = Checker(p)
    accepted: list[Sample] = []
    rejects: list[Reject] = []
    seen = 0
    for raw in tqdm(read_source(p, seed), desc="prepare", unit="img", disable=None):
        seen += 1
        result = checker(raw)
        (rejects if isinstance(result, Reject) else accepted).append(result)
    prepared = Prepared(splits={}, rejects=rejects, seen=seen)
    if prepared.reject_rate > p.max_reject_rate:
        counted = [r for r in rejects if r.counts_against_rate]
        reasons = Counter(r.reason for r in counted)
        examples = {reason: [r.key for r in counted if r.reason == reason][:3] for reason in reasons}
        by_reason = ", ".join(f"{reason} {n} (e.g. {', '.join(examples[reason])})" for reason, n in reasons.items())
        raise TooManyRejects(
            f"prepare: {len(counted)} of {seen} samples rejected ({prepared.reject_rate:.1%}), above "
            f"prepare.max_reject_rate={p.max_reject_rate:.1%}; by reason: {by_reason}. "
            f"Fix the input ({p.path or p.source}) or raise the threshold; nothing was written.")
    if len(accepted) < 3:
        raise UserError(f"prepare: only {len(accepted)} usable samples in {p.path or p.source}; need at least 3")
    cuts = split_indices(len(accepted), p, seed)
    splits = {name: [accepted[i] for i in cuts[name]] for name in SPLITS}
    return Prepared(splits=splits, rejects=rejects, seen=seen)


def write(prepared: Prepared, out: Path, p: PrepareParams) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for name in SPLITS:
        shards += write_split(out, name, prepared.splits[name], p.shard_size)
    with open(out / "rejects.jsonl", "w") as f:
        for r in prepared.rejects:
            f.write(json.dumps(asdict(r)) + "\n")
    manifest = {
        "source": p.source, "path": p.path, "resolution": p.resolution, "seen": prepared.seen,
        "samples": {name: len(prepared.splits[name]) for name in SPLITS},
        "rejects": dict(Counter(r.reason for r in prepared.rejects)), "reject_rate": prepared.reject_rate,
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def main(ctx) -> None:
    p: PrepareParams = ctx.params.prepare
    seed = ctx.params.base.seed
    out = ctx.outputs["data"]
    prepared = prepare(p, seed)
    manifest = write(prepared, out, p)
    ctx.summary.update({f"samples_{k}": v for k, v in manifest["samples"].items()})
    ctx.summary["rejects"] = len(prepared.rejects)
    ctx.summary["reject_rate"] = prepared.reject_rate
    log.info("prepare: %s kept, %d rejected %s", manifest["samples"], len(prepared.rejects), manifest["rejects"])
    if p.source == "digits":
        from sd_distill.models.classifier import train_classifier

        train, test = read_split(out, "train"), read_split(out, "test")
        model, acc = train_classifier(train.images, train.labels, test.images, test.labels, p.classifier, seed)
        model.save(out / "classifier", test_accuracy=acc)
        ctx.summary["classifier_test_accuracy"] = acc
        log.info("prepare: digit classifier test accuracy %.4f", acc)
