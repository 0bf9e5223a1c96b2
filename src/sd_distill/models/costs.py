"""Parameters and multiply-accumulates (MACs) of a Stable Diffusion model; neither depends on the weights.

MACs are FLOPs / 2 as ``torch.utils.flop_counter.FlopCounterMode`` counts them: matmuls and convolutions only
(no norms, activations, softmax or elementwise ops). Every count of one call is split in two:

- ``macs_attention_matmuls``: the two matmuls inside attention, Q K^T and softmax(.) V (the ``bmm`` /
  scaled-dot-product-attention ops);
- ``macs_without_attention_matmuls``: everything else: convolutions and linear layers, the attention's
  q/k/v/out projections and feed-forwards included;
- ``macs_total``: both.

The widely quoted 339G MACs per SD v1.5 UNet call at 512x512 (BK-SDM, Kim et al. 2023) is
``macs_without_attention_matmuls``; with the attention matmuls one call is ~402G MACs (~803 GFLOPs).

Counting runs on whatever device the modules are on; modules built under ``with torch.device("meta"):`` hold no
memory and count SD v1.5 in well under a second, so nothing is downloaded and no weights are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from sd_distill.errors import UserError
from sd_distill.models import bk
from sd_distill.models.parts import build_tiny_autoencoder, count_parameters, load_pipeline
from sd_distill.params import DecoderArch

# runwayml/stable-diffusion-v1-5, unet/config.json
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# runwayml/stable-diffusion-v1-5, vae/config.json
SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# runwayml/stable-diffusion-v1-5, text_encoder/config.json (CLIP ViT-L/14's text tower)
SD15_TEXT_CONFIG = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

TAESD = DecoderArch(channels=64)  # madebyollin/taesd's width


@dataclass(frozen=True)
class Arch:
    """A published architecture, as its configs."""

    title: str
    unet: dict
    vae: dict
    text_encoder: dict


ARCHS = {"sd15": Arch("SD v1.5", SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG)}

# Q K^T and softmax(.) V: bmm/baddbmm under the math backend, the fused kernels where one runs. Linear layers
# run as mm/addmm, so in SD's UNet and VAE every bmm is an attention matmul (tests/test_inspect.py hand-counts them)
ATTENTION_OPS = frozenset({
    torch.ops.aten.bmm, torch.ops.aten.baddbmm,
    torch.ops.aten._scaled_dot_product_efficient_attention, torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_cudnn_attention, torch.ops.aten._flash_attention_forward,
    torch.ops.aten._efficient_attention_forward,
})


def _macs(call) -> dict[str, int]:
    counter = FlopCounterMode(display=False)
    # FlopCounterMode has no formula for CPU's fused attention kernel and would count it as 0; the math
    # backend spells attention as bmm on every device (meta included)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        call()
    flops = counter.get_flop_counts()["Global"]
    attention = sum(n for op, n in flops.items() if op in ATTENTION_OPS)
    total = sum(flops.values())
    return {"macs_total": total // 2, "macs_attention_matmuls": attention // 2,
            "macs_without_attention_matmuls": (total - attention) // 2}


def unet_macs(unet: UNet2DConditionModel, latent_h: int, latent_w: int, seq_len: int = 77,
              cross_dim: int | None = None, batch: int = 1) -> dict[str, int]:
    """MACs of one UNet call: a (batch, in_channels, latent_h, latent_w) latent, one timestep per sample and
    (batch, seq_len, cross_dim) text states (``cross_dim`` defaults to the UNet's ``cross_attention_dim``).
    A UNet with a guidance input (``time_cond_proj_dim``) also gets a (batch, time_cond_proj_dim) ``timestep_cond``.
    """
    cfg = unet.config
    like = {"device": unet.device, "dtype": unet.dtype}
    sample = torch.zeros(batch, cfg.in_channels, latent_h, latent_w, **like)
    states = torch.zeros(batch, seq_len, cross_dim or cfg.cross_attention_dim, **like)
    timestep = torch.full((batch,), 999, device=unet.device, dtype=torch.long)
    cond = torch.zeros(batch, cfg.time_cond_proj_dim, **like) if cfg.time_cond_proj_dim else None
    return _macs(lambda: unet(sample, timestep, states, timestep_cond=cond))


def decoder_macs(decoder: torch.nn.Module, latent_h: int, latent_w: int, batch: int = 1) -> dict[str, int]:
    """MACs of decoding a (batch, latent_channels, latent_h, latent_w) latent into pixels: ``decode`` of an
    ``AutoencoderKL`` (post-quant conv + decoder) or an ``AutoencoderTiny``, or the call of a bare decoder module.
    """
    conv = next(m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d))
    channels = getattr(getattr(decoder, "config", None), "latent_channels", None) or conv.in_channels
    z = torch.zeros(batch, channels, latent_h, latent_w, device=conv.weight.device, dtype=conv.weight.dtype)
    return _macs(lambda: decoder.decode(z) if hasattr(decoder, "decode") else decoder(z))


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent pixel along each side (8 for SD's VAE and TAESD), as ``StableDiffusionPipeline`` has it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def describe(unet: UNet2DConditionModel, vae: AutoencoderKL | AutoencoderTiny, text_encoder=None,
             resolution: int | None = None, seq_len: int = 77) -> dict:
    """Parameters and MACs per call of one text-to-image model at ``resolution`` x ``resolution`` pixels
    (default: the UNet's ``sample_size`` times the VAE's scale factor, 512 for SD v1.5). JSON-able: the input
    shapes, ``parameters`` (``unet``, ``vae_decoder``, ``vae_encoder``, ``text_encoder`` if given) and the
    ``unet_call`` / ``decoder_call`` MACs (``macs_total``, ``macs_attention_matmuls``,
    ``macs_without_attention_matmuls``)."""
    factor = vae_scale_factor(vae)
    resolution = resolution or unet.config.sample_size * factor
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's scale factor {factor}")
    latent = resolution // factor
    params = {
        "unet": count_parameters(unet),
        "vae_decoder": count_parameters(vae.decoder) + count_parameters(getattr(vae, "post_quant_conv", None)),
        "vae_encoder": count_parameters(vae.encoder) + count_parameters(getattr(vae, "quant_conv", None)),
    }
    if text_encoder is not None:
        params["text_encoder"] = count_parameters(text_encoder)
    return {
        "resolution": resolution,
        "latent_shape": [unet.config.in_channels, latent, latent],
        "text_states_shape": [seq_len, unet.config.cross_attention_dim],
        "guidance_input_dim": unet.config.time_cond_proj_dim,
        "decoder_class": type(vae).__name__,
        "parameters": params,
        "unet_call": unet_macs(unet, latent, latent, seq_len),
        "decoder_call": decoder_macs(vae, latent, latent),
    }


def _compact(config: dict, variant: str) -> UNet2DConditionModel:
    try:
        compact = bk.compact_config(dict(config), variant)
    except bk.VariantError as exc:
        raise bk.VariantError(f"--bk {variant}: {exc}") from None
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(compact)


def _pct_less(new: int, old: int) -> float:
    return round(100 * (1 - new / old), 2) if old else 0.0


def _report(title: str, weights: str, parent: UNet2DConditionModel, vae, text_encoder, seq_len: int,
            variant: str, decoder: str) -> dict:
    unet = parent if variant == "none" else _compact(parent.config, variant)
    model = describe(unet, vae, text_encoder, seq_len=seq_len)
    latent = model["latent_shape"][1]
    parent_call = model["unet_call"] if unet is parent else unet_macs(parent, latent, latent, seq_len)
    parent_params = count_parameters(parent)
    return {
        "model": title, "weights": weights, "bk_variant": variant, "decoder": decoder, **model,
        "parent_unet": {"parameters": parent_params, "unet_call": parent_call},
        "unet_reduction_pct": {
            "parameters": _pct_less(model["parameters"]["unet"], parent_params),
            **{key: _pct_less(model["unet_call"][key], parent_call[key]) for key in parent_call},
        },
    }


def report_arch(name: str, variant: str = "none", decoder: str | None = None) -> dict:
    """``describe`` of a published architecture built from its configs on the meta device, its UNet cut to the
    BK-SDM ``variant``; ``decoder`` ``full`` (the VAE's, default) or ``tiny`` (TAESD-shaped ``AutoencoderTiny``);
    ``parent_unet`` and ``unet_reduction_pct`` compare with the uncut UNet."""
    if name not in ARCHS:
        raise UserError(f"unknown --arch {name!r}; expected one of: {', '.join(ARCHS)}")
    if decoder not in (None, "full", "tiny"):
        raise UserError(f"unknown --decoder {decoder!r}; expected full or tiny")
    arch = ARCHS[name]
    decoder = decoder or "full"
    with torch.device("meta"):
        parent = UNet2DConditionModel.from_config(arch.unet)
        vae = AutoencoderKL.from_config(arch.vae) if decoder == "full" else build_tiny_autoencoder(arch.vae, TAESD)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    return _report(f"{arch.title} (--arch {name})", "random, built from the configs on the meta device", parent,
                   vae, text_encoder, arch.text_encoder["max_position_embeddings"], variant, decoder)


def report_folder(path: Path | str, variant: str = "none", decoder: str | None = None) -> dict:
    """``report_arch`` for a local ``StableDiffusionPipeline`` folder (e.g. ``models/student``): its own VAE or
    ``AutoencoderTiny`` (``decoder=None``), ``tiny`` for a TAESD-shaped one where it has a full VAE. The weights
    load on the CPU, then move to the meta device to count."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path}: not a diffusers pipeline folder (no model_index.json); pass a folder such as "
                        "models/teacher, or --arch sd15")
    pipe = load_pipeline(path)
    unet, vae, text_encoder = (m.to("meta") for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    own = "tiny" if isinstance(vae, AutoencoderTiny) else "full"
    if decoder == "full" and own == "tiny":
        raise UserError(f"{path}: --decoder full, but this folder's vae is an AutoencoderTiny (no full VAE to "
                        "count); leave --decoder out to count it")
    if decoder == "tiny" and own == "full":
        with torch.device("meta"):
            vae = build_tiny_autoencoder(dict(vae.config), TAESD)
    built = [name for name, yes in (("the BK-SDM UNet", variant != "none"), ("the tiny decoder", vae is not pipe.vae))
             if yes]
    weights = "loaded from the folder" + (f"; random: {', '.join(built)}" if built else "")
    return _report(str(path), weights, unet, vae, text_encoder, pipe.tokenizer.model_max_length, variant,
                   decoder or own)


def _si(n: int) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _change(pct_less: float) -> str:
    return f"{-pct_less:.1f}%" if pct_less else "0.0%"


def _row(label: str, this: str, parent: str = "", change: str = "") -> str:
    return f"{label:<38}{this:>12}{parent:>12}{change:>9}".rstrip()


def render(report: dict) -> str:
    """``report_arch`` / ``report_folder`` output as a plain-text table."""
    r, parent, cut = report, report["parent_unet"], report["unet_reduction_pct"]
    variant = f"BK-SDM {r['bk_variant']}" if r["bk_variant"] != "none" else "full UNet"
    c, h, w = r["latent_shape"]
    guidance = f", guidance input {r['guidance_input_dim']}" if r["guidance_input_dim"] else ""
    rows = [
        f"{r['model']}: {variant}, decoder {r['decoder']} ({r['decoder_class']})",
        f"weights: {r['weights']}",
        f"one call: {r['resolution']}x{r['resolution']} pixels, latent {c}x{h}x{w}, "
        f"text {r['text_states_shape'][0]}x{r['text_states_shape'][1]}{guidance}, batch 1",
        "",
        _row("parameters", "this model", "parent", "change"),
        _row("  UNet", _si(r["parameters"]["unet"]), _si(parent["parameters"]), _change(cut["parameters"])),
    ]
    names = {"vae_decoder": "decoder", "vae_encoder": "encoder", "text_encoder": "text encoder"}
    rows += [_row(f"  {names[k]}", _si(v)) for k, v in r["parameters"].items() if k in names]
    rows += ["", _row("MACs per call", "this model", "parent", "change")]
    labels = {"macs_without_attention_matmuls": "without attention matmuls",
              "macs_attention_matmuls": "attention matmuls (QK^T, AV)", "macs_total": "total"}
    for key, label in labels.items():
        rows.append(_row(f"  UNet, {label}", _si(r["unet_call"][key]), _si(parent["unet_call"][key]),
                         _change(cut[key])))
    rows.append(_row("  decoder, one latent, total", _si(r["decoder_call"]["macs_total"])))
    rows += ["", "MACs = FLOPs / 2 of matmuls and convolutions (torch FlopCounterMode); the widely quoted 339G of",
             "SD v1.5's UNet leaves out the attention matmuls."]
    return "\n".join(rows)
