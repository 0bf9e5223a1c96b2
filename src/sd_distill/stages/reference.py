"""Stage ``reference``: the real images' feature statistics that evaluate's FID compares against, made once.

FID fits a Gaussian to each side's features (Heusel et al. 2017), and of the real side it needs only the
count, the feature sum and the sum of outer products (float64). They depend on no model, so this stage computes
them once and ``evaluate`` reads them for every model of every run. Sets (``reference.sets``):

- ``digits`` (tiny, smoke): the prepared test split in the digit classifier's feature space (penultimate layer),
  the FID of the val split against it (the floor a model's FID is read against), and the test images' diversity
  per digit (``scoring.Spread``: RMS distance between two images of one digit), what a model's is read against.
- ``coco`` (sd15): the first ``reference.images`` MS-COCO val2017 images by id (the images of evaluate's COCO
  prompts), centre-cropped and resized to the teacher's output side, through the TorchScript FID Inception.

Images are read and featurized ``reference.batch_size`` at a time; only the sums are kept, so 30,000 COCO images
need no more memory than 1,000. Writes ``data/reference/``: ``stats.npz`` (``<set>_count``, ``<set>_sum`` (D,),
``<set>_outer`` (D, D)) and ``manifest.json`` (per set: the feature extractor and the sha256 of its weights file,
the resolution, which images and how many; the sha256 of ``stats.npz``). ``Reference`` reads them back for
``evaluate`` and refuses statistics made with another extractor, other images or another resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from sd_distill.data.shards import iter_split, read_manifest, split_rows
from sd_distill.errors import UserError
from sd_distill.hashing import sha256_file
from sd_distill.models.parts import pick_device, read_config
from sd_distill.params import ReferenceParams
from sd_distill.scoring import (DIGIT_FEATURES, INCEPTION_FILE, Spread, coco_captions, fid_metric, load_image,
                                load_inception, need_path, nchw, real_sums)

log = logging.getLogger(__name__)
FORMAT = 2  # 2: digits carry the test images' diversity per digit
T = TypeVar("T")
STATS, MANIFEST = "stats.npz", "manifest.json"
CLASSIFIER_WEIGHTS = "classifier/model.safetensors"  # in the prepared data (tiny, smoke)
# where evaluate's side of each checked field comes from, for the error line
ORIGINS = {
    "digits": {"extractor_sha256": f"data/prepared/{CLASSIFIER_WEIGHTS}",
               "resolution": "data/prepared/manifest.json", "source_sha256": "the prepared test and val shards"},
    "coco": {"extractor_sha256": "evaluate.inception", "resolution": "the teacher's output side",
             "count": "evaluate.images_per_set", "files_sha256": "evaluate.coco_captions"},
}


def output_side(folder: Path) -> int:
    """The side in pixels that a pipeline folder samples by default: UNet sample_size x the VAE's downsampling."""
    unet = read_config(folder / "unet" / "config.json")
    vae = read_config(folder / "vae" / "config.json")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def digits_record(data: Path) -> dict:
    """What the digit statistics depend on: the classifier's weights, the test and val shards, their side."""
    shards = {split: [r["sha256"] for r in split_rows(data, split)] for split in ("test", "val")}
    return {"extractor_sha256": sha256_file(data / CLASSIFIER_WEIGHTS),
            "resolution": int(read_manifest(data)["resolution"]), "source_sha256": _digest(shards)}


def coco_record(files: list[str], inception: Path, resolution: int) -> dict:
    """What the COCO statistics depend on: the Inception file, which images (by name, in order), their side."""
    return {"extractor_sha256": sha256_file(inception), "resolution": resolution, "count": len(files),
            "files_sha256": _digest(files)}


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Items (images, samples) -> lists of at most ``size``, in order; one list in memory at a time."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def digit_statistics(data: Path, batch_size: int) -> tuple[dict[str, np.ndarray], dict]:
    """The test split's feature sums (real side) and the val split's FID against them, split by split in batches."""
    from sd_distill.models.classifier import DigitClassifier, FeatureExtractor, to_tensor

    if not (data / "classifier" / "config.json").is_file():
        raise UserError(f"reference.sets: digits needs the digit classifier in {data / 'classifier'}, which only "
                        "prepare.source digits writes; for other data set reference.sets: [coco] (sd15)")
    extractor = FeatureExtractor(DigitClassifier.load(data / "classifier"))
    metric = fid_metric(extractor)
    spread = Spread(10, extractor.num_features)  # the test images' diversity per digit, what evaluate's is read against
    for split, real in (("test", True), ("val", False)):
        bar = tqdm(total=sum(r["samples"] for r in split_rows(data, split)), desc=f"reference digits {split}",
                   unit="img", disable=None)
        for batch in batches(iter_split(data, split), batch_size):
            x = to_tensor(np.stack([s.image for s in batch]))
            metric.update(x, real=real)
            if real:
                spread.add(extractor(x), np.array([digit_label(s) for s in batch]))
            bar.update(len(batch))
        bar.close()
    per_digit = spread.result()
    info = {"extractor": DIGIT_FEATURES, "extractor_file": CLASSIFIER_WEIGHTS, **digits_record(data),
            "count": int(metric.real_features_num_samples), "features": extractor.num_features,
            "val_images": int(metric.fake_features_num_samples), "fid_val_vs_test": float(metric.compute()),
            "diversity": float(per_digit.mean()), "diversity_per_digit": [float(v) for v in per_digit]}
    return real_sums(metric), info


def digit_label(sample) -> int:
    """A prepared digit's label (``meta['label']``, written by ``prepare.source: digits``)."""
    label = sample.meta.get("label")
    if not isinstance(label, int) or not 0 <= label <= 9:
        raise UserError(f"prepared sample {sample.key!r}: meta 'label' must be a digit 0-9, found {label!r}; the "
                        "digits reference needs data made by prepare.source: digits")
    return label


@torch.no_grad()
def coco_statistics(p: ReferenceParams, resolution: int, device: str) -> tuple[dict[str, np.ndarray], dict]:
    """The Inception feature sums of the first ``p.images`` COCO val2017 images, read ``p.batch_size`` at a time."""
    pairs = coco_captions(p.coco_captions, p.images, key="reference.coco_captions")
    folder = need_path(p.coco_images, "reference.coco_images", "the MS-COCO val2017 images folder")
    files = [f for _, f in pairs]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"reference.coco_images: {len(missing)} caption image(s) missing in {folder}, e.g. "
                        f"{missing[0]}")
    inception_file = need_path(p.inception, "reference.inception", INCEPTION_FILE)
    inception = load_inception(p.inception, device, key="reference.inception")
    metric = fid_metric(inception, device=device)
    bar = tqdm(total=len(files), desc="reference coco", unit="img", disable=None)
    for batch in batches((load_image(folder / f, resolution) for f in files), p.batch_size):
        metric.update(nchw(np.stack(batch)).to(device), real=True)
        bar.update(len(batch))
    bar.close()
    info = {"extractor": f"Inception pool3 ({inception_file.name})", "extractor_file": str(inception_file),
            **coco_record(files, inception_file, resolution), "features": inception.num_features,
            "captions": str(p.coco_captions), "images_folder": str(folder)}
    return real_sums(metric), info


def write(out: Path, made: dict[str, tuple[dict[str, np.ndarray], dict]]) -> dict:
    """``stats.npz`` and ``manifest.json`` into folder ``out`` from each set's (sums, info); returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / STATS, **{f"{name}_{key}": array for name, (sums, _) in made.items() for key, array in sums.items()})
    manifest = {"format": FORMAT, "stats": STATS, "stats_sha256": sha256_file(out / STATS),
                "sets": {name: info for name, (_, info) in made.items()}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class Reference:
    """``data/reference`` read back (``evaluate``): each set's real-image sums, given only to a caller that uses
    the extractor, images and resolution they were made with."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest_file = self.folder / MANIFEST
        try:
            self.manifest = json.loads(self.manifest_file.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.manifest_file}: not found; run `sd-distill run reference` first") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.manifest_file}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); rerun "
                            "`sd-distill run reference`") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{self.manifest_file}: format: expected {FORMAT}, found {self.manifest.get('format')!r}; "
                            "rerun `sd-distill run reference`")
        stats = self.folder / STATS
        if not stats.is_file() or sha256_file(stats) != self.manifest.get("stats_sha256"):
            raise UserError(f"{stats}: missing, or its sha256 differs from {self.manifest_file}; the file was "
                            "changed or truncated: rerun `sd-distill run reference`")
        with np.load(stats, allow_pickle=False) as arrays:
            self.arrays = {key: arrays[key] for key in arrays.files}

    def expect(self, name: str, wanted: dict) -> tuple[dict[str, np.ndarray], dict]:
        """Set ``name``'s sums (``count``, ``sum``, ``outer``) and manifest entry, if every field of ``wanted``
        matches what it was made with; else a ``UserError`` naming the field, expected and found."""
        sets = self.manifest.get("sets", {})
        if name not in sets:
            raise UserError(f"{self.manifest_file}: no {name!r} statistics (it has {sorted(sets) or 'none'}); add "
                            f"{name} to reference.sets and rerun `sd-distill run reference`")
        info = sets[name]
        for key, value in wanted.items():
            if info.get(key) != value:
                raise UserError(f"{self.manifest_file}: {name} {key}: expected {value!r} (from "
                                f"{ORIGINS[name][key]}), found {info.get(key)!r}; the statistics were made from "
                                "other images or another extractor: make reference.* match evaluate.* and rerun "
                                "`sd-distill run reference`")
        return {key: self.arrays[f"{name}_{key}"] for key in ("count", "sum", "outer")}, info

    def digits(self, data: Path) -> tuple[dict[str, np.ndarray], dict]:
        return self.expect("digits", digits_record(data))

    def coco(self, files: list[str], inception: Path, resolution: int) -> tuple[dict[str, np.ndarray], dict]:
        return self.expect("coco", coco_record(files, inception, resolution))


def main(ctx) -> None:
    p: ReferenceParams = ctx.params.reference
    made = {}
    if "digits" in p.sets:
        made["digits"] = digit_statistics(ctx.inputs["data"], p.batch_size)
    if "coco" in p.sets:
        made["coco"] = coco_statistics(p, output_side(ctx.inputs["teacher"]), pick_device(ctx.params.base))
    manifest = write(ctx.outputs["reference"], made)
    for name, info in manifest["sets"].items():
        ctx.summary[f"{name}_images"] = info["count"]
        log.info("reference: %s, %d images at %d px, %d features (%s)", name, info["count"], info["resolution"],
                 info["features"], info["extractor"])
    if "digits" in manifest["sets"]:
        ctx.summary["digits_fid_val_vs_test"] = manifest["sets"]["digits"]["fid_val_vs_test"]
