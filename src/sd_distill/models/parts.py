"""Stable Diffusion's own parts, built from configs (no download), and the pipeline folder they make."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_distill.params import BaseParams, DecoderArch, TeacherParams, TextArch, UnetArch, VaeArch


def pick_device(base: BaseParams) -> str:
    if base.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if base.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device=cuda but no CUDA device is visible; set base.device=cpu or auto")
    return base.device


def build_vae(arch: VaeArch) -> AutoencoderKL:
    n = len(arch.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch.block_out_channels),
        layers_per_block=arch.layers_per_block,
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.norm_num_groups,
    )


TAESD_ENCODER_BLOCKS = (1, 3, 3, 3)
TAESD_DECODER_BLOCKS = (3, 3, 3, 1)


def build_tiny_autoencoder(vae_config: dict, arch: DecoderArch) -> AutoencoderTiny:
    """A TAESD-shaped ``AutoencoderTiny`` with the same latent channels and spatial factor as ``vae_config``
    (an ``AutoencoderKL`` config): one stage per VAE stage, TAESD's block counts cut from the outside in.

    Its latents are the diffusion model's (scaled) latents, so its ``scaling_factor`` is 1.0 and the stock
    pipeline decodes ``latents / 1.0`` with it, as with ``madebyollin/taesd``.
    """
    stages = len(vae_config["block_out_channels"])
    inner = stages - 1  # TAESD: one plain outer stage, then 3 blocks per inner stage (mirrored in the decoder)
    enc = tuple(arch.encoder_blocks or (TAESD_ENCODER_BLOCKS[0], *TAESD_ENCODER_BLOCKS[1:][-inner:][:inner]))
    dec = tuple(arch.decoder_blocks or (*TAESD_DECODER_BLOCKS[:-1][:inner], TAESD_DECODER_BLOCKS[-1]))
    for name, blocks in (("encoder_blocks", enc), ("decoder_blocks", dec)):
        if len(blocks) != stages:
            raise ValueError(f"decoder.arch.{name}: expected {stages} entries (one per VAE stage), found {list(blocks)}")
    return AutoencoderTiny(
        in_channels=3, out_channels=3,
        encoder_block_out_channels=(arch.channels,) * stages, decoder_block_out_channels=(arch.channels,) * stages,
        num_encoder_blocks=enc, num_decoder_blocks=dec,
        latent_channels=vae_config["latent_channels"], scaling_factor=1.0,
    )


def build_text_encoder(arch: TextArch, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        max_position_embeddings=arch.max_length,
        projection_dim=arch.hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(arch: UnetArch, sample_size: int, in_channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """SD v1.5's block layout, narrower: cross-attention down/up stages around one plain innermost stage."""
    n = len(arch.block_out_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(arch.block_out_channels),
        layers_per_block=arch.layers_per_block,
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
    )


def noise_schedule_kwargs(p: TeacherParams) -> dict:
    """SD v1's training schedule: scaled-linear betas; the prediction type is a param (SD v1: epsilon)."""
    return dict(num_train_timesteps=p.num_train_timesteps, beta_start=p.beta_start, beta_end=p.beta_end,
                beta_schedule="scaled_linear", prediction_type=p.prediction_type)


def build_noise_scheduler(p: TeacherParams) -> DDPMScheduler:
    return DDPMScheduler(**noise_schedule_kwargs(p), clip_sample=False)


def build_sampling_scheduler(p: TeacherParams) -> DDIMScheduler:
    # SD v1's DDIM settings (set_alpha_to_one=False, steps_offset=1).
    return DDIMScheduler(**noise_schedule_kwargs(p), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def assemble(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def quiet_loading_bars() -> None:
    """diffusers' and transformers' "Loading ..." bars only on a terminal, never in logs."""
    if not sys.stderr.isatty():
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def load_pipeline(path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a diffusers folder offline with an error that says what is missing."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json); "
                                "run the stage that writes it first, e.g. `sd-distill run teacher`")
    quiet_loading_bars()
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    name_source(pipe, path.name)
    return pipe.to(device)


def name_source(pipe_or_model, name: str) -> None:
    """Record where a loaded model came from as ``name`` (``steps-2``, ``steps-2/unet``) instead of the absolute
    path diffusers stores in ``_name_or_path``: saved folders are then the same bytes in every checkout, so DVC
    and the registry's key see the same model as the same."""
    from diffusers.configuration_utils import ConfigMixin

    modules = {"": pipe_or_model}
    if hasattr(pipe_or_model, "components"):
        modules.update(pipe_or_model.components)
    for sub, module in modules.items():
        if isinstance(module, ConfigMixin) and "_name_or_path" in module.config:
            module.register_to_config(_name_or_path=f"{name}/{sub}" if sub else name)
