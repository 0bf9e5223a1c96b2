"""GPU memory of a training stage, estimated before it runs: what ``sd-distill plan`` shows and what the training loop
checks before step 1 on a CUDA device (``check_fits``).

In bytes: fp32 master weights, fp32 gradients and the optimizer's state of every trained parameter (AdamW: m and v
in fp32, 8 B; bitsandbytes' 8-bit AdamW: 1 B each, Dettmers et al. 2022; AMSGrad keeps a third state), the fp32 EMA
copy, autocast's half-precision copy of the trained weights (it caches one per forward), the frozen models as they
sit on the GPU, and activations: micro-batch x the bytes autograd keeps for backward for one sample, *measured* on the
real architecture built on the meta device (``saved_bytes``: no memory, no download, a second or two for SD v1.5).

Not counted: the CUDA context, cuBLAS workspaces and allocator fragmentation (``HEADROOM`` of the GPU is kept for
them), the no-grad forwards of frozen models (their intermediates are freed as they go), gradients of activations in
flight during backward, and the loss terms outside the trained model.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, UNet2DConditionModel
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from sd_distill.errors import UserError
from sd_distill.models.parts import count_parameters, patch_discriminator
from sd_distill.params import TrainParams

HEADROOM = 0.10  # of the GPU's memory, left for what the estimate leaves out; no published figure: a common margin
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # optimizer state per trained parameter
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- activations, measured on meta
class _CudaAutocastOnMeta(TorchFunctionMode):
    """On meta tensors, the dtypes CUDA autocast gives the ops SD's UNet and TAESD call (torch.amp docs, "CUDA Ops
    that can autocast to float16" and "... to float32"), and the attention kernel CUDA's SDPA picks for them: flash
    (half precision) or memory-efficient (float32), both of which keep q, k, v, the output and the log-sum-exp for
    backward, not the attention matrix the meta device's math fallback would keep. Casts of parameters are recorded:
    autocast caches one per weight per forward, counted apart (``weight_copies`` in ``estimate``)."""

    LOW = {F.conv2d, F.conv_transpose2d, F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
           torch.bmm, torch.baddbmm, torch.mm, torch.addmm}
    FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.mse_loss}

    def __init__(self, low: torch.dtype | None, params: set[int]):
        super().__init__()
        # storages are told apart by address: every tensor recorded is kept alive, so no address is reused
        self.low, self.params, self.weight_copies = low, params, {}

    def _cast(self, a, dtype: torch.dtype):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()) or a.dtype == dtype:
            return a
        out = a.to(dtype)
        if a.untyped_storage()._cdata in self.params:
            self.weight_copies[out.untyped_storage()._cdata] = out
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3:
            q, k, v = (self._cast(a, self.low) for a in args) if self.low is not None else args
            drop, causal, scale = kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), kwargs.get("scale")
            if self.low is not None:
                return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, drop, causal, scale=scale)[0]
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, drop, causal,
                                                                          scale=scale)[0]
        dtype = None
        if self.low is not None and func in self.LOW:
            dtype = self.low
        elif self.low is not None and func in self.FP32:
            dtype = torch.float32
        if dtype is not None:  # the ops' arguments are flat: tensors, numbers, shapes
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(a, dtype) for k, a in kwargs.items()}
        return func(*args, **kwargs)


def saved_bytes(call: Callable[[], object], model: torch.nn.Module, *, checkpointing: bool = False,
                precision: str = "no") -> int:
    """Peak bytes autograd keeps for backward while ``call()`` (a forward of ``model`` on the meta device) is
    trained: every tensor saved for backward (``saved_tensors_hooks``), counted once per storage, parameters and
    their autocast copies left out, dtypes as CUDA autocast under ``precision`` (``no``, ``bf16``, ``fp16``) gives.

    With ``checkpointing`` (``model`` a diffusers model), blocks run as ``enable_gradient_checkpointing`` runs them:
    their inputs stay alive, their insides are dropped and recomputed one block at a time in backward, so the peak is
    what is saved outside the blocks + their inputs + the largest block's own saved tensors.
    """
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    mode = _CudaAutocastOnMeta(HALF.get(precision), params)
    # storage address -> a tensor on it (kept alive, so that no later storage reuses the address)
    outside: dict[int, torch.Tensor] = {}
    blocks: list[dict[int, torch.Tensor]] = []

    def keep(store: dict[int, torch.Tensor]):
        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage()._cdata
            if key not in params and key not in mode.weight_copies:
                store[key] = t
            return t
        return pack

    def checkpointed(module, *args):
        for a in args:  # torch.utils.checkpoint holds the inputs until backward
            if isinstance(a, torch.Tensor) and a.untyped_storage()._cdata not in params:
                keep(outside)(a)
        inside: dict[int, torch.Tensor] = {}
        with saved_tensors_hooks(keep(inside), _same):
            out = module(*args)
        blocks.append(inside)
        return out

    if checkpointing:
        model.enable_gradient_checkpointing(checkpointed)
    try:
        with torch.enable_grad(), saved_tensors_hooks(keep(outside), _same), mode:
            outputs = call()  # noqa: F841 (held until counted, as backward holds the graph)
    finally:
        if checkpointing:
            model.disable_gradient_checkpointing()
    return _size(outside) + max((_size(b, outside) for b in blocks), default=0)


def _size(store: dict[int, torch.Tensor], skip=()) -> int:
    return sum(t.untyped_storage().nbytes() for k, t in store.items() if k not in skip)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _plain(config, cls=None) -> dict:
    """A diffusers config without its private keys (``_use_default_values`` would reset keys set after loading)
    and, given the model class ``cls``, only the keys its constructor takes."""
    keep = inspect.signature(cls.__init__).parameters if cls is not None else None
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and (keep is None or k in keep)}


@functools.lru_cache(maxsize=64)
def _unet_activations(config_json: str, latent: int, seq_len: int, checkpointing: bool, precision: str) -> int:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_json))
        cfg = unet.config
        sample = torch.zeros(1, cfg.in_channels, latent, latent)
        states = torch.zeros(1, seq_len, cfg.cross_attention_dim)
        timestep = torch.zeros(1, dtype=torch.long)
        cond = torch.zeros(1, cfg.time_cond_proj_dim) if cfg.time_cond_proj_dim else None
        return saved_bytes(lambda: unet(sample, timestep, states, timestep_cond=cond), unet,
                           checkpointing=checkpointing, precision=precision)


def unet_activations(config, latent: int, seq_len: int, checkpointing: bool, precision: str) -> int:
    """Bytes saved for backward by one trained call of a ``UNet2DConditionModel`` with ``config`` at batch 1: a
    (1, in_channels, latent, latent) latent, (1, seq_len, cross_attention_dim) text states and, with a guidance input,
    its embedding. Activations grow linearly with the batch (tests check it on a small UNet)."""
    return _unet_activations(json.dumps(_plain(config), sort_keys=True), latent, seq_len, checkpointing, precision)


@functools.lru_cache(maxsize=16)
def _tiny_activations(config_json: str, resolution: int, critic_channels: int | None, precision: str) -> int:
    with torch.device("meta"):
        tiny = AutoencoderTiny.from_config(json.loads(config_json))
        critic = patch_discriminator(critic_channels) if critic_channels else None
        trained = torch.nn.ModuleDict({"tiny": tiny, **({"critic": critic} if critic is not None else {})})
        factor = 2 ** (len(tiny.config.encoder_block_out_channels) - 1)
        x = torch.zeros(1, 3, resolution, resolution)
        z = torch.zeros(1, tiny.config.latent_channels, resolution // factor, resolution // factor)

        def call():
            fake = tiny.decode(z).sample
            # the decoder stage's hinge losses call the critic three times with grad (losses.HingeGAN)
            judged = [critic(fake.detach()), critic(fake.detach()), critic(fake)] if critic is not None else []
            return fake, tiny.encode(x).latents, judged
        return saved_bytes(call, trained, precision=precision)


def tiny_activations(tiny: AutoencoderTiny, resolution: int, critic_channels: int | None, precision: str) -> int:
    """Bytes saved for backward by one training sample of the decoder stage: the tiny decoder on a latent, the tiny
    encoder on a ``resolution``-pixel image and, with the adversarial loss, the critic's three calls."""
    config = json.dumps(_plain(tiny.config, AutoencoderTiny), sort_keys=True)
    return _tiny_activations(config, resolution, critic_channels, precision)


# --------------------------------------------------------------------------- memory
def module_bytes(*modules: torch.nn.Module | None) -> int:
    """Parameters and buffers of ``modules`` as they are stored (dtype included)."""
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in (*m.parameters(), *m.buffers()))


def estimate(trained: int, frozen_bytes: int, p: TrainParams, precision: str, activations_per_sample: int) -> dict:
    """GPU bytes of a training stage, by part: ``trained`` parameters, frozen models of ``frozen_bytes``, a
    micro-batch of ``p.batch_size`` samples of ``activations_per_sample``."""
    state = OPTIMIZER_BYTES[p.optimizer] + (4 if p.adam_amsgrad else 0)
    return {
        "weights": 4 * trained,  # fp32 master weights: accelerate's autocast leaves the model in fp32
        "gradients": 4 * trained,
        "optimizer": state * trained,
        "ema": 4 * trained if p.ema_decay > 0 else 0,  # diffusers EMAModel: an fp32 copy on the device
        "weight_copies": 2 * trained if precision in HALF else 0,
        "frozen": frozen_bytes,
        "activations": activations_per_sample * p.batch_size,
    }


def unet_stage_memory(trained: UNet2DConditionModel, frozen: Sequence[torch.nn.Module | None], p: TrainParams,
                      precision: str, latent: int, seq_len: int) -> dict:
    """``estimate`` of a stage training the UNet ``trained`` beside the ``frozen`` models, activations measured."""
    acts = unet_activations(trained.config, latent, seq_len, p.gradient_checkpointing, precision)
    return estimate(count_parameters(trained, trainable_only=True), module_bytes(*frozen), p, precision, acts)


def check_fits(name: str, parts_bytes: dict, device_bytes: int, where: str = "this GPU") -> None:
    """Raise ``UserError`` when the estimate exceeds ``device_bytes`` less ``HEADROOM``; the line names the knobs."""
    total, usable = sum(parts_bytes.values()), (1 - HEADROOM) * device_bytes
    if total <= usable:
        return
    shown = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.1f}" for k, v in parts_bytes.items() if v)
    raise UserError(f"{name}: needs an estimated {total / 1e9:.1f} GB of GPU memory ({shown}), more than the "
                    f"{usable / 1e9:.1f} GB usable of {where}'s {device_bytes / 1e9:.1f} GB ({HEADROOM:.0%} kept for "
                    "the CUDA context and fragmentation); lower train.batch_size and raise train.grad_accum (the "
                    "same global batch), or set train.gradient_checkpointing: true or train.optimizer: adamw8bit")
