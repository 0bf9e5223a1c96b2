"""One run of the training loop, alone or as one of N processes under torchrun (tests/test_multiprocess.py).

    torchrun --standalone --nproc_per_node 2 tests/ddp_train.py OUT [--resume] [--stop-after STEP]
    python tests/ddp_train.py OUT --dropout 0.3 --step-seconds 0.3 [--resume [--no-rng-restore]]

Trains a small convolutional denoiser whose loss draws data and noise from the loop's generator (with
``--dropout``, dropout draws from the global RNG: what the checkpoint's RNG state restores), then
writes OUT/weights-rank{R}.safetensors and OUT/result-rank{R}.json (steps resumed from, loss history).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sd_distill.params import TrainParams
from sd_distill.training.loop import train

PARAMS = TrainParams(steps=6, batch_size=4, grad_accum=4, learning_rate=1e-2, lr_schedule="cosine",
                     warmup_steps=1, ema_decay=0.9, checkpoint_every=2, keep_checkpoints=3, log_every=1)


class Stop(RuntimeError):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None, help="raise once this step has been logged")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout between the convolutions (global RNG)")
    ap.add_argument("--step-seconds", type=float, default=0.0, help="sleep after each step (time to SIGKILL)")
    ap.add_argument("--no-rng-restore", action="store_true",
                    help="ablation: resume without restoring the global RNG state (it restarts from the seed)")
    args = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Dropout(args.dropout),
                                torch.nn.Conv2d(8, 3, 3, padding=1))
    if args.no_rng_restore:
        from sd_distill.training import checkpoint

        checkpoint.restore_rng = lambda state: None
    clean = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def batch_fn(step, micro, gen):
        return clean[torch.randint(0, len(clean), (PARAMS.batch_size,), generator=gen)]

    def loss_fn(net, batch, gen):
        noise = torch.randn(batch.shape, generator=gen)
        level = torch.rand(batch.shape[0], 1, 1, 1, generator=gen)
        pred = net(batch + level * noise)
        return F.mse_loss(pred, noise), {"level": float(level.mean())}

    def on_metrics(metrics, step):
        time.sleep(args.step_seconds)
        if args.stop_after is not None and step >= args.stop_after:
            raise Stop(f"stopped after step {step}")  # like a preempted node, after a checkpoint

    result = train(model, loss_fn, batch_fn, PARAMS, args.out / "work", seed=3, resume=args.resume,
                   on_metrics=on_metrics, name="ddp-test")
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
              args.out / f"weights-rank{rank}.safetensors")
    (args.out / f"result-rank{rank}.json").write_text(json.dumps(
        {"resumed_from": result.resumed_from, "losses": result.losses,
         "world_size": int(os.environ.get("WORLD_SIZE", "1"))}))


if __name__ == "__main__":
    main()
