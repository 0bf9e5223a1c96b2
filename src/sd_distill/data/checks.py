"""Per-sample checks shared by every source: each bad sample is skipped with a reason, never repaired."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sd_distill.data.shards import Sample
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
    "low_score": "below prepare.min_score (wanted filtering: not counted against max_reject_rate)",
}


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
        """Score filtering is wanted, not a defect of the input."""
        return self.reason != "low_score"


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


class Checker:
    """Stateful over one pass (it remembers hashes to find exact duplicates)."""

    def __init__(self, p: PrepareParams):
        self.p = p
        self.seen: dict[str, str] = {}

    def __call__(self, raw: Raw) -> Sample | Reject:
        p = self.p
        if raw.data is None and raw.array is None:
            return Reject(raw.key, "missing", raw.extra.get("missing", "no image data"))
        if p.score_column:
            score = raw.extra.get("score")
            if not isinstance(score, (int, float)) or score < p.min_score:
                return Reject(raw.key, "low_score", f"{p.score_column}={score!r} below min_score={p.min_score}")
        if raw.caption is not None and not isinstance(raw.caption, str):
            return Reject(raw.key, "caption_not_text",
                          f"caption is {type(raw.caption).__name__} {_short(raw.caption)}, expected a string")
        caption = clean_caption(raw.caption or "")
        if not caption:
            return Reject(raw.key, "empty_caption", "no caption" if raw.caption is None else f"caption {raw.caption!r}")
        if raw.array is None and not isinstance(raw.data, (bytes, bytearray)):
            return Reject(raw.key, "not_image", f"image field is {type(raw.data).__name__} {_short(raw.data)}, "
                                                "expected encoded image bytes")
        if raw.array is None and len(raw.data) == 0:
            return Reject(raw.key, "empty_file", "0 bytes")
        payload = bytes(raw.data) if raw.array is None else raw.array.tobytes()
        digest = hashlib.sha256(payload).hexdigest()
        if digest in self.seen:
            return Reject(raw.key, "duplicate", f"same bytes as {self.seen[digest]}")
        if raw.array is not None:
            image = raw.array
        else:
            try:
                decoded = decode(payload)
            except UnidentifiedImageError:
                return Reject(raw.key, "not_image", f"{len(payload)} bytes starting {payload[:8]!r}: no image format "
                                                    "PIL can read")
            except Exception as exc:  # PIL raises many types for corrupt or truncated data
                return Reject(raw.key, "unreadable", f"{type(exc).__name__}: {exc}")
            if decoded.mode != "RGB":
                return Reject(raw.key, "not_rgb", f"mode {decoded.mode}, expected RGB")
            if min(decoded.size) < p.min_size:
                return Reject(raw.key, "too_small", f"{decoded.size[0]}x{decoded.size[1]}, below min_size={p.min_size}")
            image = resize_center_crop(decoded, p.resolution)
        self.seen[digest] = raw.key
        meta = {k: v for k, v in raw.extra.items() if k != "missing"}
        return Sample(key=raw.key, image=image, caption=caption, meta=meta)
