"""sha256 of files and folders: the one implementation behind the runner's no-work-twice check, the checkpoint
markers, the registration key and the Kubeflow fingerprint.

These digests are persisted (``checkpoints/*.done.json``, checkpoint ``COMPLETE`` markers, MLflow tags, KFP cache
keys): ``tests/test_hashing.py`` pins them on a small tree, so a change here that would orphan them fails.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from pathlib import Path

from sd_distill.names import PARAMS_RECORD

CHUNK = 1 << 20  # bytes read at a time


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: Path, leave_out: Collection[str] = ()) -> list[tuple[str, str]]:
    """(path relative to ``folder``, POSIX style; sha256) of every file under ``folder``, in path order; files
    named in ``leave_out`` are skipped at any depth."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in leave_out)
    return [(f.relative_to(folder).as_posix(), sha256_file(f)) for f in files]


def tree_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's relative paths and file hashes (the runner's params record left out)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for name, file_digest in file_hashes(path, leave_out={PARAMS_RECORD}):
        digest.update(f"{name}\0{file_digest}\n".encode())
    return digest.hexdigest()
