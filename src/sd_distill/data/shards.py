"""Prepared data on disk: webdataset-style tar shards (``KEY.png``, ``KEY.txt``, ``KEY.json``) and a manifest.

The same layout serves every profile, so every later stage reads ``data/prepared`` one way, and any
webdataset reader can stream it too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str
    meta: dict


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def labels(self) -> np.ndarray:
        """Digit labels (tiny/smoke profiles); raises if the data has none."""
        if not self.meta or "label" not in self.meta[0]:
            raise KeyError("these prepared data carry no 'label' (only the digits source has labels)")
        return np.array([m["label"] for m in self.meta], dtype=np.int64)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: same input, same shard hash
    tar.addfile(info, io.BytesIO(data))


def write_split(out: Path, split: str, samples: Iterable[Sample], shard_size: int) -> list[dict]:
    """Write ``samples`` to ``out/split-NNNNN.tar``; returns one manifest row per shard."""
    rows, tar, count, index = [], None, 0, 0

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            path = out / f"{split}-{index:05d}.tar"
            rows.append({"file": path.name, "split": split, "samples": count, "sha256": sha256_file(path)})
            tar = None

    for sample in samples:
        if tar is None:
            tar = tarfile.open(out / f"{split}-{index:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
            count = 0
        png = io.BytesIO()
        Image.fromarray(sample.image, mode="RGB").save(png, format="PNG")
        _add(tar, f"{sample.key}.png", png.getvalue())
        _add(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"))
        _add(tar, f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True).encode("utf-8"))
        count += 1
        if count == shard_size:
            close()
            index += 1
    close()
    return rows


def _iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.rpartition(".")
            if key not in groups:
                groups[key] = {}
                order.append(key)
            groups[key][ext] = tar.extractfile(member).read()
    for key in order:
        yield key, groups[key]


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `sd-distill run prepare` first")
    return json.loads(path.read_text())


def read_split(root: Path, split: str, verify: bool = True) -> Split:
    """Load one split into memory; with ``verify`` every shard's sha256 is checked against the manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    images, captions, meta = [], [], []
    for row in (r for r in manifest["shards"] if r["split"] == split):
        path = root / row["file"]
        if verify and sha256_file(path) != row["sha256"]:
            raise ValueError(f"{path}: sha256 differs from {root / MANIFEST}; the shard was changed or truncated")
        for key, parts in _iter_tar(path):
            images.append(np.asarray(Image.open(io.BytesIO(parts["png"])).convert("RGB")))
            captions.append(parts["txt"].decode("utf-8"))
            meta.append(json.loads(parts["json"]))
    if not images:
        raise ValueError(f"{root}: split {split!r} is empty")
    return Split(images=np.stack(images), captions=captions, meta=meta)


def split_rows(root: Path, split: str) -> list[dict]:
    """The manifest rows of ``split``'s shards, in order; raises if the split has none."""
    rows = [r for r in read_manifest(root)["shards"] if r["split"] == split]
    if not rows:
        raise ValueError(f"{Path(root) / MANIFEST}: split {split!r} has no shard")
    return rows


def check_shard(path: Path, row: dict, root: Path) -> None:
    if sha256_file(path) != row["sha256"]:
        raise ValueError(f"{path}: sha256 differs from {Path(root) / MANIFEST}; the shard was changed or truncated")


def iter_shard(path: Path) -> Iterator[Sample]:
    """The samples of one prepared shard, decoded one at a time, in shard order."""
    for key, parts in _iter_tar(path):
        yield Sample(key=key, image=np.asarray(Image.open(io.BytesIO(parts["png"])).convert("RGB")),
                     caption=parts["txt"].decode("utf-8"), meta=json.loads(parts["json"]))


def iter_split(root: Path, split: str, verify: bool = True) -> Iterator[Sample]:
    """Stream one split sample by sample (one shard in memory at a time); ``verify`` checks each shard's sha256
    before reading it."""
    root = Path(root)
    for row in split_rows(root, split):
        path = root / row["file"]
        if verify:
            check_shard(path, row, root)
        yield from iter_shard(path)


class PreparedImages:
    """Random access to one split's images in the prepared tar shards, without loading the split: each shard's
    member offsets are read (and its sha256 checked) the first time one of its samples is asked for. Sample i is
    the i-th of the split in shard order, as ``data/latents`` numbers them. Usable from DataLoader workers (each
    process opens its own files)."""

    def __init__(self, root: Path, split: str, verify: bool = True):
        self.root, self.verify = Path(root), verify
        self.rows = split_rows(self.root, split)
        self._starts = np.cumsum([0] + [r["samples"] for r in self.rows])
        self.size = int(self._starts[-1])
        self._index: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return self.size

    def __getstate__(self):
        return {**self.__dict__, "_index": {}}

    def _members(self, s: int) -> list[tuple[int, int]]:
        key = (os.getpid(), s)
        if key not in self._index:
            path = self.root / self.rows[s]["file"]
            if self.verify:
                check_shard(path, self.rows[s], self.root)
            with tarfile.open(path) as tar:
                self._index[key] = [(m.offset_data, m.size) for m in tar if m.name.endswith(".png")]
            if len(self._index[key]) != self.rows[s]["samples"]:
                raise ValueError(f"{path}: {len(self._index[key])} images, {self.root / MANIFEST} says "
                                 f"{self.rows[s]['samples']}")
        return self._index[key]

    def images(self, idx) -> np.ndarray:
        """(B, H, W, 3) uint8 images of samples ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        out = []
        for i, s in zip(idx, which):
            offset, size = self._members(int(s))[i - self._starts[s]]
            with open(self.root / self.rows[s]["file"], "rb") as f:
                f.seek(offset)
                out.append(np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB")))
        return np.stack(out)
