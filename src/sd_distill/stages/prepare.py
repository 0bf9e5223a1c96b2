"""Stage ``prepare``: image-caption pairs -> checked, deterministically split tar shards with a manifest.

Output ``data/prepared/``: ``{train,val,test}-NNNNN.tar``, ``manifest.json`` (sha256 per shard, counts,
rejects by reason), ``rejects.jsonl`` (one line per skipped sample) and, for the digits source,
``classifier/`` (the FID feature extractor and prompt-adherence judge, with its test accuracy).

It streams: records are read one at a time, checked (in ``prepare.workers`` processes) and appended to their
split's open shard as they come, so memory does not grow with the data set. The split of a sample depends only on
its key and ``base.seed``. The shards are written in the stage's scratch folder (``checkpoints/prepare/``) beside
``state.sqlite``: the keys and image digests seen (for exact duplicates), the rejects, and at every finished shard a
checkpoint of how far the source was read. A killed ``prepare`` started again with the same params and source
continues from its last finished shard and writes the bytes an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from sd_distill import __version__
from sd_distill.data.checks import NOT_COUNTED, Checked, Reject, check_chunk
from sd_distill.data.shards import MANIFEST, SPLITS, ShardWriter, read_split
from sd_distill.data.sources import Raw, read_source, size, source_identity
from sd_distill.errors import UserError
from sd_distill.params import PrepareParams

log = logging.getLogger(__name__)

CHUNK = 16  # records per task sent to a worker process
AHEAD = 4  # tasks in flight per worker: bounds the records and encoded samples held in memory
EARLY_STOP_MIN = 1000  # records read before a certain failure of the reject gate stops the stage early
STATE = "state.sqlite"


class TooManyRejects(UserError, ValueError):
    """More samples were rejected than ``prepare.max_reject_rate`` allows. Raised at the end of the pass (or earlier,
    once at least ``EARLY_STOP_MIN`` records were read and the rejects already exceed the rate of the source's known
    total); nothing is published, the shards written so far stay in the scratch folder for a rerun."""


@dataclass(frozen=True)
class Prepared:
    seen: int  # records read from the source
    samples: dict[str, int]  # kept, per split
    rejects: dict[str, int]  # by reason, in order of first occurrence
    counted: int  # rejects that count against max_reject_rate
    shards: list[dict]  # manifest rows, train then val then test
    work: Path  # where the shards and the state are

    @property
    def reject_rate(self) -> float:
        return self.counted / max(self.seen, 1)


def split_of(key: str, seed: int, p: PrepareParams) -> str:
    """test if u < test_fraction, val if u < test_fraction + val_fraction, else train, where u in [0, 1) is the first
    8 bytes of sha256("{seed}:{key}"): fixed per key, whatever the other samples or their order."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64
    return "test" if u < p.test_fraction else "val" if u < p.test_fraction + p.val_fraction else "train"


def resume_key(p: PrepareParams, seed: int) -> str:
    """What the shards in the scratch folder depend on: the params that change the output bytes, the seed and the
    source's files (``workers`` and ``max_reject_rate`` change no byte, ``classifier`` comes after)."""
    body = {"version": __version__, "seed": seed, "source": source_identity(p),
            "params": p.model_dump(mode="json", exclude={"workers", "max_reject_rate", "classifier"})}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class State:
    """``work/state.sqlite``: keys and image digests seen, the rejects, and the progress record (per split the
    finished shards and the open one's length, the records consumed per source file), committed together at
    every finished shard; whatever a killed process did after its last commit is rolled back and redone."""

    def __init__(self, work: Path, key: str):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.progress = self._open(key)
        if self.progress is None:
            self._reset(key)
            self.progress = {"consumed": [], "seen": 0, "splits": {}, "sizes": {}, "finished": False}
        self.consumed: list[list] = self.progress["consumed"]
        self.seen: int = self.progress["seen"]
        self.counts = dict(self.con.execute(
            "SELECT reason, count(*) FROM rejects GROUP BY reason ORDER BY min(n)").fetchall())

    def _open(self, key: str) -> dict | None:
        """The committed progress of a run with ``key`` whose shards are all still there, else None."""
        try:
            self.con = sqlite3.connect(self.work / STATE)
            row = self.con.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
            progress = self.con.execute("SELECT value FROM meta WHERE name = 'progress'").fetchone()
        except sqlite3.DatabaseError:
            return None
        if row is None or row[0] != key or progress is None:
            return None
        progress = json.loads(progress[0])
        for name, length in progress["sizes"].items():
            if not (self.work / name).is_file() or (self.work / name).stat().st_size < length:
                log.info("prepare: %s is missing or shorter than its checkpoint; starting over", self.work / name)
                return None
        return progress

    def _reset(self, key: str) -> None:
        self.con.close()
        for path in self.work.iterdir():
            if path.name.startswith(STATE) or (path.suffix == ".tar" and path.stem.startswith(SPLITS)):
                path.unlink()
        self.con = sqlite3.connect(self.work / STATE)
        self.con.executescript("""
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE keys (key TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE images (digest BLOB PRIMARY KEY, key TEXT) WITHOUT ROWID;
            CREATE TABLE rejects (n INTEGER PRIMARY KEY, key TEXT, reason TEXT, detail TEXT);
        """)
        self.con.execute("INSERT INTO meta VALUES ('key', ?)", (key,))
        self.con.commit()

    @property
    def counted(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason not in NOT_COUNTED)

    def judge(self, item: Checked) -> Reject | None:
        """The checks across records, in input order: a key used before, then the same image bytes as a kept
        sample, then the record's own checks. None: keep it (its key and digest are remembered)."""
        self.seen += 1
        if self.consumed and self.consumed[-1][0] == item.source:
            self.consumed[-1][1] += 1
        else:
            self.consumed.append([item.source, 1])
        if self.con.execute("INSERT OR IGNORE INTO keys VALUES (?)", (item.key,)).rowcount == 0:
            return Reject(item.key, "duplicate_key", f"key {item.key!r} already used by an earlier record "
                                                     f"(this one from {item.source})")
        if item.digest is None:
            return item.reject
        earlier = self.con.execute("SELECT key FROM images WHERE digest = ?", (item.digest,)).fetchone()
        if earlier is not None:
            return Reject(item.key, "duplicate", f"same bytes as {earlier[0]}")
        if item.reject is not None:
            return item.reject
        self.con.execute("INSERT INTO images VALUES (?, ?)", (item.digest, item.key))
        return None

    def reject(self, r: Reject) -> None:
        self.con.execute("INSERT INTO rejects (key, reason, detail) VALUES (?, ?, ?)", (r.key, r.reason, r.detail))
        self.counts[r.reason] = self.counts.get(r.reason, 0) + 1

    def checkpoint(self, writers: dict[str, ShardWriter], finished: bool = False) -> None:
        splits = {name: w.state() for name, w in writers.items()}  # flushes the open shards first
        files = [r["file"] for s in splits.values() for r in s["rows"]]
        files += [f"{n}-{len(s['rows']):05d}.tar" for n, s in splits.items() if s["open"]]
        self.progress = {"consumed": self.consumed, "seen": self.seen, "splits": splits, "finished": finished,
                         "sizes": {f: (self.work / f).stat().st_size for f in files}}
        self.con.execute("INSERT OR REPLACE INTO meta VALUES ('progress', ?)", (json.dumps(self.progress),))
        self.con.commit()

    def examples(self, reason: str, n: int = 3) -> list[str]:
        return [k for (k,) in self.con.execute("SELECT key FROM rejects WHERE reason = ? ORDER BY n LIMIT ?",
                                               (reason, n))]

    def close(self) -> None:
        self.con.close()


def _exit_with_parent() -> None:
    """A worker ends when the stage's process does, even killed by SIGKILL (its pool cannot tell it)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


def checked(raws: Iterator[Raw], p: PrepareParams) -> Iterator[Checked]:
    """``check_chunk`` over the records, in input order, in ``p.workers`` processes (1: here), with at most
    ``AHEAD`` chunks of ``CHUNK`` records in flight per worker. The workers are spawned, so a script that calls
    this with more than one worker needs the usual ``if __name__ == "__main__":`` guard (the CLI has it)."""
    chunks = iter(lambda: list(islice(raws, CHUNK)), [])
    if p.workers == 1:
        for chunk in chunks:
            yield from check_chunk(chunk, p)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process with storage-client threads
    pool = ProcessPoolExecutor(p.workers, mp_context=context, initializer=_exit_with_parent)
    try:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.submit(check_chunk, chunk, p))
            if len(pending) >= AHEAD * p.workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _too_many(state: State, p: PrepareParams, total: int | None = None) -> TooManyRejects:
    counted = {r: n for r, n in state.counts.items() if r not in NOT_COUNTED}
    by_reason = ", ".join(f"{r} {n} (e.g. {', '.join(state.examples(r))})" for r, n in counted.items())
    rate = state.counted / max(state.seen, 1)
    head = (f"prepare: {state.counted} of {state.seen} samples rejected ({rate:.1%})" if total is None else
            f"prepare: {state.counted} of the first {state.seen} of {total} samples rejected, more than "
            f"{p.max_reject_rate:.1%} of all {total} already")
    return TooManyRejects(
        f"{head}, above prepare.max_reject_rate={p.max_reject_rate:.1%}; by reason: {by_reason}. Fix the input "
        f"({p.path or p.source}) or raise the threshold; nothing was published (the shards so far stay in "
        f"{state.work} for a rerun)")


def prepare(p: PrepareParams, seed: int, work: Path) -> Prepared:
    """Read the source, check every record and write the kept ones to their split's shards in ``work``, resuming
    from ``work``'s last checkpoint when it was made with the same params and source. Raises ``TooManyRejects``
    above ``p.max_reject_rate`` (after the pass, so it sees every record, or once failing is certain) and
    ``UserError`` when too little is left. Either way nothing reaches ``data/prepared``: only ``write`` puts files
    there, and the runner publishes the stage's outputs only when its entry returns."""
    state = State(work, resume_key(p, seed))
    try:
        writers = {name: ShardWriter(work, name, p.shard_size, state.progress["splits"].get(name))
                   for name in SPLITS}
        if state.seen:
            log.info("prepare: resuming after %d records (%s)", state.seen,
                     ", ".join(f"{w.samples} {n}" for n, w in writers.items()))
        if not state.progress["finished"]:
            total = size(p)
            records = read_source(p, seed, [tuple(c) for c in state.consumed])
            with tqdm(total=total, initial=state.seen, desc="prepare", unit="img", disable=None) as bar:
                for item in checked(records, p):
                    reject = state.judge(item)
                    if reject is not None:
                        state.reject(reject)
                    elif writers[split_of(item.key, seed, p)].add(item.key, item.members) is not None:
                        state.checkpoint(writers)
                    bar.update()
                    if total and state.seen >= EARLY_STOP_MIN and state.counted > p.max_reject_rate * total:
                        state.checkpoint(writers)
                        raise _too_many(state, p, total)
            for w in writers.values():
                w.close()
            state.checkpoint(writers, finished=True)
        if state.counted / max(state.seen, 1) > p.max_reject_rate:
            raise _too_many(state, p)
        samples = {name: w.samples for name, w in writers.items()}
        kept = sum(samples.values())
        if kept < 3:
            raise UserError(f"prepare: only {kept} usable samples in {p.path or p.source}; need at least 3")
        if not samples["train"]:
            raise UserError(f"prepare: none of the {kept} usable samples in {p.path or p.source} fell in the train "
                            f"split (expected {1 - p.test_fraction - p.val_fraction:.0%} of the keys); need more "
                            "samples")
        for name in ("val", "test"):
            if not samples[name] and getattr(p, f"{name}_fraction") > 0:
                log.warning("prepare: split %s is empty (%d usable samples, %s_fraction %s)", name, kept, name,
                            getattr(p, f"{name}_fraction"))
        return Prepared(seen=state.seen, samples=samples, rejects=dict(state.counts), counted=state.counted,
                        shards=[row for w in writers.values() for row in w.rows], work=work)
    finally:
        state.close()


def write(prepared: Prepared, out: Path, p: PrepareParams) -> dict:
    """Move the shards into ``out`` and write ``rejects.jsonl`` and the manifest there; clears the scratch state."""
    out.mkdir(parents=True, exist_ok=True)
    state = sqlite3.connect(prepared.work / STATE)
    with open(out / "rejects.jsonl", "w") as f:
        for key, reason, detail in state.execute("SELECT key, reason, detail FROM rejects ORDER BY n"):
            f.write(json.dumps({"key": key, "reason": reason, "detail": detail}) + "\n")
    state.close()
    for row in prepared.shards:
        shutil.move(prepared.work / row["file"], out / row["file"])
    manifest = {
        "source": p.source, "path": p.path, "resolution": p.resolution, "seen": prepared.seen,
        "samples": prepared.samples, "rejects": prepared.rejects, "reject_rate": prepared.reject_rate,
        "shards": prepared.shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (prepared.work / STATE).unlink()
    return manifest


def main(ctx) -> None:
    p: PrepareParams = ctx.params.prepare
    seed = ctx.params.base.seed
    out = ctx.outputs["data"]
    prepared = prepare(p, seed, ctx.work)
    manifest = write(prepared, out, p)
    ctx.summary.update({f"samples_{k}": v for k, v in manifest["samples"].items()})
    ctx.summary["rejects"] = sum(prepared.rejects.values())
    ctx.summary["reject_rate"] = prepared.reject_rate
    log.info("prepare: %s kept, %d rejected %s", manifest["samples"], ctx.summary["rejects"], manifest["rejects"])
    if p.source == "digits":
        from sd_distill.models.classifier import train_classifier

        train, test = read_split(out, "train"), read_split(out, "test")
        model, acc = train_classifier(train.images, train.labels, test.images, test.labels, p.classifier, seed)
        model.save(out / "classifier", test_accuracy=acc)
        ctx.summary["classifier_test_accuracy"] = acc
        log.info("prepare: digit classifier test accuracy %.4f", acc)
