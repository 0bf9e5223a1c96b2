"""Training data in latent space: VAE posteriors and caption embeddings, drawn by the loop's seeded generators.

Every model-training stage after ``encode`` reads ``data/latents`` (``from_disk``): posteriors and token ids by
random access, read ahead in DataLoader workers, caption embeddings stored there or computed in the step by the
frozen text encoder. None of them runs the VAE or holds a split in memory. The tiny teacher, which trains its own
VAE before anything is encoded, draws the same way from its in-memory encoding (``in_memory``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sd_distill.data.feed import KeyedRows, Prefetch, draw_indices
from sd_distill.data.store import LatentStore, check_models
from sd_distill.params import TrainParams

log = logging.getLogger(__name__)
# fetch(step, micro, idx) -> {"posterior": (B, 2, C, h, w), "cond": (B, L, E)}
Fetch = Callable[[int, int, torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(N, max_length, hidden) last hidden states, as ``StableDiffusionPipeline.encode_prompt`` computes them."""
    return embed_ids(text_encoder, tokenize(tokenizer, prompts)).cpu()


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(N, model_max_length) token ids, padded and truncated as the stock pipeline does."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def embed_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids -> (N, L, E) last hidden states, on the text encoder's device."""
    return text_encoder(ids.to(text_encoder.device))[0]


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of (N, 3, H, W) images in [-1, 1]."""
    dists = [vae.encode(images[i:i + batch].to(vae.device, vae.dtype)).latent_dist for i in range(0, len(images), batch)]
    return torch.cat([d.mean for d in dists]).float().cpu(), torch.cat([d.std for d in dists]).float().cpu()


class LatentBatches:
    """Batches of ``batch_size`` drawn for step ``step``, micro-batch ``micro`` from the loop's generator ``gen``:
    first the sample indices, then the posterior noise, then the caption-dropout coins (in that order, so every
    source of rows gives the same batches for the same generator)."""

    def __init__(self, size: int, batch_size: int, scaling: float, uncond: torch.Tensor, fetch: Fetch,
                 prefetch: Prefetch | None = None):
        self.size, self.batch_size, self.scaling = size, batch_size, scaling
        self.uncond = uncond  # (L, E): the empty prompt's embedding
        self._fetch, self.prefetch = fetch, prefetch

    def __len__(self) -> int:
        return self.size

    def draw(self, step: int, micro: int, gen: torch.Generator, caption_dropout: float = 0.0):
        """Scaled latents x (B, C, h, w), caption embeddings (B, L, E) with ``caption_dropout`` of them replaced by
        the empty prompt's, and the sample indices."""
        idx = draw_indices(self.size, self.batch_size, gen)
        rows = self._fetch(step, micro, idx)
        mean, std = rows["posterior"][:, 0].float(), rows["posterior"][:, 1].float()
        x = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling
        cond = rows["cond"].clone()
        if caption_dropout > 0:
            drop = torch.rand(self.batch_size, generator=gen) < caption_dropout
            cond[drop.to(cond.device)] = self.uncond.to(cond.device, cond.dtype)
        return x, cond, idx

    def draw_with_w(self, step: int, micro: int, gen: torch.Generator, timesteps: torch.Tensor, w_min: float,
                    w_max: float):
        """A batch for the w-conditioned stages: latents x, caption embeddings, timesteps drawn from ``timesteps``,
        guidance weights w ~ U[w_min, w_max] and the noise, each (B, ...)."""
        x, cond, _ = self.draw(step, micro, gen)
        t = timesteps[torch.randint(0, len(timesteps), (len(x),), generator=gen)]
        w = w_min + (w_max - w_min) * torch.rand(len(x), generator=gen)
        return x, cond, t, w, torch.randn(x.shape, generator=gen)

    def __enter__(self) -> "LatentBatches":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Stops the read-ahead workers; after a stage that went well, also waits for every shard's sha256 check
        and raises if one did not match its manifest (so nothing is published)."""
        if self.prefetch is not None:
            self.prefetch.close() if exc_type is not None else self.prefetch.finish()


def in_memory(vae, tokenizer, text_encoder, images: np.ndarray, captions: list[str], batch_size: int) -> LatentBatches:
    """Encode a split once with a pipeline's own VAE and text encoder and draw from memory (the tiny teacher,
    which trains its VAE before the ``encode`` stage can run, and benchmarks)."""
    mean, std = encode_images(vae, to_model_range(images))
    prompts = sorted(set(captions))
    table = encode_prompts(tokenizer, text_encoder, prompts + [""])
    index = torch.tensor([prompts.index(c) for c in captions])
    posterior = torch.stack([mean, std], dim=1)
    return LatentBatches(len(mean), batch_size, float(vae.config.scaling_factor), table[-1],
                         lambda step, micro, idx: {"posterior": posterior[idx], "cond": table[index[idx]]})


def from_disk(root: Path, pipe, stage: str, model: str, train: TrainParams, seed: int, device: str) -> LatentBatches:
    """Batches from ``data/latents`` at ``root`` for a stage training ``pipe`` (the model folder ``model``): refuses
    latents made by another VAE or tokenizer; caption embeddings from the store, or computed by ``pipe``'s frozen
    text encoder (moved to ``device``) when the store holds token ids only."""
    store = LatentStore(root)
    check_models(store.manifest, root, stage, model, pipe.vae, pipe.tokenizer, pipe.text_encoder)
    text_encoder = pipe.text_encoder.to(device).eval().requires_grad_(False)
    uncond = encode_prompts(pipe.tokenizer, text_encoder, [""])[0]
    prefetch = Prefetch(KeyedRows(store.rows, len(store), train.batch_size, seed), train.steps, train.grad_accum,
                        train.loader_workers, train.prefetch_batches, pin=device == "cuda", verifier=store.verifier,
                        name=stage)
    log.info("%s: %d encoded samples in %s (caption embeddings %s), %d loader worker(s)", stage, len(store), root,
             store.manifest["embeddings"], train.loader_workers)

    def fetch(step: int, micro: int, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        ahead, rows = prefetch.get(step, micro)
        if not torch.equal(ahead, idx):
            raise RuntimeError(f"{stage}: the rows read ahead for step {step}, micro-batch {micro} are not the ones "
                               f"the loop drew (read ahead {ahead[:4].tolist()}…, drawn {idx[:4].tolist()}…)")
        cond = rows["emb"] if "emb" in rows else embed_ids(text_encoder, rows["ids"])
        return {"posterior": rows["posterior"], "cond": cond}

    return LatentBatches(len(store), train.batch_size, float(store.manifest["scaling_factor"]), uncond, fetch,
                         prefetch)
