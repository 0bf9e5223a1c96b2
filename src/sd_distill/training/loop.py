"""The one training loop every stage uses; stages supply a loss callable and a batch function.

Randomness inside the loop never comes from global RNG state: the batch and the loss of step ``s``,
micro-batch ``m`` draw from ``torch.Generator`` seeded by ``(seed, s, m)``. A run resumed from a checkpoint
therefore sees exactly the batches and noise the uninterrupted run would have, and ends with the same
weights on CPU.

Under ``torchrun`` / ``accelerate launch`` with N processes the loop is data-parallel: a step's
``grad_accum`` micro-batches are dealt out (process r takes r, r + N, ...), DDP averages the gradients, and
only the main process writes checkpoints. The global batch, the data and the noise are those of a
single-process run, so any process count trains the same model (within float error), and a checkpoint
resumes under another process count.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from sd_distill.errors import Preempted, TrainingFailed, UserError
from sd_distill.params import TrainParams
from sd_distill.training import checkpoint as ckpt
from sd_distill.training.checkpoint import CheckpointMismatch, LoopState, checkpoints
from sd_distill.training.memory import check_fits

log = logging.getLogger(__name__)

# batch_fn(step, micro, generator) -> batch ; loss_fn(model, batch, generator) -> (loss, extra scalars)
BatchFn = Callable[[int, int, torch.Generator], Any]
LossFn = Callable[[torch.nn.Module, Any, torch.Generator], "tuple[torch.Tensor, dict[str, float]]"]
MetricsFn = Callable[[dict[str, float], int], None]
# memory() -> the stage's GPU memory estimate by part, in bytes (``training.memory.estimate``)
MemoryFn = Callable[[], dict[str, int]]


class TrainingDiverged(TrainingFailed):
    """The loss became NaN or Inf; the last good checkpoint is kept, nothing is published."""


class OutOfMemory(TrainingFailed):
    """Out of memory with micro-batches already at ``train.min_micro_batch``."""


def world_size() -> int:
    """Processes training together (``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE``); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def step_generator(seed: int, step: int, micro: int, *part: int) -> torch.Generator:
    """The generator of step ``step``, micro-batch ``micro`` (and, once out of memory forced a split, of one of
    its ``part``s): keyed by position, so a resumed run draws what the uninterrupted one drew."""
    state = np.random.SeedSequence([seed, step, micro, *part]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class StopOnSigterm:
    """While active, SIGTERM (a preempted node, an orchestrator's kill) only sets ``requested``; the loop
    checks it at each step boundary. Outside the main thread (where no handler can be set) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            log.warning("SIGTERM: stopping after this step, with a checkpoint")
        self.requested = True

    def __enter__(self) -> "StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Objective(torch.nn.Module):
    """``loss_fn`` on ``model`` as a module's forward: what the accelerator (DDP) wraps."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, gen: torch.Generator):
        return self.loss_fn(self.model, batch, gen)


@dataclass
class TrainResult:
    model: torch.nn.Module
    losses: list[float]
    resumed_from: int
    seconds: float


def split_batch(batch: Any, parts: int) -> list[tuple[Any, float]]:
    """``batch`` (a tensor, or a tuple/list/dict of them with a common leading size) cut along its first dimension
    into ``parts`` pieces, each with its share of the samples. Values without that leading size go to every piece."""
    leaves = [batch] if torch.is_tensor(batch) else list(batch.values() if isinstance(batch, dict) else batch)
    size = next(t.shape[0] for t in leaves if torch.is_tensor(t) and t.ndim)
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        cut = lambda v: v[lo:hi] if torch.is_tensor(v) and v.ndim and v.shape[0] == size else v  # noqa: E731
        if torch.is_tensor(batch):
            piece = cut(batch)
        elif isinstance(batch, dict):
            piece = {k: cut(v) for k, v in batch.items()}
        else:
            piece = type(batch)(cut(v) for v in batch)
        pieces.append((piece, (hi - lo) / size))
    return pieces


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None elsewhere (no estimate is checked on the CPU)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def build_optimizer(model: torch.nn.Module, p: TrainParams, name: str) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters, in torch or, with ``p.optimizer`` ``adamw8bit``, bitsandbytes' 8-bit
    AdamW (Dettmers et al. 2022): the same update with 8-bit blockwise-quantised moments."""
    kwargs = dict(lr=p.learning_rate, betas=(p.adam_beta1, p.adam_beta2), eps=p.adam_epsilon,
                  weight_decay=p.weight_decay)
    # a model with networks at their own rates (dmd's generator) names its parameter groups; the LR schedule scales
    # every group's rate alike
    params = model.optimizer_groups(p.learning_rate) if hasattr(model, "optimizer_groups") else model.parameters()
    if p.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError(f"{name}: train.optimizer is 'adamw8bit', which needs bitsandbytes, and it is not "
                            "installed; `pip install bitsandbytes` (CUDA), or set train.optimizer: adamw") from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, amsgrad=p.adam_amsgrad, **kwargs)


def gradient_checkpointing(model: torch.nn.Module, p: TrainParams, name: str) -> bool:
    """Turn on diffusers' gradient checkpointing on ``model`` if ``p`` asks for it; whether it did."""
    if not p.gradient_checkpointing:
        return False
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise UserError(f"{name}: train.gradient_checkpointing is true, but {type(model).__name__} has no gradient "
                        "checkpointing (diffusers models: _supports_gradient_checkpointing); set it false")
    model.enable_gradient_checkpointing()
    return True


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch_fn: BatchFn,
    p: TrainParams,
    workdir: Path,
    *,
    seed: int,
    resume: bool = False,
    mixed_precision: str = "no",
    cpu: bool = True,
    name: str = "train",
    on_metrics: MetricsFn | None = None,
    memory: MemoryFn | None = None,
) -> TrainResult:
    """Run ``p.steps`` optimizer steps of ``loss_fn`` on ``model``; returns it with EMA weights if EMA is on.

    ``workdir`` holds the checkpoints (``step-NNNNNNN/``). With ``resume`` the loop continues from the
    newest complete one and refuses one made with different ``TrainParams``; without it old checkpoints
    are removed. A NaN/Inf loss raises ``TrainingDiverged`` before the optimizer step. Out of memory cuts
    every micro-batch in two (then four, ...) pieces whose gradients add up to the same step, down to
    ``p.min_micro_batch`` samples, then raises ``OutOfMemory``.

    Precision: under ``mixed_precision`` bf16/fp16 the accelerator runs the loss under autocast while ``model`` keeps
    fp32 master weights (accelerate casts no weights). On CUDA, ``memory`` (the stage's ``training.memory`` estimate) is
    checked against the device before step 1 (``check_fits``); ``p.allow_tf32`` turns on TF32 for float32 matmuls and
    convolutions; ``p.gradient_checkpointing`` turns on the model's own (diffusers) checkpointing for the run.
    Attention runs in torch's SDPA: diffusers' ``Attention`` picks ``AttnProcessor2_0`` by default.
    """
    started = time.time()
    workdir = Path(workdir)
    fingerprint = p.fingerprint()
    world = world_size()
    if p.grad_accum % world:
        raise UserError(f"{name}: train.grad_accum is {p.grad_accum}, which {world} processes cannot share: the "
                        f"global batch is batch_size x grad_accum micro-batches, each process takes every "
                        f"{world}th. Set grad_accum to a multiple of {world}.")

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # Data-parallel: process r takes micro-batches r, r + world, ... of every step and DDP averages the
    # gradients, so any process count trains on the same global batch; the LR schedule counts optimizer steps.
    # The loop accumulates gradients itself (so that a micro-batch can be split when memory runs out).
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if world > 1 else []
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, step_scheduler_with_optimizer=False,
                      kwargs_handlers=handlers)
    if memory is not None and (total := device_memory(acc.device)) is not None:
        check_fits(name, memory(), total, torch.cuda.get_device_name(acc.device))
    if p.allow_tf32 and acc.device.type == "cuda":  # as diffusers' and BK-SDM's --allow_tf32 set it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    checkpointing = gradient_checkpointing(model, p, name)
    optimizer = build_optimizer(model, p, name)  # before any old checkpoint is removed: bitsandbytes may be missing
    local_micro = list(range(acc.process_index, p.grad_accum, world))
    if world > 1:  # the main process decides (the runner sees retries there); all follow it
        resume = bool(broadcast_object_list([resume], from_process=0)[0])
    if acc.is_main_process and not resume and workdir.exists():
        shutil.rmtree(workdir)
    if acc.is_main_process:
        workdir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    scheduler = get_scheduler(p.lr_schedule, optimizer, num_warmup_steps=p.warmup_steps,
                              num_training_steps=p.steps)
    ema = EMAModel(model.parameters(), decay=p.ema_decay) if p.ema_decay > 0 else None
    state = LoopState()
    # The loss runs inside the wrapped module's forward, so under DDP the gradient sync sees the whole
    # computation while loss_fn keeps the plain model (its attributes, its submodules' methods).
    net = model
    objective, optimizer, scheduler = acc.prepare(_Objective(net, loss_fn), optimizer, scheduler)
    if ema is not None:
        ema.to(acc.device)

    resumed_from = 0
    if resume and (found := checkpoints(workdir)):
        last = found[-1]
        ckpt.verify_checkpoint(last)
        saved = (last / "train_params.json").read_text()
        if saved != fingerprint:
            raise CheckpointMismatch(f"{last}: made with other training params; rerun without --resume "
                                     f"to start over.\n  checkpoint: {saved}\n  now:        {fingerprint}")
        acc.load_state(str(last))
        ckpt.load_loop_state(last, state, ema)
        resumed_from = state.step
        log.info("%s: resumed from %s (step %d of %d)", name, last, state.step, p.steps)

    def one_step(step: int, parts: int) -> tuple[float, dict[str, float]]:
        """Gradients of step ``step`` accumulated over this process's micro-batches, each cut in ``parts``."""
        step_loss, extras = 0.0, {}
        for i, micro in enumerate(local_micro):
            gen = step_generator(seed, step, micro)
            batch = batch_fn(step, micro, gen)
            pieces = split_batch(batch, parts) if parts > 1 else [(batch, 1.0)]
            for j, (piece, share) in enumerate(pieces):
                g = gen if parts == 1 else step_generator(seed, step, micro, parts, j)
                last = i == len(local_micro) - 1 and j == len(pieces) - 1
                with contextlib.nullcontext() if last else acc.no_sync(objective):  # DDP syncs once a step
                    with acc.autocast():
                        loss, extra = objective(piece, g)
                    value = float(loss.detach())
                    bad = value if world == 1 else float(acc.reduce(torch.tensor([value], device=acc.device),
                                                                      "sum").item())
                    if not math.isfinite(bad):  # every process stops, none waits on a gradient all-reduce
                        done = checkpoints(workdir)
                        terms = ", ".join(f"{k}={v:.4g}" for k, v in extra.items()) or "one (the stage's loss)"
                        raise TrainingDiverged(
                            f"{name}: loss is {value} at step {step + 1} of {p.steps} (micro-batch {micro}); loss "
                            f"terms: {terms}. Stopped before the optimizer step; nothing is published. Last good "
                            f"checkpoint: {done[-1] if done else 'none yet'}. Lower train.learning_rate or check the "
                            "inputs.")
                    # DDP averages over processes: each divides by its own count of micro-batches
                    acc.backward(loss * share / len(local_micro))
                step_loss += value * share / p.grad_accum
                for k, v in extra.items():
                    extras[k] = extras.get(k, 0.0) + v * share / p.grad_accum
        return step_loss, extras

    bar = tqdm(total=p.steps, initial=state.step, desc=name, unit="step", dynamic_ncols=True,
               disable=not sys.stderr.isatty() or not acc.is_main_process)
    window: list[float] = []
    # each term's values since the last log; a term some steps lack (dmd's generator terms) is averaged over the
    # steps that had it, so it is logged even when the logging step is not one of them
    term_window: dict[str, list[float]] = {}
    tick = time.time()
    parts = 1  # pieces each micro-batch is cut into; doubles when memory runs out
    objective.train()
    with StopOnSigterm() as sigterm:  # stop at a step boundary, checkpoint saved
        while state.step < p.steps:
            step = state.step
            while True:
                try:
                    step_loss, extras = one_step(step, parts)
                    break
                except torch.OutOfMemoryError as exc:
                    optimizer.zero_grad(set_to_none=True)
                    _free_memory()
                    size = -(-p.batch_size // (2 * parts))  # the largest piece after one more split
                    if world > 1 or size < p.min_micro_batch or 2 * parts > p.batch_size:
                        why = ("under several processes the pieces would differ between them" if world > 1 else
                               f"micro-batches are already at {-(-p.batch_size // parts)} samples (train."
                               f"min_micro_batch is {p.min_micro_batch})")
                        raise OutOfMemory(f"{name}: out of memory at step {step + 1} of {p.steps} and {why}. Lower "
                                          "train.batch_size (raising train.grad_accum keeps the global batch), use "
                                          f"a larger device or base.mixed_precision. ({exc})") from None
                    parts *= 2
                    log.warning("%s: out of memory at step %d; cutting each micro-batch of %d into %d pieces of "
                                "at most %d (the global batch stays %d)", name, step + 1, p.batch_size, parts,
                                size, p.batch_size * p.grad_accum)
            acc.clip_grad_norm_(net.parameters(), p.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if world > 1:  # the logged loss is the global batch's
                summed = acc.reduce(torch.tensor([step_loss, *extras.values()], device=acc.device), "sum").tolist()
                step_loss, extras = summed[0], dict(zip(extras, summed[1:]))
            if ema is not None:
                ema.step(net.parameters())
            state.step += 1
            state.losses.append(step_loss)
            window.append(step_loss)
            for k, v in extras.items():
                term_window.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if state.step % p.log_every == 0 or state.step == p.steps:
                mean = sum(window) / len(window)
                rate = len(window) / max(time.time() - tick, 1e-9)
                eta = (p.steps - state.step) / rate
                if bar.disable and acc.is_main_process:
                    log.info("%s: step %d/%d loss %.4f  %.2f step/s  eta %.0fs", name, state.step, p.steps, mean,
                             rate, eta)
                if on_metrics is not None:
                    key = name.split("@")[0]  # MLflow metric names allow no "@"; each round has its own run anyway
                    on_metrics({f"{key}/loss": mean, f"{key}/lr": scheduler.get_last_lr()[0],
                                **{f"{key}/{k}": sum(v) / len(v) for k, v in term_window.items()}}, state.step)
                window, term_window, tick = [], {}, time.time()
            stop = sigterm.requested
            if world > 1:  # every process stops at the same step, or the others would wait in an all-reduce
                stop = bool(acc.reduce(torch.tensor([float(stop)], device=acc.device), "sum").item())
            if state.step % p.checkpoint_every == 0 or state.step == p.steps or stop:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    ckpt.save_checkpoint(acc, workdir, state, ema, fingerprint, p.keep_checkpoints)
                acc.wait_for_everyone()
            if stop and state.step < p.steps:
                bar.close()
                saved = workdir / f"step-{state.step:07d}"
                raise Preempted(f"{name}: stopped by SIGTERM after step {state.step} of {p.steps}; checkpoint "
                                f"{saved} saved. Rerun with --resume (an orchestrator's retry of the same run "
                                "does) to continue from it.")
        bar.close()

    final = acc.unwrap_model(objective).model
    if ema is not None:
        ema.copy_to(final.parameters())
    if checkpointing:
        final.disable_gradient_checkpointing()
    final.eval()
    return TrainResult(model=final, losses=state.losses, resumed_from=resumed_from, seconds=time.time() - started)
