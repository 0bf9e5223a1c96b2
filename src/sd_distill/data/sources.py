"""Where image-caption pairs come from: scikit-learn's digits, a folder, parquet, or webdataset tar shards.

Every source yields ``Raw`` records: undecoded image bytes (or, for digits, a ready array), the caption
as found, and extra fields. Checking and converting happens in ``data.checks``, the same for all sources.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sd_distill.errors import UserError
from sd_distill.params import PrepareParams

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SourceError(UserError, ValueError):
    """The input as a whole cannot be read (missing folder, bad captions file, missing column)."""


@dataclass
class Raw:
    key: str
    caption: str | None
    data: bytes | None = None  # encoded image file
    array: np.ndarray | None = None  # already decoded (digits)
    extra: dict = field(default_factory=dict)


def digit_prompt(template: str, label: int) -> str:
    return template.format(word=DIGIT_WORDS[label])


def digits(p: PrepareParams, seed: int) -> Iterator[Raw]:
    """scikit-learn's 1,797 bundled 8x8 digits (0..16 ink), upscaled to ``p.resolution`` RGB, dark ink on white.

    Captions come from ``p.templates``; the template of each image is drawn from ``seed``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(p.templates), size=len(bunch.target))
    for i, (img, label) in enumerate(zip(bunch.images, bunch.target)):
        gray = (255 - img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        big = Image.fromarray(gray, mode="L").resize((p.resolution, p.resolution), Image.BICUBIC)
        rgb = np.repeat(np.asarray(big)[..., None], 3, axis=2)
        yield Raw(key=f"digits-{i:05d}", caption=digit_prompt(p.templates[choice[i]], int(label)),
                  array=rgb, extra={"label": int(label)})


def folder(p: PrepareParams) -> Iterator[Raw]:
    """A folder of image files plus ``p.captions_file`` (JSON lines: ``{"file_name": ..., "<caption_column>": ...}``),
    the layout of Hugging Face ``imagefolder`` data sets."""
    root = Path(p.path)
    index = root / p.captions_file
    if not root.is_dir():
        raise SourceError(f"prepare.path: {root} is not a folder")
    if not index.is_file():
        raise SourceError(f"{index}: captions file not found (expected JSON lines with file_name and {p.caption_column})")
    for n, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{index}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise SourceError(f"{index}:{n}: expected a JSON object with file_name and {p.caption_column}, found "
                              f"{type(row).__name__}")
        if "file_name" not in row or p.caption_column not in row:
            raise SourceError(f"{index}:{n}: expected keys file_name and {p.caption_column}, found {sorted(row)}")
        name = row["file_name"]
        path = root / name if isinstance(name, str) and name else None
        if path is None:
            data, extra = None, {"missing": f"file_name {name!r} is not a file name"}
        elif not path.resolve().is_relative_to(root.resolve()):
            data, extra = None, {"missing": f"file_name {name!r} points outside prepare.path {root}"}
        elif not path.is_file():
            data, extra = None, {"missing": str(path)}
        else:
            try:
                data, extra = path.read_bytes(), {}
            except OSError as exc:
                data, extra = None, {"missing": f"{path}: {exc.strerror}"}
        if p.score_column:
            extra["score"] = row.get(p.score_column)
        key = Path(name).stem if path is not None else f"{index.name}:{n}"
        yield Raw(key=key, caption=row[p.caption_column], data=data, extra=extra)


def parquet(p: PrepareParams) -> Iterator[Raw]:
    """Parquet file(s) with an image column (bytes, or a ``{"bytes": ...}`` struct as ``datasets`` writes) and a caption column."""
    import pyarrow.parquet as pq

    root = Path(p.path)
    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    if not files or not files[0].is_file():
        raise SourceError(f"prepare.path: no parquet file at {root}")
    for file in files:
        table = pq.read_table(file)
        wanted = [p.image_column, p.caption_column] + ([p.score_column] if p.score_column else [])
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise SourceError(f"{file}: missing column(s) {missing}; found {table.column_names}")
        for i, row in enumerate(table.select(wanted).to_pylist()):
            image = row[p.image_column]
            if isinstance(image, dict):
                image = image.get("bytes")
            extra = {"score": row[p.score_column]} if p.score_column else {}
            yield Raw(key=f"{file.stem}-{i:07d}", caption=row[p.caption_column], data=image, extra=extra)


def webdataset(p: PrepareParams) -> Iterator[Raw]:
    """Webdataset tar shards: ``KEY.jpg|png|webp`` + ``KEY.txt`` (+ ``KEY.json`` holding the score column)."""
    root = Path(p.path)
    shards = sorted(root.glob("*.tar")) if root.is_dir() else [root]
    if not shards or not shards[0].is_file():
        raise SourceError(f"prepare.path: no .tar shard at {root}")
    for shard in shards:
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile():
                        key, _, ext = member.name.rpartition(".")
                        groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        except tarfile.TarError as exc:
            raise SourceError(f"{shard}: unreadable tar shard ({exc})") from None
        for key, parts in groups.items():
            data = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            caption = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
            extra = {}
            if p.score_column:
                meta = json.loads(parts["json"]) if "json" in parts else {}
                extra["score"] = meta.get(p.score_column)
            yield Raw(key=f"{shard.stem}-{Path(key).name}", caption=caption, data=data, extra=extra)


def read_source(p: PrepareParams, seed: int) -> Iterator[Raw]:
    readers = {"digits": lambda: digits(p, seed), "folder": lambda: folder(p),
               "parquet": lambda: parquet(p), "webdataset": lambda: webdataset(p)}
    count = 0
    for raw in readers[p.source]():
        if p.max_images is not None and count >= p.max_images:
            return
        count += 1
        yield raw


def decode(data: bytes) -> Image.Image:
    """Open and fully decode; raises on unreadable or truncated files."""
    with Image.open(io.BytesIO(data)) as probe:
        probe.verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
