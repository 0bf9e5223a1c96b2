"""Stable Diffusion's own parts, built from configs (no download), and the pipeline folder they make."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_distill.errors import MissingInput, UserError
from sd_distill.params import BaseParams, DecoderArch, ParamsError, TeacherParams, TextArch, UnetArch, VaeArch


def pick_device(base: BaseParams) -> str:
    if base.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if base.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("base.device: cuda, but no CUDA device is visible (torch.cuda.is_available() is False); "
                          "set base.device=cpu or auto")
    return base.device


HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def frozen(module: torch.nn.Module, device: str, mixed_precision: str) -> torch.nn.Module:
    """``module`` (in place) for forward passes only: on ``device``, eval mode, no gradients and, under bf16/fp16
    mixed precision, stored in that dtype, as BK-SDM (src/kd_train_text_to_image.py) and diffusers' training scripts
    cast their frozen teacher UNet, VAE and text encoder to ``weight_dtype``. Half the memory, and no change to the
    arithmetic: under autocast its convolutions and matmuls run in that dtype anyway, and its norms in float32."""
    module = module.to(device).eval().requires_grad_(False)
    dtype = HALF_PRECISION.get(mixed_precision)
    if dtype is None or getattr(module, "_keep_in_fp32_modules", None):
        return module
    # nn.Module.to, not diffusers' ModelMixin.to: diffusers 0.42 warns on every dtype cast, even with no module to
    # keep in float32 (checked above)
    return torch.nn.Module.to(module, dtype)


def count_parameters(module: torch.nn.Module | None, trainable_only: bool = False) -> int:
    """Parameters of ``module`` (shared ones once; 0 for None); ``trainable_only``: those that require grad. Here
    rather than in ``models.costs`` so that a stage counting its model does not depend on MAC counting."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


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
            raise ParamsError(f"decoder.arch.{name}: expected {stages} entries (one per stage of the VAE, whose "
                              f"block_out_channels are {list(vae_config['block_out_channels'])}), found {list(blocks)}")
    return AutoencoderTiny(
        in_channels=3, out_channels=3,
        encoder_block_out_channels=(arch.channels,) * stages, decoder_block_out_channels=(arch.channels,) * stages,
        num_encoder_blocks=enc, num_decoder_blocks=dec,
        latent_channels=vae_config["latent_channels"], scaling_factor=1.0,
    )


def patch_discriminator(channels: int) -> torch.nn.Sequential:
    """The decoder stage's critic: (B, 3, H, W) images in [-1, 1] -> (B, 1, H/4, W/4) realness logits, one per
    overlapping patch."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2),
        torch.nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2),
        torch.nn.Conv2d(2 * channels, 1, 3, padding=1),
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


# --------------------------------------------------------------------------- loading model folders safely
# Weights load from safetensors only: unpickling a .bin/.ckpt/.pt file can run any code its author chose, so a
# folder holding one is refused by its file names alone, before anything in it is opened.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
PIPELINE_CLASS = "StableDiffusionPipeline"
PIPELINE_MODELS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL", "AutoencoderTiny"),
                   "text_encoder": ("CLIPTextModel",)}  # the parts with weights; tokenizer and scheduler are text
PREDICTS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x"}
# what diffusers and transformers raise for a folder they cannot load (size mismatches are RuntimeError)
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


class MissingModel(MissingInput):
    """A model folder, or a part of one, is not there; the message names it and the stage that writes it."""


class ModelError(UserError, ValueError):
    """A model folder that must not or cannot be loaded (pickle-bearing weights, no safetensors, broken configs) or
    the wrong kind of model for the stage reading it; the message names the file, key, expected and found values."""


@dataclass(frozen=True)
class Needs:
    """What a stage requires of an input pipeline folder, checked from its JSON configs before any weight is read."""

    stage: str  # the stage reading the folder, as the error names it
    producer: str  # the stage whose output is a right input (``sd-distill run <producer>``)
    prediction_type: str | None = None  # the scheduler's prediction_type; None: any
    guidance_input: bool | None = None  # True: a w-conditioned UNet (time_cond_proj_dim set); False: none; None: any
    vae: str | None = None  # the VAE class the stage needs (AutoencoderKL to encode images); None: any


def read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _config_class(config: dict) -> str | None:
    """A diffusers config's ``_class_name``, or a transformers config's first ``architectures`` entry."""
    archs = config.get("architectures")
    return config.get("_class_name") or (archs[0] if isinstance(archs, list) and archs else None)


def refuse_pickles(folder: Path) -> None:
    """Raise ``ModelError`` if any file under ``folder`` is a pickle-bearing weight file; opens none of them."""
    found = sorted(f for f in Path(folder).rglob("*") if f.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ModelError(f"{found[0]}{more}: pickle-bearing weight file in model folder {folder} (unpickling can run "
                         f"any code); expected safetensors weights only ({', '.join(PICKLE_SUFFIXES)} are refused). "
                         "Nothing was loaded: delete it, or re-save the model with "
                         "save_pretrained(safe_serialization=True)")


def check_component(folder: Path, classes: tuple[str, ...], producer: str | None = None) -> dict:
    """One model folder (``unet/``, ``vae/``, ``models/decoder``): a config of one of ``classes`` and safetensors
    weights; returns the config."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = f"; run `sd-distill run {producer}` first" if producer else ""
        raise MissingModel(f"{folder}: no {' or '.join(classes)} folder (config.json){hint}")
    config = read_config(config_file)
    found = _config_class(config)
    if found not in classes:
        hint = f"; `sd-distill run {producer}` writes one" if producer else ""
        raise ModelError(f"{config_file}: model class is {found!r}, expected {' or '.join(map(repr, classes))}{hint}")
    if not any(folder.glob("*.safetensors")):
        files = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name != "config.json")
        raise ModelError(f"{folder}: no safetensors weights (*.safetensors), found {files or 'no weight file'}; "
                         "sd-distill loads safetensors only: re-save the model with "
                         "save_pretrained(safe_serialization=True)")
    return config


def check_pipeline(path: Path | str, needs: Needs | None = None) -> None:
    """Everything ``load_pipeline`` checks before reading a weight: the folder is a ``StableDiffusionPipeline``
    with safetensors weights, no pickle-bearing file, parts that fit together, and what ``needs`` asks for."""
    path = Path(path)
    run = f"`sd-distill run {needs.producer}`" if needs else "the stage that writes it, e.g. `sd-distill run teacher`"
    if not path.is_dir():
        raise MissingModel(f"{path}: model folder does not exist; run {run} first")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise MissingModel(f"{path}: not a diffusers pipeline folder (no model_index.json); run {run} first")
    refuse_pickles(path)
    index = read_config(index_file)
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ModelError(f"{index_file}: _class_name is {index.get('_class_name')!r}, expected {PIPELINE_CLASS!r}")
    configs = {}
    for part, classes in PIPELINE_MODELS.items():
        entry = index.get(part)
        found = entry[1] if isinstance(entry, list) and len(entry) == 2 else entry
        if found not in classes:
            raise ModelError(f"{index_file}: {part} is {found!r}, expected {' or '.join(map(repr, classes))}")
        configs[part] = check_component(path / part, (found,))
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise MissingModel(f"{scheduler_file}: missing; the pipeline folder is incomplete")
    scheduler = read_config(scheduler_file)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    unet_file = path / "unet" / "config.json"
    if unet.get("in_channels") != vae.get("latent_channels"):
        raise ModelError(f"{unet_file}: in_channels is {unet.get('in_channels')}, expected the VAE's latent_channels "
                         f"({vae.get('latent_channels')}); the UNet and VAE come from different models")
    if unet.get("cross_attention_dim") != text.get("hidden_size"):
        raise ModelError(f"{unet_file}: cross_attention_dim is {unet.get('cross_attention_dim')}, expected the text "
                         f"encoder's hidden_size ({text.get('hidden_size')}); the UNet and text encoder come from "
                         "different models")
    if needs is None:
        return
    found = scheduler.get("prediction_type", "epsilon")
    if needs.prediction_type and found != needs.prediction_type:
        raise ModelError(f"{needs.stage}: {path} must predict {PREDICTS.get(needs.prediction_type)}: {scheduler_file} "
                         f"prediction_type is {found!r}, expected {needs.prediction_type!r}; {run} writes such a model")
    cond = unet.get("time_cond_proj_dim")
    if needs.guidance_input and cond is None:
        raise ModelError(f"{needs.stage}: {path} must be w-conditioned: {unet_file} time_cond_proj_dim is null (no "
                         f"guidance-weight input), expected an integer; {run} writes such a model")
    if needs.guidance_input is False and cond is not None:
        raise ModelError(f"{needs.stage}: {path} must not be w-conditioned: {unet_file} time_cond_proj_dim is {cond}, "
                         f"expected null (a UNet without guidance-weight input); {run} writes such a model")
    if needs.vae and _config_class(vae) != needs.vae:
        raise ModelError(f"{needs.stage}: {path}: {index_file.name} vae is {_config_class(vae)!r}, expected "
                         f"{needs.vae!r} (the stage encodes images with it); {run} writes such a model")


def _load_error(path: Path, exc: Exception) -> ModelError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ModelError(f"{path}: cannot be loaded ({type(exc).__name__}: {first[:300]})")


def load_pipeline(path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  needs: Needs | None = None) -> StableDiffusionPipeline:
    """Load a diffusers folder offline, safetensors only, after ``check_pipeline``; errors say what is wrong."""
    path = Path(path)
    check_pipeline(path, needs)
    quiet_loading_bars()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True,
                                                       safety_checker=None, requires_safety_checker=False)
    except LOAD_ERRORS as exc:
        raise _load_error(path, exc) from None
    pipe.set_progress_bar_config(disable=True)
    name_source(pipe, path.name)
    return pipe.to(device)


def load_model(cls, folder: Path | str, producer: str):
    """One diffusers model folder (``AutoencoderTiny``, a pipeline's ``vae/``) of class ``cls``, offline, safetensors
    only; ``producer`` is the stage that writes it, for the error when it is missing."""
    folder = Path(folder)
    refuse_pickles(folder)
    check_component(folder, (cls.__name__,), producer)
    quiet_loading_bars()
    try:
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except LOAD_ERRORS as exc:
        raise _load_error(folder, exc) from None


def source_of(pipe) -> str:
    """Where a loaded pipeline came from, as ``name_source`` recorded it (``vpred``), for error lines."""
    return f"the input model ({pipe.name_or_path})" if getattr(pipe, "name_or_path", None) else "the input model"


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
