"""BK-SDM block removal as data (Kim et al. 2023, "On Architectural Compression of Text-to-Image Diffusion Models").

A variant is a small table of edits to a ``UNet2DConditionModel`` config; :func:`compact_config` applies it and
:func:`block_map` says, for every kept block of the compact UNet, which block of the parent it starts from:

- ``base``: one residual(+attention) pair fewer in every stage. Down stages keep their first pair, up stages
  (one pair more than down stages) drop their second pair, so each kept up block still reads the skip of the
  same width it read in the parent (BK-SDM, sec. 3.1).
- ``small``: ``base`` without the mid block.
- ``tiny``: ``small`` without the innermost down stage and the up stage that mirrors it.

Torch-free apart from building models, so ``sd-distill inspect`` and the DAG files stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sd_distill.errors import UserError

VARIANTS = ("none", "base", "small", "tiny")


class VariantError(UserError, ValueError):
    """A BK-SDM variant that does not exist, or that this UNet cannot take; callers add the option or key that chose
    it (``prune.variant``, ``--bk``)."""


@dataclass(frozen=True)
class Edit:
    """What one BK-SDM variant removes."""

    drop_pair: bool  # one resnet(+attention) pair fewer per stage
    drop_mid: bool  # no mid block
    drop_innermost: bool  # no innermost down stage / outermost-in-the-list up stage


EDITS: dict[str, Edit] = {
    "none": Edit(False, False, False),
    "base": Edit(True, False, False),
    "small": Edit(True, True, False),
    "tiny": Edit(True, True, True),
}


def _edit(variant: str) -> Edit:
    if variant not in EDITS:
        raise VariantError(f"unknown BK-SDM variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return EDITS[variant]


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def compact_config(config: dict, variant: str) -> dict:
    """The parent's UNet config with the variant's blocks removed (all other keys unchanged)."""
    edit = _edit(variant)
    # diffusers lists the keys a model got by default and from_config() would restore those defaults
    # (mid_block_type among them), so the edited config must not carry that list
    cfg = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    n = len(cfg["down_block_types"])
    layers = _per_block(cfg["layers_per_block"], n)
    if edit.drop_pair:
        if min(layers) < 2:
            raise VariantError(f"BK-SDM {variant}: every stage needs 2+ layers to drop one, found "
                               f"layers_per_block={layers}")
        layers = [k - 1 for k in layers]
    if edit.drop_mid:
        cfg["mid_block_type"] = None
    if edit.drop_innermost:
        if n < 3:
            raise VariantError(f"BK-SDM {variant}: needs 3+ stages to drop the innermost, found {n}")
        keys = ("down_block_types", "block_out_channels", "attention_head_dim", "num_attention_heads",
                "transformer_layers_per_block", "cross_attention_dim", "only_cross_attention")
        for key in keys:
            if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == n:
                cfg[key] = list(cfg[key])[:-1]
        cfg["up_block_types"] = list(cfg["up_block_types"])[1:]
        layers = layers[:-1]
    cfg["layers_per_block"] = layers[0] if len(set(layers)) == 1 else layers
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        cfg[key] = list(cfg[key])
    return cfg


def block_map(config: dict, variant: str) -> dict[str, str]:
    """Compact UNet module prefix -> parent module prefix, for every block the compact UNet keeps.

    Prefixes are ``state_dict`` key prefixes (``down_blocks.0.resnets.0`` ...); modules that every variant keeps
    whole (``conv_in``, ``time_embedding``, ``conv_norm_out``, ``conv_out``, samplers) map to themselves.
    """
    edit = _edit(variant)
    n = len(config["down_block_types"])
    layers = _per_block(config["layers_per_block"], n)
    out = {name: name for name in ("conv_in", "time_proj", "time_embedding", "conv_norm_out", "conv_out")}
    keep_down = n - 1 if edit.drop_innermost else n
    for i in range(keep_down):
        kept = range(layers[i] - 1) if edit.drop_pair else range(layers[i])
        for j in kept:
            for part in ("resnets", "attentions"):
                out[f"down_blocks.{i}.{part}.{j}"] = f"down_blocks.{i}.{part}.{j}"
        if i < keep_down - 1:  # the compact UNet's last down stage has no downsampler (diffusers' layout)
            out[f"down_blocks.{i}.downsamplers"] = f"down_blocks.{i}.downsamplers"
    if not edit.drop_mid:
        out["mid_block"] = "mid_block"
    shift = 1 if edit.drop_innermost else 0
    up_layers = list(reversed(layers))
    for j in range(n - shift):
        parent = j + shift
        total = up_layers[parent] + 1
        kept = [k for k in range(total) if not (edit.drop_pair and k == 1)]
        for new, old in enumerate(kept):
            for part in ("resnets", "attentions"):
                out[f"up_blocks.{j}.{part}.{new}"] = f"up_blocks.{parent}.{part}.{old}"
        if j < n - shift - 1:
            out[f"up_blocks.{j}.upsamplers"] = f"up_blocks.{parent}.upsamplers"
    return out


def copy_kept_weights(student, parent, variant: str) -> dict[str, list[str]]:
    """Copy every kept block's tensors from ``parent`` into ``student`` (in place) where the shapes agree.

    Returns ``{"copied": [...], "fresh": [...]}`` with the student's state_dict keys: ``fresh`` keys keep their
    initialisation (a removed neighbour changed their input width, which happens only for ``tiny`` when the
    two innermost stages differ in width; in SD v1.5 they do not).
    """
    mapping = block_map(dict(parent.config), variant)
    src = parent.state_dict()
    dst = student.state_dict()
    copied, fresh = [], []
    prefixes = sorted(mapping, key=len, reverse=True)
    for key, tensor in dst.items():
        prefix = next((p for p in prefixes if key == p or key.startswith(p + ".")), None)
        if prefix is None:
            fresh.append(key)
            continue
        old = mapping[prefix] + key[len(prefix):]
        if old in src and src[old].shape == tensor.shape:
            tensor.copy_(src[old])
            copied.append(key)
        else:
            fresh.append(key)
    return {"copied": copied, "fresh": fresh}


def stage_features(unet) -> list[tuple[str, Any]]:
    """(name, module) whose output is the feature at the end of each stage, before any resampling: the last
    attention (or resnet, in stages without attention) of every down and up block, and the mid block."""
    out = []
    for prefix, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            last = block.attentions[-1] if getattr(block, "attentions", None) else block.resnets[-1]
            out.append((f"{prefix}.{i}", last))
        if prefix == "down" and unet.mid_block is not None:
            out.append(("mid", unet.mid_block))
    return out


def feature_pairs(student, parent, variant: str) -> list[tuple[str, Any, str, Any]]:
    """(student name, student module, parent name, parent module) for every kept stage of the student."""
    shift = 1 if _edit(variant).drop_innermost else 0
    theirs = dict(stage_features(parent))
    pairs = []
    for name, module in stage_features(student):
        if name.startswith("up."):
            twin = f"up.{int(name.split('.')[1]) + shift}"
        else:
            twin = name
        pairs.append((name, module, twin, theirs[twin]))
    return pairs
