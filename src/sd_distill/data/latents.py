"""Training data in latent space: cached VAE posteriors and prompt embeddings, drawn by a seeded generator.

Every model-training stage after the VAE sees the data this way, so none of them runs the VAE or the
text encoder inside its loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(N, max_length, hidden) last hidden states, as ``StableDiffusionPipeline.encode_prompt`` computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].cpu()


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of (N, 3, H, W) images in [-1, 1]."""
    dists = [vae.encode(images[i:i + batch].to(vae.device, vae.dtype)).latent_dist for i in range(0, len(images), batch)]
    return torch.cat([d.mean for d in dists]).float().cpu(), torch.cat([d.std for d in dists]).float().cpu()


@dataclass
class LatentData:
    """Posteriors of N images and the embedding of each one's caption; row ``uncond_row`` of ``table`` is ``""``."""

    mean: torch.Tensor  # (N, C, h, w), unscaled
    std: torch.Tensor  # (N, C, h, w)
    scaling: float  # the VAE's scaling_factor
    table: torch.Tensor  # (P + 1, L, E) prompt embeddings
    prompt_index: torch.Tensor  # (N,) row of each image's caption

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def uncond_row(self) -> int:
        return len(self.table) - 1

    def draw(self, batch_size: int, gen: torch.Generator, caption_dropout: float = 0.0):
        """A random batch: scaled latents x (B, C, h, w), caption embeddings (B, L, E) with ``caption_dropout`` of
        them replaced by the empty prompt, and the image indices."""
        idx = torch.randint(0, len(self), (batch_size,), generator=gen)
        x = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)) * self.scaling
        rows = self.prompt_index[idx].clone()
        if caption_dropout > 0:
            rows[torch.rand(batch_size, generator=gen) < caption_dropout] = self.uncond_row
        return x, self.table[rows], idx

    def draw_with_w(self, batch_size: int, gen: torch.Generator, timesteps: torch.Tensor, w_min: float,
                    w_max: float):
        """A batch for the w-conditioned stages: latents x, caption embeddings, timesteps drawn from ``timesteps``,
        guidance weights w ~ U[w_min, w_max] and the noise, each (B, ...)."""
        x, cond, _ = self.draw(batch_size, gen)
        t = timesteps[torch.randint(0, len(timesteps), (batch_size,), generator=gen)]
        w = w_min + (w_max - w_min) * torch.rand(batch_size, generator=gen)
        return x, cond, t, w, torch.randn(x.shape, generator=gen)

    @property
    def uncond(self) -> torch.Tensor:
        return self.table[self.uncond_row]


def latent_data(vae, tokenizer, text_encoder, images: np.ndarray, captions: list[str]) -> LatentData:
    """Encode a split once with a pipeline's own VAE and text encoder."""
    mean, std = encode_images(vae, to_model_range(images))
    prompts = sorted(set(captions))
    table = encode_prompts(tokenizer, text_encoder, prompts + [""])
    index = torch.tensor([prompts.index(c) for c in captions])
    return LatentData(mean=mean, std=std, scaling=float(vae.config.scaling_factor), table=table, prompt_index=index)
