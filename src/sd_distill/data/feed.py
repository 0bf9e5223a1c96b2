"""Read-ahead of training rows in DataLoader workers, in the order the training loop will ask for them.

The loop draws the rows of step ``s``, micro-batch ``m`` from ``step_generator(seed, s, m)``, so the indices of every
future batch are known in advance: a worker computes them with the same generator and reads those rows from disk
while the model trains on earlier ones. The loop's own draw then finds them ready (``Prefetch.get``), and a resumed
run, another process count or an out-of-memory retry of a step gets exactly the rows it would have read itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sd_distill.training.loop import step_generator, world_size

log = logging.getLogger(__name__)
Key = tuple[int, int]  # (optimizer step, micro-batch)
Load = Callable[[np.ndarray], dict[str, torch.Tensor]]


def draw_indices(size: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """The first draw of every batch: ``batch_size`` sample indices in [0, size), with replacement."""
    return torch.randint(0, size, (batch_size,), generator=gen)


class KeyedRows(Dataset):
    """Item ``(step, micro)``: the indices that batch draws first and the rows ``load`` reads for them."""

    def __init__(self, load: Load, size: int, batch_size: int, seed: int):
        self.load, self.size, self.batch_size, self.seed = load, size, batch_size, seed

    def __getitem__(self, key: Key):
        idx = draw_indices(self.size, self.batch_size, step_generator(self.seed, *key))
        return key, idx, self.load(idx.numpy())


class KeySampler(Sampler):
    """Every (step, micro) from ``start`` to the end of training, in the loop's order."""

    def __init__(self, start: Key, steps: int, micros: list[int]):
        self.start, self.steps, self.micros = start, steps, micros

    def __iter__(self) -> Iterator[Key]:
        for step in range(self.start[0], self.steps):
            for micro in self.micros:
                if (step, micro) >= self.start:
                    yield step, micro

    def __len__(self) -> int:
        return sum(1 for _ in iter(self))


class Prefetch:
    """``get(step, micro)`` returns (indices, rows) of that batch, read ahead by ``workers`` DataLoader processes
    (``prefetch`` batches each; 0 workers: read when asked). The first ``get`` starts the workers from its key, so
    a resumed run reads ahead from where it resumed.

    It keeps how long the loop waited for rows: ``first_wait`` (the first batch: the workers' start and first
    read) and ``wait`` (every later batch). ``wait`` near 0 means training ran as fast as it would on latents already
    in memory; ``finish`` logs both."""

    def __init__(self, rows: KeyedRows, steps: int, grad_accum: int, workers: int, prefetch: int, pin: bool,
                 verifier=None, name: str = "prefetch"):
        world, rank = world_size(), int(os.environ.get("RANK", "0"))
        self.rows, self.steps, self.micros = rows, steps, list(range(rank, grad_accum, world))
        self.workers, self.prefetch, self.pin = workers, prefetch, pin
        self.verifier = verifier  # a store.Verifier hashing the files being read, or None
        self._iter = None
        self._cache: dict[Key, tuple] = {}
        self.name, self.batches, self.first_wait, self.wait = name, 0, 0.0, 0.0

    def _start(self, key: Key) -> None:
        self.close()
        loader = DataLoader(self.rows, batch_size=None, sampler=KeySampler(key, self.steps, self.micros),
                            num_workers=self.workers, prefetch_factor=self.prefetch if self.workers else None,
                            pin_memory=self.pin)
        self._iter = iter(loader)

    def get(self, step: int, micro: int):
        if self.verifier is not None:
            self.verifier.check()
        key = (step, micro)
        if key not in self._cache:
            started = time.perf_counter()
            newest = max(self._cache, default=None)
            if self._iter is None or (newest is not None and key < newest):
                self._start(key)  # the first batch, or the loop went back (not done by today's loop)
            for got, idx, rows in self._iter:
                self._cache = {k: v for k, v in self._cache.items() if k[0] >= step}  # this step's, for OOM retries
                self._cache[tuple(got)] = (idx, rows)
                if tuple(got) >= key:
                    break
            if key not in self._cache:
                raise RuntimeError(f"prefetch: batch {key} not among the rows read ahead (have "
                                   f"{sorted(self._cache)}, training ends at step {self.steps})")
            waited = time.perf_counter() - started
            if self.batches:
                self.wait += waited
            else:
                self.first_wait = waited
            self.batches += 1
        return self._cache[key]

    def close(self) -> None:
        """Stop the workers (also on the way out of a failed stage)."""
        self._iter = None  # shuts the workers down
        self._cache = {}

    def finish(self) -> None:
        """Stop the workers and wait until every file read was verified; raises on a mismatch, so that a stage
        trained on a changed shard publishes nothing."""
        self.close()
        log.info("%s: %d batches read ahead by %d worker(s); waited %.2f s for the first (workers starting) and "
                 "%.2f s for all later ones", self.name, self.batches, self.workers, self.first_wait, self.wait)
        if self.verifier is not None:
            self.verifier.wait()
