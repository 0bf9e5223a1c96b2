"""Encoded training data on disk (``data/latents``): VAE posteriors and caption token ids, one shard per prepared shard.

Written once by the ``encode`` stage and read by every training stage by random access, so no stage runs the VAE
over the data again and none holds a split in memory. Each shard is a few NumPy ``.npy`` files (memory-mapped on
read, fixed shape per sample):

- ``{split}-NNNNN.posterior.npy``: (n, 2, C, h, w) float16, the posterior mean and std of each image (unscaled, as
  ``AutoencoderKL.encode(x).latent_dist`` gives them);
- ``{split}-NNNNN.ids.npy``: (n, L) int32, the caption's token ids (padded to the tokenizer's ``model_max_length``);
- with ``embeddings: stored`` also ``{split}-NNNNN.emb.npy``: (u, L, E) float32, the text encoder's last hidden
  states of the shard's u distinct captions, and ``{split}-NNNNN.prompt.npy``: (n,) int32, each sample's row there.

``manifest.json`` holds the sha256 of every file, the shard order (sample i of a split is sample i of the prepared
split), and fingerprints of the VAE, tokenizer and text encoder that made the data, which a reading stage checks
against its own model (``check_models``). NumPy's ``.npy`` is the format because it memory-maps with no extra
library and any tool reads it; one file per array keeps each memory map a plain fixed-shape array.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sd_distill.errors import UserError
from sd_distill.hashing import sha256_file

MANIFEST = "manifest.json"
FORMAT = 1
ARRAYS = ("posterior", "ids", "emb", "prompt")


class LatentsError(UserError, ValueError):
    """Encoded data that cannot be used: missing, changed since written, or made by another model."""


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, bytes): the same weights give the same digest whatever
    folder or file they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary and length: token ids made by one mean the same to the other."""
    body = json.dumps({"vocab": tokenizer.get_vocab(), "max_length": tokenizer.model_max_length}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def shard_name(split: str, index: int, array: str) -> str:
    return f"{split}-{index:05d}.{array}.npy"


def save_array(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as ``.npy`` via a temporary sibling, fsynced, then renamed; returns its sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return sha256_file(path)


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise LatentsError(f"{path}: no manifest of encoded latents; run `sd-distill run encode` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LatentsError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); rerun "
                           "`sd-distill run encode`") from None
    if manifest.get("format") != FORMAT:
        raise LatentsError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT}; rerun "
                           "`sd-distill run encode`")
    return manifest


def check_models(manifest: dict, where: Path, stage: str, model: str, vae, tokenizer=None, text_encoder=None) -> None:
    """Refuse latents made by another VAE (or token ids by another tokenizer, stored embeddings by another text
    encoder) than the ones of the stage's model ``model``; a part given as None is not checked."""
    found = {"vae": fingerprint(vae)}
    if tokenizer is not None:
        found["tokenizer"] = tokenizer_fingerprint(tokenizer)
    if text_encoder is not None and manifest["embeddings"] == "stored":
        found["text_encoder"] = fingerprint(text_encoder)
    if float(manifest["scaling_factor"]) != float(vae.config.scaling_factor):
        raise LatentsError(f"{stage}: {Path(where) / MANIFEST}: scaling_factor is {manifest['scaling_factor']}, but "
                           f"{model}'s VAE has {vae.config.scaling_factor}; rerun `sd-distill run encode`")
    for part, digest in found.items():
        if manifest["models"][part] != digest:
            raise LatentsError(
                f"{stage}: {Path(where) / MANIFEST}: the latents were made by a {part} with weights sha256 "
                f"{manifest['models'][part][:12]}…, but {model}'s {part} has {digest[:12]}…; the encoded data belong "
                f"to another model. Rerun `sd-distill run encode` with this model's teacher")


class Verifier:
    """Checks files against their recorded sha256 in a background thread, so a stage's first step does not wait
    for every shard to be hashed. ``check()`` raises once a mismatch was found; ``wait()`` also waits for the
    rest. A stage fails (and publishes nothing) on a mismatch, at the latest when it calls ``wait()``."""

    def __init__(self, files: list[tuple[Path, str]], where: Path):
        self.where = where
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(files,), name="verify-latents", daemon=True)
        self._thread.start()

    def _run(self, files: list[tuple[Path, str]]) -> None:
        for path, expected in files:
            if not path.is_file():
                self.error = f"{path}: missing, listed in {self.where / MANIFEST}"
                return
            if sha256_file(path) != expected:
                self.error = (f"{path}: sha256 differs from {self.where / MANIFEST}; the shard was changed or "
                              "truncated after `sd-distill run encode` wrote it. Rerun encode")
                return

    def check(self) -> None:
        if self.error:
            raise LatentsError(self.error)

    def wait(self) -> None:
        self._thread.join()
        self.check()


@dataclass
class _Shard:
    start: int  # global index of its first sample
    count: int
    files: dict[str, Path]


class LatentStore:
    """Random access to one split of ``data/latents``; safe to use from DataLoader worker processes (each process
    opens its own memory maps on first use)."""

    def __init__(self, root: Path, split: str = "train", verify: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        rows = [r for r in self.manifest["shards"] if r["split"] == split]
        if not rows:
            raise LatentsError(f"{self.root / MANIFEST}: no shard of split {split!r}; encoded splits: "
                               f"{sorted({r['split'] for r in self.manifest['shards']})}")
        self.shards, start = [], 0
        for r in rows:
            self.shards.append(_Shard(start, r["samples"], {a: self.root / f["file"] for a, f in r["files"].items()}))
            start += r["samples"]
        self.size = start
        self._starts = np.array([s.start for s in self.shards])
        self._open: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        files = [(self.root / f["file"], f["sha256"]) for r in rows for f in r["files"].values()]
        self.verifier = Verifier(files, self.root) if verify else None

    def __len__(self) -> int:
        return self.size

    @property
    def stored_embeddings(self) -> bool:
        return self.manifest["embeddings"] == "stored"

    def __getstate__(self):  # sent to DataLoader workers: no thread, no open maps
        state = self.__dict__.copy()
        state["verifier"], state["_open"] = None, {}
        return state

    def _arrays(self, s: int) -> dict[str, np.ndarray]:
        key = (os.getpid(), s)
        if key not in self._open:
            shard = self.shards[s]
            try:
                self._open[key] = {a: np.load(p, mmap_mode="r", allow_pickle=False) for a, p in shard.files.items()}
            except (OSError, ValueError) as exc:
                raise LatentsError(f"{self.root}: shard {s} cannot be read ({exc}); rerun `sd-distill run encode`") \
                    from None
        return self._open[key]

    def rows(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Samples ``idx`` (global indices) as tensors: ``posterior`` (B, 2, C, h, w) float16, ``ids`` (B, L) int64
        and, with stored embeddings, ``emb`` (B, L, E) float32; in the order of ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"sample index out of range 0..{self.size - 1}")
        which = np.searchsorted(self._starts, idx, side="right") - 1
        first = self._arrays(0)
        post = np.empty((len(idx), *first["posterior"].shape[1:]), dtype=np.float16)
        ids = np.empty((len(idx), first["ids"].shape[1]), dtype=np.int64)
        emb = np.empty((len(idx), *first["emb"].shape[1:]), dtype=np.float32) if self.stored_embeddings else None
        for s in np.unique(which):
            at = np.nonzero(which == s)[0]
            local = idx[at] - self.shards[s].start
            arrays = self._arrays(int(s))
            post[at], ids[at] = arrays["posterior"][local], arrays["ids"][local]
            if emb is not None:
                emb[at] = arrays["emb"][arrays["prompt"][local]]
        result = {"posterior": torch.from_numpy(post), "ids": torch.from_numpy(ids)}
        if emb is not None:
            result["emb"] = torch.from_numpy(emb)
        return result
