"""Checkpoints of the training loop that are complete or absent, resume exactly, and need no pickle.

A checkpoint ``step-NNNNNNN/`` holds accelerate's state (model as safetensors; optimizer and scheduler loaded back
with ``weights_only=True``), the loop's own state as JSON and safetensors (step, losses, EMA, the global RNGs), the
training params it was made with, and a ``COMPLETE`` marker with every file's sha256, written last.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from sd_distill.errors import UserError
from sd_distill.hashing import file_hashes, sha256_file

_COMPLETE = "COMPLETE"


class CheckpointMismatch(UserError, RuntimeError):
    """A checkpoint exists but was made with other training params."""


@dataclass
class LoopState:
    """Checkpointed with the model: steps done and the loss history."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


def checkpoints(workdir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in workdir.glob("step-*") if (p / _COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class CorruptCheckpoint(UserError, RuntimeError):
    """A checkpoint's files do not match the sha256 its completion marker recorded, or a part is missing."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


RNG_FILE = "rng_state.json"
LOOP_FILE = "loop_state.json"
EMA_FILE, EMA_CONFIG = "ema.safetensors", "ema.json"


def rng_state() -> dict:
    """This process's global RNG state (Python, NumPy, torch CPU and CUDA) as JSON-safe values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    return {"python": [version, list(internal), gauss],
            "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
            "torch": b64(torch.get_rng_state()),
            "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    """Set the global RNGs to ``state`` (from ``rng_state``): dropout and anything else drawing from them
    continue exactly where the checkpointed run was."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    unb64 = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])


def save_loop_state(folder: Path, state: LoopState, ema: EMAModel | None) -> None:
    """What the loop itself restores, without pickle: step and losses, EMA weights, the global RNGs.

    (``Accelerator.register_for_checkpointing`` would pickle these and unpickle them with ``weights_only=False``;
    accelerate's own RNG restore is best-effort, logging instead of failing.)"""
    (folder / LOOP_FILE).write_text(json.dumps({"step": state.step, "losses": state.losses}))
    (folder / RNG_FILE).write_text(json.dumps(rng_state()))
    if ema is not None:
        config = ema.state_dict()
        shadow = config.pop("shadow_params")
        save_file({str(i): t.detach().contiguous().cpu() for i, t in enumerate(shadow)}, str(folder / EMA_FILE))
        (folder / EMA_CONFIG).write_text(json.dumps(config))


def load_loop_state(folder: Path, state: LoopState, ema: EMAModel | None) -> None:
    saved = json.loads((folder / LOOP_FILE).read_text())
    state.step, state.losses = int(saved["step"]), [float(x) for x in saved["losses"]]
    if ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise CorruptCheckpoint(f"{folder}: no {EMA_FILE} although train.ema_decay > 0")
        tensors = load_file(str(folder / EMA_FILE))
        config = json.loads((folder / EMA_CONFIG).read_text())
        ema.load_state_dict({**config, "shadow_params": [tensors[str(i)] for i in range(len(tensors))]})
    restore_rng(json.loads((folder / RNG_FILE).read_text()))


def save_checkpoint(acc: Accelerator, workdir: Path, state: LoopState, ema: EMAModel | None, fingerprint: str,
                     keep: int) -> Path:
    """Write ``step-N`` so that it is complete or absent: a temporary sibling, fsynced, a marker holding
    every file's sha256, then a rename. Older checkpoints are rotated only after that."""
    step = state.step
    final = workdir / f"step-{step:07d}"
    tmp = workdir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    acc.save_state(str(tmp))  # model (safetensors), optimizer and scheduler (loaded back weights_only)
    for pickled in tmp.glob("random_states_*.pkl"):  # accelerate's best-effort RNG copy: ours replaces it
        pickled.unlink()
    save_loop_state(tmp, state, ema)
    (tmp / "train_params.json").write_text(fingerprint)
    files = dict(file_hashes(tmp))
    for name in files:
        _fsync(tmp / name)
    (tmp / _COMPLETE).write_text(json.dumps({"step": step, "sha256": files}, indent=1))
    _fsync(tmp / _COMPLETE)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(workdir)
    for old in checkpoints(workdir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> None:
    """Refuse a checkpoint whose files differ from its marker's sha256, or that lacks its RNG state."""
    marker = json.loads((path / _COMPLETE).read_text())
    recorded = marker.get("sha256") if isinstance(marker, dict) else None
    if recorded is None:
        raise CorruptCheckpoint(f"{path}: its {_COMPLETE} marker records no file hashes (written by an older "
                                "sd-distill); rerun without --resume to start over")
    for name, digest in recorded.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{path}: {name} is missing; delete this checkpoint to resume from the one "
                                    "before, or rerun without --resume")
        if sha256_file(f) != digest:
            raise CorruptCheckpoint(f"{path}: {name} does not match the sha256 its marker recorded (corrupt or "
                                    "changed after saving); delete this checkpoint to resume from the one before, "
                                    "or rerun without --resume")
    for name in (RNG_FILE, LOOP_FILE):
        if name not in recorded:
            raise CorruptCheckpoint(f"{path}: no {'RNG' if name == RNG_FILE else 'loop'} state ({name}); an exact "
                                    "resume needs it. Delete this checkpoint to resume from the one before, or rerun "
                                    "without --resume")
