"""A CLIP BPE tokenizer built offline from a caption vocabulary.

CLIP's tokenizer is byte-level BPE: every byte is a base symbol, the last symbol of a word carries ``</w>``,
and merges join symbols by rank. We keep that format (so ``CLIPTokenizer`` and ``StableDiffusionPipeline``
use it unchanged) and add, for every word of the captions, the chain of merges that spells it left to right.
Words outside the captions fall back to single bytes, never to an unknown token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte -> printable unicode map (Radford et al. 2019), so BPE never sees control bytes.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def caption_words(captions: Iterable[str]) -> list[str]:
    words = set()
    for caption in captions:
        words.update(_WORD.findall(caption.lower()))
    return sorted(words)


def build_tokenizer(captions: Iterable[str], max_length: int) -> CLIPTokenizer:
    """Tokenizer whose vocabulary holds every byte plus every word of ``captions`` as one token."""
    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in base + [s + "</w>" for s in base]:
        vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    byte_map = _bytes_to_unicode()
    for word in caption_words(captions):
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = (current, nxt)
            current = current + nxt
            if current not in vocab:
                merges.append(merge)
                vocab[current] = len(vocab)
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
