"""Where image-caption pairs come from: scikit-learn's digits, a folder, parquet, or webdataset tar shards.

Every source yields ``Raw`` records one at a time, in a fixed order: undecoded image bytes (or, for digits, a
ready array), the caption as found, and extra fields. Checking and converting happens in ``data.checks``, the same
for all sources. Nothing is read whole: the captions file line by line, parquet by record batch (pages streamed),
tar shards one at a time member by member.

``prepare.path`` is a local path or any fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``hf://...``), opened
with ``prepare.storage_options`` (for S3: ``endpoint_url``, ``client_kwargs``, ``anon``; botocore also reads
``AWS_ENDPOINT_URL``). Credentials come from the environment or the provider's credential files, never params.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from sd_distill.errors import UserError
from sd_distill.params import PrepareParams

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp")
READ_BATCH = 64  # folder: image files fetched together (concurrently on object stores); parquet: rows per batch
NUM_DIGITS = 1797


class SourceError(UserError, ValueError):
    """The input as a whole cannot be read (missing folder, bad captions file, missing column, storage gone)."""


@dataclass
class Raw:
    key: str
    caption: str | None
    data: bytes | None = None  # encoded image file
    array: np.ndarray | None = None  # already decoded (digits)
    extra: dict = field(default_factory=dict)
    source: str = ""  # the file it came from (resume counts records per file)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What storage, tar and parquet readers raise for data they cannot read (connection lost, server gone)."""
    errors: list[type[BaseException]] = [OSError, EOFError, tarfile.TarError]
    with contextlib.suppress(ImportError):
        import pyarrow

        errors.append(pyarrow.ArrowException)
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errors.append(aiohttp.ClientError)
    return tuple(errors)


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text if len(text) <= 200 else text[:197] + '...'}"


@contextlib.contextmanager
def _reading(what: str):
    """Turn a storage or format error while reading ``what`` into one ``SourceError`` line naming it."""
    try:
        yield
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"{what}: not found") from None
    except _read_errors() as exc:
        raise SourceError(f"{what}: cannot be read ({_why(exc)})") from None


class Location:
    """``prepare.path`` opened with fsspec: a filesystem, the path inside it, and names as the user wrote them."""

    def __init__(self, p: PrepareParams):
        import fsspec

        try:
            self.path = p.path  # as the user wrote it, for messages
            self.fs, self.root = fsspec.core.url_to_fs(p.path, **p.storage_options)
        except (ImportError, ValueError, TypeError) as exc:  # unknown protocol, its package not installed, options
            raise SourceError(f"prepare.path: cannot open {p.path} ({_why(exc)})") from None
        self.local = "file" in ((self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol)
        self.root = self.root.rstrip("/") or self.root
        with _reading(f"prepare.path {self.shown(self.root)}"):
            try:
                self.info = self.fs.info(self.root)
            except FileNotFoundError:
                self.info = None
            except TypeError as exc:  # most filesystems check their options at the first call, not at creation
                raise SourceError(f"prepare.storage_options {p.storage_options} not accepted for {p.path} "
                                  f"({_why(exc)})") from None

    def shown(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def kind(self) -> str | None:
        """``"directory"``, ``"file"``, or None when nothing is there."""
        return None if self.info is None else self.info["type"]

    def files(self, suffix: str) -> list[dict]:
        """The files ending in ``suffix`` directly in the folder (or the one file) ``prepare.path`` names, by name."""
        kind = self.kind()
        if kind == "file":
            return [self.info]
        if kind != "directory":
            return []
        with _reading(f"prepare.path {self.shown(self.root)}"):
            listed = self.fs.ls(self.root, detail=True)
        return sorted((f for f in listed if f["type"] == "file" and f["name"].endswith(suffix)),
                      key=lambda f: f["name"])

    def inside(self, name: str) -> bool:
        """True when the relative file name ``name`` stays in ``prepare.path`` (no ``..``, no absolute path)."""
        if name.startswith("/") or posixpath.normpath(name).split("/")[0] == "..":
            return False
        return not self.local or Path(self.root, name).resolve().is_relative_to(Path(self.root).resolve())


def fingerprint(info: dict) -> list:
    """A file's identity for resume: name, size and the store's version tag (ETag, generation, mtime)."""
    tag = next((info[k] for k in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified") if k in info),
               None)
    return [info["name"], info.get("size"), str(tag)]


def source_identity(p: PrepareParams) -> list:
    """What ``prepare`` resumes against besides params: the files the source lists (the folder source: its
    captions file only, not every image)."""
    if p.source == "digits":
        return []
    where = Location(p)
    if p.source == "folder":
        index = posixpath.join(where.root, p.captions_file)
        with _reading(where.shown(index)), contextlib.suppress(FileNotFoundError):
            return [fingerprint(where.fs.info(index))]
        return []
    return [fingerprint(f) for f in where.files(".parquet" if p.source == "parquet" else ".tar")]


def digit_prompt(template: str, label: int) -> str:
    return template.format(word=DIGIT_WORDS[label])


def digits(p: PrepareParams, seed: int, skip: int = 0) -> Iterator[Raw]:
    """scikit-learn's 1,797 bundled 8x8 digits (0..16 ink), upscaled to ``p.resolution`` RGB, dark ink on white.

    Captions come from ``p.templates``; the template of each image is drawn from ``seed``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(p.templates), size=len(bunch.target))
    for i, (img, label) in enumerate(zip(bunch.images, bunch.target)):
        if i < skip:
            continue
        gray = (255 - img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        big = Image.fromarray(gray, mode="L").resize((p.resolution, p.resolution), Image.BICUBIC)
        rgb = np.repeat(np.asarray(big)[..., None], 3, axis=2)
        yield Raw(key=f"digits-{i:05d}", caption=digit_prompt(p.templates[choice[i]], int(label)),
                  array=rgb, extra={"label": int(label)}, source="digits")


def _index_rows(where: Location, index: str, p: PrepareParams) -> Iterator[tuple[int, dict]]:
    """The captions file's rows, read line by line: (line number, JSON object)."""
    shown = where.shown(index)
    with _reading(shown), where.fs.open(index, "rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SourceError(f"{shown}:{n}: not UTF-8 text (byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{shown}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{shown}:{n}: expected a JSON object with file_name and {p.caption_column}, "
                                  f"found {type(row).__name__}")
            if "file_name" not in row or p.caption_column not in row:
                raise SourceError(f"{shown}:{n}: expected keys file_name and {p.caption_column}, found {sorted(row)}")
            yield n, row


def _fetch(where: Location, paths: list[str]) -> list[bytes | str]:
    """Image files, fetched together (concurrently on object stores): bytes, or why a file is missing."""
    if not paths:
        return []
    with _reading(where.shown(paths[0])):
        got = where.fs.cat_ranges(paths, None, None, on_error="return")  # no glob expansion of the names
    out: list[bytes | str] = []
    for path, value in zip(paths, got):
        if isinstance(value, FileNotFoundError):
            out.append(where.shown(path))
        elif isinstance(value, (IsADirectoryError, NotADirectoryError, PermissionError)):
            out.append(f"{where.shown(path)}: {value.strerror or type(value).__name__}")
        elif isinstance(value, BaseException):
            raise SourceError(f"{where.shown(path)}: cannot be read ({_why(value)})")
        else:
            out.append(value)
    return out


def folder(p: PrepareParams, skip: int = 0) -> Iterator[Raw]:
    """A folder of image files plus ``p.captions_file`` (JSON lines: ``{"file_name": ..., "<caption_column>": ...}``),
    the layout of Hugging Face ``imagefolder`` data sets."""
    where = Location(p)
    index = posixpath.join(where.root, p.captions_file)
    if where.kind() != "directory":
        raise SourceError(f"prepare.path: {p.path} is not a folder")
    with _reading(where.shown(index)):
        found = where.fs.isfile(index)
    if not found:
        raise SourceError(f"{where.shown(index)}: captions file not found (expected JSON lines with file_name and "
                          f"{p.caption_column})")
    rows = _index_rows(where, index, p)
    for _ in islice(rows, skip):
        pass
    while batch := list(islice(rows, READ_BATCH)):
        named = [(n, row, row["file_name"]) for n, row in batch]
        paths = {name: posixpath.join(where.root, name) for _, _, name in named
                 if isinstance(name, str) and name and where.inside(name)}
        files = dict(zip(paths, _fetch(where, list(paths.values()))))
        for n, row, name in named:
            if not isinstance(name, str) or not name:
                data, extra = None, {"missing": f"file_name {name!r} is not a file name"}
            elif name not in paths:
                data, extra = None, {"missing": f"file_name {name!r} points outside prepare.path {p.path}"}
            elif isinstance(got := files[name], str):
                data, extra = None, {"missing": got}
            else:
                data, extra = got, {}
            if p.score_column:
                extra["score"] = row.get(p.score_column)
            key = Path(name).stem if isinstance(name, str) and name else f"{p.captions_file}:{n}"
            yield Raw(key=key, caption=row[p.caption_column], data=data, extra=extra, source=where.shown(index))


def parquet(p: PrepareParams, start: Sequence[tuple[str, int]] = ()) -> Iterator[Raw]:
    """Parquet file(s) with an image column (bytes, or a ``{"bytes": ...}`` struct as ``datasets`` writes) and a
    caption column, read batch by batch. img2dataset's parquet output reads as is (``image_column: jpg``,
    ``caption_column: txt``): its ``key`` column names the samples, rows whose ``status`` is not ``success`` are
    downloads that failed."""
    import pyarrow.parquet as pq

    where = Location(p)
    for info, shown, stem, done_rows in _files_to_read(where, ".parquet", "parquet file", start):
        with _reading(shown), where.fs.open(info["name"], "rb") as f:
            pf = pq.ParquetFile(f, buffer_size=1 << 22)  # pages streamed, not whole column chunks
            names = pf.schema_arrow.names
            wanted = [p.image_column, p.caption_column] + ([p.score_column] if p.score_column else [])
            missing = [c for c in wanted if c not in names]
            if missing:
                raise SourceError(f"{shown}: missing column(s) {missing}; found {names}")
            columns = wanted + [c for c in ("key", "status") if c in names and c not in wanted]
            groups, first = [], 0
            for g in range(pf.num_row_groups):  # row groups already done are not read
                rows = pf.metadata.row_group(g).num_rows
                if not groups and first + rows <= done_rows:
                    first += rows
                else:
                    groups.append(g)
            if not groups:
                continue
            batches = pf.iter_batches(batch_size=READ_BATCH, row_groups=groups, columns=columns)
            for i, row in enumerate((row for batch in batches for row in batch.to_pylist()), start=first):
                if i < done_rows:
                    continue
                image = row[p.image_column]
                if isinstance(image, dict):
                    image = image.get("bytes")
                extra = {"score": row[p.score_column]} if p.score_column else {}
                if "status" in row:
                    extra["status"] = row["status"]
                key = f"{stem}-{row['key']}" if row.get("key") is not None else f"{stem}-{i:07d}"
                yield Raw(key=key, caption=row[p.caption_column], data=image, extra=extra, source=shown)


def _member_name(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: the key up to the first dot of the base name, then the extension."""
    folder_, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder_, stem), ext.lower()


def _groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members with the same key, as webdataset groups them, streamed member by member."""
    key, parts = None, {}
    for member in tar:
        if not member.isfile():
            continue
        name, ext = _member_name(member.name)
        if name != key and key is not None:
            yield key, parts
            parts = {}
        key = name
        parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


def _meta(parts: dict[str, bytes]) -> dict:
    with contextlib.suppress(ValueError):
        meta = json.loads(parts.get("json", b"{}"))
        return meta if isinstance(meta, dict) else {}
    return {}


def webdataset(p: PrepareParams, start: Sequence[tuple[str, int]] = ()) -> Iterator[Raw]:
    """Webdataset tar shards, one at a time, streamed: ``KEY.jpg|png|webp`` + ``KEY.txt`` (+ ``KEY.json`` holding the
    score column), img2dataset's webdataset output as is."""
    where = Location(p)
    for info, shown, stem, done_members in _files_to_read(where, ".tar", ".tar shard", start):
        with _reading(shown), where.fs.open(info["name"], "rb") as f, \
                tarfile.open(fileobj=f, mode="r|") as tar:
            for key, parts in islice(_groups(tar), done_members, None):
                data = next((parts[e] for e in WEBDATASET_IMAGES if e in parts), None)
                caption = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
                extra = {"score": _meta(parts).get(p.score_column)} if p.score_column else {}
                yield Raw(key=f"{stem}-{posixpath.basename(key)}", caption=caption, data=data, extra=extra,
                          source=shown)


def _files_to_read(where: Location, suffix: str, what: str,
                   start: Sequence[tuple[str, int]]) -> Iterator[tuple[dict, str, str, int]]:
    """The source's files ending in ``suffix``, by name, as (info, name as shown, stem, records already consumed),
    leaving out those read to the end before (every file of ``start`` but its last)."""
    files = where.files(suffix)
    if not files:
        raise SourceError(f"prepare.path: no {what} at {where.path}")
    done, partial = {name for name, _ in start[:-1]}, dict(start[-1:])
    for info in files:
        shown = where.shown(info["name"])
        if shown not in done:
            yield info, shown, posixpath.basename(info["name"]).removesuffix(suffix), partial.get(shown, 0)


def size(p: PrepareParams) -> int | None:
    """How many records the source holds, where that is cheap to know (for the progress bar's ETA)."""
    total = None
    if p.source == "digits":
        total = NUM_DIGITS
    elif p.source == "parquet":
        import pyarrow.parquet as pq

        where, total = Location(p), 0
        for info in where.files(".parquet"):
            with _reading(where.shown(info["name"])), where.fs.open(info["name"], "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
    elif p.source == "folder" and Location(p).local and (Path(p.path) / p.captions_file).is_file():
        with open(Path(p.path) / p.captions_file, "rb") as f:
            total = sum(1 for line in f if line.strip())
    if p.max_images is not None:
        total = p.max_images if total is None else min(total, p.max_images)
    return total


def read_source(p: PrepareParams, seed: int, start: Sequence[tuple[str, int]] = ()) -> Iterator[Raw]:
    """The source's records in order, at most ``p.max_images``. ``start`` lists the records already consumed per
    source file in reading order (as ``Raw.source`` names them); those are skipped, every file but the last without
    opening it."""
    skip = sum(n for _, n in start)
    readers = {"digits": lambda: digits(p, seed, skip), "folder": lambda: folder(p, skip),
               "parquet": lambda: parquet(p, start), "webdataset": lambda: webdataset(p, start)}
    left = None if p.max_images is None else p.max_images - skip
    records = readers[p.source]()
    yield from records if left is None else islice(records, max(left, 0))


def decode(data: bytes) -> Image.Image:
    """Open and fully decode; raises on unreadable or truncated files."""
    with Image.open(io.BytesIO(data)) as probe:
        probe.verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
