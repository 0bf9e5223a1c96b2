"""Per-sample checks shared by every source: each bad sample is skipped with a reason, never repaired.

The checks of one record (``check``) are pure and run in ``prepare.workers`` processes; the ones across records
(a repeated key, the same image bytes as an earlier sample) are decided by ``stages.prepare`` in input order.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sd_distill.data.shards import Sample, sample_members
from sd_distill.data.sources import Raw, decode
from sd_distill.params import PrepareParams

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPACE = re.compile(r"\s+")


REASONS = {
    "missing": "no image file or field for the row",
    "empty_file": "a zero-byte image file",
    "not_image": "bytes in no image format PIL knows (text, HTML, ...), or an image field that is not bytes",
    "unreadable": "an image format whose data is corrupt or truncated",
    "not_rgb": "an image in another mode than RGB (grayscale, palette, RGBA, CMYK, 16-bit)",
    "too_small": "shorter side below prepare.min_size",
    "empty_caption": "no caption, or only whitespace and control characters",
    "caption_not_text": "a caption that is not a string (a number, a list, ...)",
    "duplicate": "the same image bytes as an earlier sample",
    "duplicate_key": "the same key as an earlier record (keys name the files in the shards: one would hide the other)",
    "not_downloaded": "a row img2dataset recorded as a failed download (status other than success; not counted "
                      "against max_reject_rate)",
    "low_score": "below prepare.min_score (wanted filtering: not counted against max_reject_rate)",
}


NOT_COUNTED = ("low_score", "not_downloaded")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Reject:
    key: str
    reason: str  # one of REASONS
    detail: str

    @property
    def counts_against_rate(self) -> bool:
        """Score filtering is wanted and a recorded failed download was never in the data: not defects of the input."""
        return self.reason not in NOT_COUNTED


def clean_caption(text: str) -> str:
    """Drop control characters and collapse whitespace; content is kept as written."""
    return _SPACE.sub(" ", _CONTROL.sub(" ", text)).strip()


def resize_center_crop(image: Image.Image, side: int) -> np.ndarray:
    """Shorter side to ``side`` (bicubic, antialiased), then the central ``side``x``side`` square."""
    w, h = image.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - side) // 2, (nh - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)))


@dataclass(frozen=True)
class Checked:
    """One record after the per-sample checks, as a worker sends it back: the shard files of the sample
    (``sample_members``) or why it was skipped. ``digest`` is the sha256 of the image bytes, None when the record
    was refused before they were hashed; duplicates are decided in input order by the caller."""

    key: str
    source: str
    digest: bytes | None
    members: dict[str, bytes] | None = None
    reject: Reject | None = None


def check(raw: Raw, p: PrepareParams) -> tuple[Sample | Reject, bytes | None]:
    """Every check of one record but the ones across records (same key, same image): the sample, or the first
    reason to skip it; and the sha256 of its image bytes (None if it was refused before hashing)."""
    if raw.extra.get("status") not in (None, "success"):
        return Reject(raw.key, "not_downloaded", f"status {raw.extra['status']!r}, expected 'success'"), None
    if raw.data is None and raw.array is None:
        return Reject(raw.key, "missing", raw.extra.get("missing", "no image data")), None
    if p.score_column:
        score = raw.extra.get("score")
        if not isinstance(score, (int, float)) or score < p.min_score:
            return Reject(raw.key, "low_score", f"{p.score_column}={score!r} below min_score={p.min_score}"), None
    if raw.caption is not None and not isinstance(raw.caption, str):
        return Reject(raw.key, "caption_not_text",
                      f"caption is {type(raw.caption).__name__} {_short(raw.caption)}, expected a string"), None
    caption = clean_caption(raw.caption or "")
    if not caption:
        return Reject(raw.key, "empty_caption",
                      "no caption" if raw.caption is None else f"caption {raw.caption!r}"), None
    if raw.array is None and not isinstance(raw.data, (bytes, bytearray)):
        return Reject(raw.key, "not_image", f"image field is {type(raw.data).__name__} {_short(raw.data)}, "
                                            "expected encoded image bytes"), None
    if raw.array is None and len(raw.data) == 0:
        return Reject(raw.key, "empty_file", "0 bytes"), None
    payload = bytes(raw.data) if raw.array is None else raw.array.tobytes()
    digest = hashlib.sha256(payload).digest()
    if raw.array is not None:
        image = raw.array
    else:
        try:
            decoded = decode(payload)
        except UnidentifiedImageError:
            return Reject(raw.key, "not_image", f"{len(payload)} bytes starting {payload[:8]!r}: no image format "
                                                "PIL can read"), digest
        except Exception as exc:  # PIL raises many types for corrupt or truncated data
            return Reject(raw.key, "unreadable", f"{type(exc).__name__}: {exc}"), digest
        if decoded.mode != "RGB":
            return Reject(raw.key, "not_rgb", f"mode {decoded.mode}, expected RGB"), digest
        if min(decoded.size) < p.min_size:
            return Reject(raw.key, "too_small",
                          f"{decoded.size[0]}x{decoded.size[1]}, below min_size={p.min_size}"), digest
        image = resize_center_crop(decoded, p.resolution)
    meta = {k: v for k, v in raw.extra.items() if k not in ("missing", "status")}
    return Sample(key=raw.key, image=image, caption=caption, meta=meta), digest


def check_chunk(raws: list[Raw], p: PrepareParams) -> list[Checked]:
    """``check`` and PNG-encode a chunk of records, in order: the work ``prepare.workers`` processes share."""
    out = []
    for raw in raws:
        result, digest = check(raw, p)
        if isinstance(result, Reject):
            out.append(Checked(raw.key, raw.source, digest, reject=result))
        else:
            out.append(Checked(raw.key, raw.source, digest, members=sample_members(result)))
    return out
