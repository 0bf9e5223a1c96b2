"""The GAN critic of the ``dmd`` stage: a small classifier head on a UNet's deepest encoder features.

DMD2 (Yin et al. 2024; tianweiy/DMD2 ``main/sd_unet_forward.py::classify_forward`` and ``sd_guidance.py``
``cls_pred_branch``) runs the fake score UNet's encoder only, takes its bottleneck (the mid block's output,
1280 x 8 x 8 for SD v1.5 at 64 x 64 latents) and classifies it with conv(k4, s2) -> GroupNorm -> SiLU ->
conv(k4, s4) -> GroupNorm -> SiLU -> conv 1x1 -> one logit. BK-SDM's small and tiny UNets have no mid block, so
the deepest feature is the last down block's output. ``Head`` generalises DMD2's head to any spatial size:
stride-2 convolutions down to 4 x 4 (none at 4 x 4 or less), then one convolution over what is left.
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from sd_distill.errors import UserError


def deepest_geometry(config) -> tuple[int, int]:
    """(channels, side) of the deepest encoder feature of a ``UNet2DConditionModel`` config: every down block but the
    last halves the side (diffusers' ``add_downsample = not is_final_block``); the mid block keeps the last width."""
    blocks = list(config["block_out_channels"])
    size, halvings = int(config["sample_size"]), len(blocks) - 1
    side = size // 2 ** halvings
    if side < 1:
        raise UserError(f"dmd critic: sample_size {size} halved by {halvings} of the UNet's {len(blocks)} down blocks "
                        f"(block_out_channels {blocks}) leaves a deepest feature {size / 2 ** halvings:g} latents "
                        "wide, expected at least 1 for the critic head: a larger resolution, or fewer UNet stages")
    return blocks[-1], side


def check_plain_unet(unet: UNet2DConditionModel, stage: str) -> None:
    """The encoder pass below covers the SD v1.x UNet (time embedding, optional guidance input, cross attention);
    SDXL's added conditions and class embeddings are not wired yet: refuse them by name."""
    c = unet.config
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type"):
        if c.get(key) is not None:
            raise UserError(f"{stage}: the critic's encoder pass supports SD v1.x UNets; this one has {key}="
                            f"{c[key]!r} (SDXL-style conditions), which it does not feed")
    if c.get("center_input_sample"):
        raise UserError(f"{stage}: the critic's encoder pass does not center inputs (center_input_sample is true)")


def encoder_features(unet: UNet2DConditionModel, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                     timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's deepest encoder feature for (z_t, t, caption embeddings): the mid block's output, or the last down
    block's when the UNet has no mid block. The same arithmetic as ``UNet2DConditionModel.forward`` up to there."""
    emb = unet.time_embedding(unet.get_time_embed(sample=z, timestep=t), timestep_cond)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(z)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=cond)
        else:
            h = unet.mid_block(h, emb)
    return h


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with DMD2's 32 groups where the width allows, at least 8 channels a group (at 1 x 1 a group of
    two channels would normalise every feature to +-1)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 8)), channels)


class Head(nn.Module):
    """(B, channels, side, side) features -> (B, 1) logits (DMD2's head at side 8; see the module docstring)."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        if side < 1:
            raise ValueError(f"critic head: feature side must be >= 1, found {side}")
        layers: list[nn.Module] = []
        while side > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), _norm(channels), nn.SiLU()]
            side //= 2
        layers += [nn.Conv2d(channels, channels, side, stride=side), _norm(channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).flatten(1)
