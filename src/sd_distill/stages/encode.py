"""Stage ``encode``: the teacher VAE's posteriors and the caption token ids of every prepared sample, written once.

For each prepared shard of ``encode.splits`` one latent shard (``data.store``): posterior mean and std in float16,
token ids, and with ``embeddings: stored`` the text encoder's output for the shard's distinct captions. Every training
stage reads these instead of running the VAE over the data (``data.latents.from_disk``).

Data-parallel under ``torchrun``: process r of N encodes shards r, r + N, ... into the stage's scratch folder; rank 0
waits for all, then publishes them with the manifest. A finished shard is kept there with a record of what made it
(its source shard's sha256, the models' fingerprints, these params), so a killed ``encode`` started again encodes only
the shards it had not finished. Output ``data/latents/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

from sd_distill.data import store
from sd_distill.data.latents import encode_prompts, to_model_range, tokenize
from sd_distill.data.shards import check_shard, iter_shard, split_rows
from sd_distill.errors import UserError
from sd_distill.models.parts import Needs, check_pipeline, load_model, pick_device
from sd_distill.params import EncodeParams
from sd_distill.training.loop import world_size

log = logging.getLogger(__name__)
NEEDS = Needs(stage="encode", producer="teacher", vae="AutoencoderKL")


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def steady_heap(mmap_threshold: int = 1 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Fix glibc's malloc thresholds for this process, so that encode's peak RSS does not creep up with the number
    of batches. By default glibc raises its mmap threshold (up to 32 MB) each time a mapped block is freed; blocks
    of that size then come from the heap, whose free space is fragmented by everything else the batch allocates
    (PNG decoding, token ids, the posteriors), so the VAE's next forward pass lands on a higher high-water mark now
    and then (bench-data: +12% peak RSS from 1k to 50k samples). Fixed thresholds keep every block of
    ``mmap_threshold`` bytes or more a mapping of its own, returned to the OS when freed (measured on 5.6k samples
    in 1,000-sample shards: the peak moved +13 MB after the first shard instead of +91 MB, at the same speed).
    Returns False where the C library has no ``mallopt`` (not glibc): nothing changes there."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


class ResolutionError(UserError, ValueError):
    """The prepared images do not fit the teacher's VAE."""


def vae_factor(vae) -> int:
    """How many pixels one latent covers per side: 2 ** (down blocks - 1) for ``AutoencoderKL``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(vae, images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 images -> (n, 2, C, h, w) float16: the VAE posterior's mean and std."""
    x = to_model_range(images).to(vae.device, vae.dtype)
    dist = vae.encode(x).latent_dist
    return torch.stack([dist.mean, dist.std], dim=1).to(torch.float16).cpu().numpy()


def caption_arrays(tokenizer, text_encoder, captions: list[str], p: EncodeParams) -> dict[str, np.ndarray]:
    """One shard's caption arrays: token ids, and with ``embeddings: stored`` the distinct captions' embeddings
    and each sample's row among them (see ``data.store``)."""
    arrays = {"ids": tokenize(tokenizer, captions).numpy().astype(np.int32)}
    if p.embeddings == "stored":
        prompts = sorted(set(captions))
        row = {c: i for i, c in enumerate(prompts)}
        arrays["emb"] = torch.cat([encode_prompts(tokenizer, text_encoder, prompts[i:i + p.batch_size])
                                   for i in range(0, len(prompts), p.batch_size)]).float().numpy()
        arrays["prompt"] = np.array([row[c] for c in captions], dtype=np.int32)
    return arrays


def load_encoders(teacher: Path, device: str) -> SimpleNamespace:
    """The teacher folder's VAE, tokenizer and text encoder (checked as a whole pipeline; the UNet is not loaded)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    check_pipeline(teacher, NEEDS)
    return SimpleNamespace(
        vae=load_model(AutoencoderKL, teacher / "vae", "teacher").to(device).eval().requires_grad_(False),
        tokenizer=CLIPTokenizer.from_pretrained(  # nosec B615: a local folder, offline (local_files_only)
            teacher / "tokenizer", local_files_only=True),
        text_encoder=load_model(CLIPTextModel, teacher / "text_encoder", "teacher").to(device).eval()
        .requires_grad_(False))


def run_key(models: dict[str, str], p: EncodeParams) -> str:
    """What a latent shard depends on besides its source shard: the models that made it and these params."""
    body = {"format": store.FORMAT, "models": models, "params": p.model_dump(mode="json", exclude={"splits"})}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _record(work: Path, name: str) -> Path:
    return work / f"{name}.done.json"


def finished(work: Path, name: str, key: str, source_sha256: str, hash_files: bool = True) -> dict | None:
    """The record of shard ``name`` if it was encoded from this source with this key and (``hash_files``) its files
    still match their sha256."""
    path = _record(work, name)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != key or record.get("source_sha256") != source_sha256:
        return None
    for f in record["files"].values():
        if not (work / f["file"]).is_file() or (hash_files and store.sha256_file(work / f["file"]) != f["sha256"]):
            return None
    return record


def encode_shard(parts, src: Path, split: str, index: int, p: EncodeParams, work: Path, factor: int, bar) -> dict:
    """Encode one prepared shard into ``work``, ``p.batch_size`` images at a time as they are read (a shard's
    pixels are never in memory at once); returns its record (files written, sha256, sample count)."""
    posterior, captions, batch = [], [], []

    def flush() -> None:
        posterior.append(encode_images(parts.vae, np.stack(batch)))
        bar.update(len(batch))
        batch.clear()

    for sample in iter_shard(src):
        if not batch and not posterior:  # the first image: can the VAE encode this size at all?
            h, w = sample.image.shape[:2]
            if h % factor or w % factor:
                raise ResolutionError(f"encode: {src} holds {w}x{h} px images, which the teacher's VAE (one latent "
                                      f"per {factor}x{factor} px) cannot encode; prepare.resolution must be a "
                                      f"multiple of {factor}")
        batch.append(sample.image)
        captions.append(sample.caption)
        if len(batch) == p.batch_size:
            flush()
    if batch:
        flush()
    arrays = {"posterior": np.concatenate(posterior),
              **caption_arrays(parts.tokenizer, parts.text_encoder, captions, p)}
    files = {}
    for array, data in arrays.items():
        name = store.shard_name(split, index, array)
        files[array] = {"file": name, "sha256": store.save_array(work / name, data)}
    return {"split": split, "source": src.name, "samples": len(captions), "files": files}


def main(ctx) -> None:
    p: EncodeParams = ctx.params.encode
    if not steady_heap():
        log.info("encode: no glibc mallopt here; peak memory may drift up with the number of batches")
    device = pick_device(ctx.params.base)
    parts = load_encoders(ctx.inputs["teacher"], device)
    prepared, work = ctx.inputs["data"], ctx.work
    models = {"vae": store.fingerprint(parts.vae), "tokenizer": store.tokenizer_fingerprint(parts.tokenizer)}
    if p.embeddings == "stored":
        models["text_encoder"] = store.fingerprint(parts.text_encoder)
    key = run_key(models, p)
    todo = [(split, i, row) for split in p.splits for i, row in enumerate(split_rows(prepared, split))]
    rank, world = int(os.environ.get("RANK", "0")), world_size()
    mine = todo[rank::world]
    started, reused, encoded = time.time(), 0, 0
    bar = tqdm(total=sum(row["samples"] for _, _, row in mine), desc="encode", unit="img", disable=None)
    for split, i, row in mine:
        name = f"{split}-{i:05d}"
        record = finished(work, name, key, row["sha256"])
        if record is not None:
            reused += 1
            bar.update(row["samples"])
            continue
        src = prepared / row["file"]
        check_shard(src, row, prepared)
        record = encode_shard(parts, src, split, i, p, work, vae_factor(parts.vae), bar)
        encoded += record["samples"]
        tmp = work / f".{name}.done.json.tmp"
        tmp.write_text(json.dumps({**record, "key": key, "source_sha256": row["sha256"]}, indent=1))
        tmp.rename(_record(work, name))
    bar.close()
    seconds = time.time() - started
    if world > 1:  # every process's shards are on disk before rank 0 publishes them
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    if rank > 0:
        return
    out = ctx.outputs["latents"]
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, i, row in todo:
        name = f"{split}-{i:05d}"
        record = finished(work, name, key, row["sha256"], hash_files=False)  # hashed when written or reused
        if record is None:
            raise RuntimeError(f"encode: shard {name} has no complete record in {work} after every process finished")
        for f in record["files"].values():
            os.replace(work / f["file"], out / f["file"])
        _record(work, name).unlink()
        shards.append({k: record[k] for k in ("split", "source", "samples", "files")})
    first = np.load(out / shards[0]["files"]["posterior"]["file"], mmap_mode="r")
    manifest = {"format": store.FORMAT, "embeddings": p.embeddings, "models": models,
                "scaling_factor": float(parts.vae.config.scaling_factor), "latent_shape": list(first.shape[2:]),
                "max_length": int(parts.tokenizer.model_max_length),
                "samples": {s: sum(r["samples"] for r in shards if r["split"] == s) for s in p.splits},
                "shards": shards}
    (out / store.MANIFEST).write_text(json.dumps(manifest, indent=2))
    total = sum(manifest["samples"].values())
    ctx.summary.update({"samples": total, "shards": len(shards), "shards_reused": reused,
                        "images_per_second": encoded / max(seconds, 1e-9),
                        "bytes": sum((out / f["file"]).stat().st_size for r in shards for f in r["files"].values())})
    log.info("encode: %d samples in %d shards (%d reused), latents %s, %.0f images/s", total, len(shards), reused,
             manifest["latent_shape"], ctx.summary["images_per_second"])
