"""Prepared data on disk: webdataset-style tar shards (``KEY.png``, ``KEY.txt``, ``KEY.json``) and a manifest.

The same layout serves every profile, so every later stage reads ``data/prepared`` one way, and any
webdataset reader can stream it too.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sd_distill.errors import MissingInput, UserError
from sd_distill.hashing import sha256_file

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class ShardError(UserError, ValueError):
    """Prepared data that do not match their manifest (changed, truncated or not written by ``prepare``); the message
    names the file, what the manifest says and what was found. Rerunning ``prepare`` rewrites them."""


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


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: same input, same shard hash
    tar.addfile(info, io.BytesIO(data))


def sample_members(sample: Sample) -> dict[str, bytes]:
    """The files of one sample in a shard, in the order they are written: ``png``, ``txt`` (UTF-8), ``json``."""
    png = io.BytesIO()
    Image.fromarray(sample.image, mode="RGB").save(png, format="PNG")
    return {"png": png.getvalue(), "txt": sample.caption.encode("utf-8"),
            "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8")}


class ShardWriter:
    """One split's samples into ``folder/{split}-NNNNN.tar``, ``shard_size`` per shard, written as they come.

    ``rows`` holds one manifest row per finished shard. ``state()`` (JSON-able) is what a new writer needs to
    continue, after its process was killed, with the same bytes an uninterrupted writer would have written: the
    finished rows and the open shard's sample count and length; the open shard is cut back to that length.
    """

    def __init__(self, folder: Path, split: str, shard_size: int, state: dict | None = None):
        self.folder, self.split, self.shard_size = Path(folder), split, shard_size
        self.rows: list[dict] = list(state["rows"]) if state else []
        self._file, self._tar, self.count = None, None, 0
        opened = state.get("open") if state else None
        if opened:
            self._file = open(self._path(), "r+b")
            self._file.truncate(opened["bytes"])
            self._file.seek(opened["bytes"])
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self.count = opened["samples"]

    def _path(self) -> Path:
        return self.folder / f"{self.split}-{len(self.rows):05d}.tar"

    @property
    def samples(self) -> int:
        return sum(r["samples"] for r in self.rows) + self.count

    def add(self, key: str, members: dict[str, bytes]) -> dict | None:
        """Append one sample (``sample_members``' files); returns the shard's manifest row if this finished it."""
        if self._tar is None:
            self._file = open(self._path(), "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self.count = 0
        for ext, data in members.items():
            _add(self._tar, f"{key}.{ext}", data)
        self.count += 1
        return self._finish() if self.count == self.shard_size else None

    def _finish(self) -> dict:
        path = self._path()
        self._tar.close()  # the end-of-archive blocks; the file is ours to close
        self._file.close()
        self._file, self._tar = None, None
        self.rows.append({"file": path.name, "split": self.split, "samples": self.count, "sha256": sha256_file(path)})
        self.count = 0
        return self.rows[-1]

    def state(self) -> dict:
        """Finished rows and the open shard (its bytes flushed to the OS, so a killed process loses none)."""
        if self._tar is None:
            return {"rows": list(self.rows), "open": None}
        self._file.flush()
        return {"rows": list(self.rows), "open": {"samples": self.count, "bytes": self._file.tell()}}

    def close(self) -> list[dict]:
        """Finish the open shard, if any; returns every manifest row of the split."""
        if self._tar is not None:
            self._finish()
        return list(self.rows)


def write_split(out: Path, split: str, samples: Iterable[Sample], shard_size: int) -> list[dict]:
    """Write ``samples`` to ``out/split-NNNNN.tar``; returns one manifest row per shard."""
    writer = ShardWriter(out, split, shard_size)
    for sample in samples:
        writer.add(sample.key, sample_members(sample))
    return writer.close()


def _iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a shard as (key, {extension: bytes}), one at a time: a sample's members are consecutive in the
    shards ``ShardWriter`` writes, so a sample is complete when the next key starts (only one is in memory)."""
    done: set[str] = set()
    key, parts = None, {}
    with tarfile.open(path, mode="r|") as tar:  # a stream: no member list kept, no seeking back
        for member in tar:
            name, _, ext = member.name.rpartition(".")
            if name != key:
                if key is not None:
                    done.add(key)
                    yield key, parts
                if name in done:
                    raise ShardError(f"{path}: the members of sample {name!r} are not consecutive; it was not "
                                     f"written by sd-distill prepare")
                key, parts = name, {}
            parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise MissingInput(f"{path}: no manifest; run `sd-distill run prepare` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); rerun `sd-distill run "
                         "prepare`") from None


def read_split(root: Path, split: str, verify: bool = True) -> Split:
    """Load one split into memory; with ``verify`` every shard's sha256 is checked against the manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    images, captions, meta = [], [], []
    for row in (r for r in manifest["shards"] if r["split"] == split):
        path = root / row["file"]
        if verify:
            check_shard(path, row, root)
        for key, parts in _iter_tar(path):
            images.append(np.asarray(Image.open(io.BytesIO(parts["png"])).convert("RGB")))
            captions.append(parts["txt"].decode("utf-8"))
            meta.append(json.loads(parts["json"]))
    if not images:
        raise ShardError(f"{root}: split {split!r} is empty: its shards in {MANIFEST} hold no sample")
    return Split(images=np.stack(images), captions=captions, meta=meta)


def split_rows(root: Path, split: str) -> list[dict]:
    """The manifest rows of ``split``'s shards, in order; raises if the split has none."""
    rows = [r for r in read_manifest(root)["shards"] if r["split"] == split]
    if not rows:
        raise ShardError(f"{Path(root) / MANIFEST}: split {split!r} has no shard")
    return rows


def check_shard(path: Path, row: dict, root: Path) -> None:
    if not path.is_file():
        raise MissingInput(f"{path}: listed in {Path(root) / MANIFEST} but missing; rerun `sd-distill run prepare`")
    if sha256_file(path) != row["sha256"]:
        raise ShardError(f"{path}: sha256 differs from {Path(root) / MANIFEST}; the shard was changed or truncated")


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
        self._index: dict[tuple[int, int], np.ndarray] = {}  # (pid, shard) -> (samples, 2) offsets and sizes

    def __len__(self) -> int:
        return self.size

    def __getstate__(self):
        return {**self.__dict__, "_index": {}}

    def _members(self, s: int) -> np.ndarray:
        key = (os.getpid(), s)
        if key not in self._index:
            path = self.root / self.rows[s]["file"]
            if self.verify:
                check_shard(path, self.rows[s], self.root)
            with tarfile.open(path) as tar:
                found = [(m.offset_data, m.size) for m in tar if m.name.endswith(".png")]
                self._index[key] = np.array(found, dtype=np.int64).reshape(-1, 2)  # 16 bytes a sample
            if len(self._index[key]) != self.rows[s]["samples"]:
                raise ShardError(f"{path}: {len(self._index[key])} images, {self.root / MANIFEST} says "
                                 f"{self.rows[s]['samples']}")
        return self._index[key]

    def images(self, idx) -> np.ndarray:
        """(B, H, W, 3) uint8 images of samples ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        out = []
        for i, s in zip(idx, which):
            offset, size = (int(v) for v in self._members(int(s))[i - self._starts[s]])
            with open(self.root / self.rows[s]["file"], "rb") as f:
                f.seek(offset)
                out.append(np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB")))
        return np.stack(out)
