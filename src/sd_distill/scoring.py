"""What ``evaluate`` measures on one model's samples, as a suite per profile.

A suite fixes the prompts and seeds (the same for every model), scores a model's images, and says how its
figures compare with the teacher's:

- ``DigitSuite`` (tiny, smoke): ``samples_per_prompt`` images per digit prompt; classifier accuracy (prompt
  adherence) and FID in the digit classifier's feature space against the real test split.
- ``TextImageSuite`` (sd15): the prompt sets of the seeds' protocol, ``images_per_set`` each: MS-COCO 2017 val
  captions (first caption per image; FID and Inception Score against the captions' own images), PartiPrompts
  and the HPSv2 benchmark prompts; CLIP score on every set, HPSv2 where its weights are given. Inception is the
  TorchScript ``inception-2015-12-05.pt`` of StyleGAN2-ADA / clean-fid (``evaluate.inception``, a local file:
  nothing is downloaded); CLIP is a hub id or a local folder (``evaluate.clip_model``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from sd_distill.errors import UserError
from sd_distill.params import EvaluateParams

PROMPT_SETS = ("coco", "parti", "hpsv2")


# --------------------------------------------------------------------------- prompt sets (sd15)
def _need(path: str | None, key: str, what: str) -> Path:
    if not path:
        raise UserError(f"evaluate.{key} is not set; it must point at {what}")
    p = Path(path)
    if not p.exists():
        raise UserError(f"evaluate.{key}: {p} does not exist; expected {what}")
    return p


def coco_captions(path: str | None, n: int) -> list[tuple[str, str]]:
    """(caption, image file name) for the first ``n`` images by id, the first caption of each (COCO 2017 val)."""
    p = _need(path, "coco_captions", "MS-COCO's annotations/captions_val2017.json")
    try:
        body = json.loads(p.read_text())
        files = {img["id"]: img["file_name"] for img in body["images"]}
        first: dict[int, str] = {}
        for ann in sorted(body["annotations"], key=lambda a: a["id"]):
            first.setdefault(ann["image_id"], ann["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{p}: not a COCO captions file (needs 'images' with id/file_name and 'annotations' with "
                        f"image_id/caption): {exc!r}") from None
    return [(first[i], files[i]) for i in sorted(first) if i in files][:n]


def parti_prompts(path: str | None, n: int) -> list[str]:
    """The first ``n`` prompts of PartiPrompts.tsv (column ``Prompt``)."""
    p = _need(path, "parti_prompts", "PartiPrompts.tsv (tab-separated, a 'Prompt' column)")
    with open(p, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if "Prompt" not in (reader.fieldnames or []):
            raise UserError(f"{p}: no 'Prompt' column (found {reader.fieldnames})")
        return [row["Prompt"].strip() for row in reader if row["Prompt"].strip()][:n]


def hpsv2_prompts(path: str | None, n: int) -> list[str]:
    """HPSv2 benchmark prompts: a folder of ``<style>.json`` lists (anime, concept-art, paintings, photo) or one
    list; ``n`` in all, the same share from each style, styles in name order."""
    p = _need(path, "hpsv2_prompts", "the HPSv2 benchmark prompts (a folder of <style>.json lists, or one list)")
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        raise UserError(f"{p}: no .json prompt lists in this folder")
    styles = []
    for f in files:
        body = json.loads(f.read_text())
        if not isinstance(body, list) or not all(isinstance(s, str) for s in body):
            raise UserError(f"{f}: expected a JSON list of prompt strings, found {type(body).__name__}")
        styles.append(body)
    share = math.ceil(n / len(styles))
    return [s for style in styles for s in style[:share]][:n]


def load_image(path: Path, size: int) -> np.ndarray:
    """Centre square crop, resized to ``size`` (bicubic), RGB uint8: the reference side of FID."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        return np.asarray(im)


# --------------------------------------------------------------------------- Inception (FID, IS)
class InceptionFeatures(torch.nn.Module):
    """The TorchScript FID Inception (``inception-2015-12-05.pt``): uint8 NCHW in, 2048 pool features out."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, return_features=True)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, no_output_bias=True)  # softmax over the 1008 classes (StyleGAN2-ADA's IS setting)


def load_inception(path: str | None, device: str) -> InceptionFeatures:
    p = _need(path, "inception", "the TorchScript FID Inception inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid)")
    try:
        net = torch.jit.load(str(p), map_location=device).eval()
    except RuntimeError as exc:
        raise UserError(f"evaluate.inception: {p} is not a TorchScript file: {exc}") from None
    return InceptionFeatures(net)


def inception_score(probs: torch.Tensor, splits: int = 10) -> float:
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))), averaged over ``splits`` chunks."""
    probs = probs.double()
    scores = []
    for chunk in probs.chunk(min(splits, len(probs))):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (torch.log(chunk + 1e-12) - torch.log(marginal + 1e-12))).sum(1).mean()
        scores.append(torch.exp(kl).item())
    return float(np.mean(scores))


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


@torch.no_grad()
def feature_fid(extractor: torch.nn.Module, real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between ``extractor`` features of two (N, H, W, 3) uint8 sets (torchmetrics FID)."""
    from sd_distill.models.classifier import to_tensor

    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    metric.update(to_tensor(real), real=True)
    metric.update(to_tensor(fake), real=False)
    return float(metric.compute())


# --------------------------------------------------------------------------- suites
class DigitSuite:
    """tiny/smoke: digit prompts, classifier accuracy and FID in the classifier's feature space."""

    ratio_keys = ("fid", "accuracy")

    def __init__(self, data: Path, p: EvaluateParams, seed: int):
        from sd_distill.data.shards import read_split
        from sd_distill.data.sources import DIGIT_WORDS
        from sd_distill.models.classifier import DigitClassifier, FeatureExtractor

        self.p, self.words = p, DIGIT_WORDS
        self.classifier = DigitClassifier.load(data / "classifier")
        self.extractor = FeatureExtractor(self.classifier)
        self.test, self.val = read_split(data, "test"), read_split(data, "val")
        self.labels = np.repeat(np.arange(10), p.samples_per_prompt)
        self.prompts = [p.prompt_template.format(word=DIGIT_WORDS[d]) for d in self.labels]
        self.seeds = [seed * 1_000_003 + i for i in range(len(self.prompts))]
        self.latency_prompt = p.prompt_template.format(word=DIGIT_WORDS[7])
        cols = min(p.grid_columns, len(self.prompts))
        self.grid_index = [(c % 10) * p.samples_per_prompt + c // 10 for c in range(cols)]
        self.data = data

    def fid(self, real: np.ndarray, fake: np.ndarray) -> float:
        return feature_fid(self.extractor, real, fake)

    def score(self, images: np.ndarray) -> dict:
        from sd_distill.models.classifier import predict, to_tensor

        correct = predict(self.classifier, to_tensor(images)).numpy() == self.labels
        return {"accuracy": float(correct.mean()),
                "accuracy_per_digit": {self.words[d]: float(correct[self.labels == d].mean()) for d in range(10)},
                "fid": self.fid(self.test.images, images)}

    def context(self) -> dict:
        config = json.loads((self.data / "classifier" / "config.json").read_text())
        return {"fid_features": "digit-classifier features (penultimate layer)",
                "classifier": {"test_accuracy": config["test_accuracy"]},
                "reference": {"fid_val_vs_test": self.fid(self.test.images, self.val.images),
                              "val_images": len(self.val), "test_images": len(self.test)}}


class TextImageSuite:
    """sd15: COCO / PartiPrompts / HPSv2 prompts; FID and IS (COCO), CLIP score (all sets), HPSv2 (if given)."""

    ratio_keys = ("fid", "clip_score", "inception_score", "hpsv2")

    def __init__(self, p: EvaluateParams, seed: int, resolution: int, device: str):
        if not p.prompt_sets:
            raise UserError("evaluate.prompt_sets is empty; the sd15 evaluation needs at least one of "
                            f"{list(PROMPT_SETS)}")
        self.p, self.device, self.resolution = p, device, resolution
        self.sets: dict[str, list[str]] = {}
        self.reference: np.ndarray | None = None
        for name in p.prompt_sets:
            if name == "coco":
                pairs = coco_captions(p.coco_captions, p.images_per_set)
                folder = _need(p.coco_images, "coco_images", "the MS-COCO val2017 images folder")
                missing = [f for _, f in pairs if not (folder / f).is_file()]
                if missing:
                    raise UserError(f"evaluate.coco_images: {len(missing)} caption image(s) missing in {folder}, "
                                    f"e.g. {missing[0]}")
                self.sets["coco"] = [c for c, _ in pairs]
                self.reference = np.stack([load_image(folder / f, resolution) for _, f in pairs])
            elif name == "parti":
                self.sets["parti"] = parti_prompts(p.parti_prompts, p.images_per_set)
            else:
                self.sets["hpsv2"] = hpsv2_prompts(p.hpsv2_prompts, p.images_per_set)
        self.prompts = [s for prompts in self.sets.values() for s in prompts]
        self.seeds = [seed * 1_000_003 + i for i in range(len(self.prompts))]
        self.latency_prompt = self.prompts[0]
        self.grid_index = list(range(min(p.grid_columns, len(self.prompts))))
        self.inception = load_inception(p.inception, device) if "coco" in self.sets else None
        self.clip = self._clip(p.clip_model)
        self.hps = self._hps(p.hpsv2_weights) if p.hpsv2_weights else None
        self._fid_metric: FrechetInceptionDistance | None = None

    def _clip(self, name: str):
        from transformers import CLIPModel, CLIPProcessor

        try:  # a hub id (downloaded once into the cache; HF_HUB_OFFLINE=1 forbids it) or a folder; never unpickled
            model = CLIPModel.from_pretrained(  # nosec B615: the operator's model id (evaluate.clip_model); safetensors only
                name, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(name)  # nosec B615: tokenizer and image config, no weights
        except OSError as exc:
            raise UserError(f"evaluate.clip_model: cannot load {name!r} as a CLIP model with safetensors weights and "
                            f"its processor (a hub id or a folder): {exc}") from None
        return model.to(self.device).eval(), processor

    def _hps(self, weights: str):
        _need(weights, "hpsv2_weights", "the HPSv2 checkpoint (HPS_v2_compressed.pt)")
        try:
            import hpsv2  # noqa: F401
        except ImportError:
            raise UserError("evaluate.hpsv2_weights is set but the `hpsv2` package is not installed "
                            "(pip install hpsv2); unset it to skip HPSv2") from None
        from hpsv2.img_score import score as hps_score  # HPSv2's own scorer: score(images, prompt, cp=checkpoint)

        return lambda images, prompts: float(np.mean([
            hps_score([Image.fromarray(im)], pr, cp=weights)[0] for im, pr in zip(images, prompts)]))

    def _fid(self) -> FrechetInceptionDistance:
        """The FID metric with the reference images' features computed once and kept across models."""
        if self._fid_metric is None:
            self._fid_metric = FrechetInceptionDistance(feature=self.inception, reset_real_features=False)
            self._fid_metric = self._fid_metric.to(self.device)
            for i in range(0, len(self.reference), self.p.batch_size):
                self._fid_metric.update(_nchw(self.reference[i:i + self.p.batch_size]).to(self.device), real=True)
        self._fid_metric.reset()  # drops the previous model's features, keeps the reference's
        return self._fid_metric

    @torch.no_grad()
    def _clip_score(self, images: np.ndarray, prompts: list[str]) -> float:
        """CLIP score (Hessel et al. 2021, as torchmetrics defines it): 100 * max(cos(image, text), 0), averaged.
        Prompts longer than the text encoder's context are truncated."""
        model, processor = self.clip
        context = model.config.text_config.max_position_embeddings
        scores = []
        for i in range(0, len(images), self.p.batch_size):
            batch = processor(text=prompts[i:i + self.p.batch_size],
                              images=[Image.fromarray(im) for im in images[i:i + self.p.batch_size]],
                              return_tensors="pt", padding=True, truncation=True, max_length=context)
            out = model(**{k: v.to(self.device) for k, v in batch.items()})
            img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
            txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
            scores.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
        return float(torch.cat(scores).mean())

    @torch.no_grad()
    def score(self, images: np.ndarray) -> dict:
        out: dict = {"sets": {}}
        start = 0
        for name, prompts in self.sets.items():
            part = images[start:start + len(prompts)]
            start += len(prompts)
            row = {"images": len(part), "clip_score": self._clip_score(part, prompts)}
            if name == "coco":
                fid = self._fid()
                probs = []
                for i in range(0, len(part), self.p.batch_size):
                    fake = _nchw(part[i:i + self.p.batch_size]).to(self.device)
                    fid.update(fake, real=False)
                    probs.append(self.inception.probabilities(fake).cpu())
                row["fid"] = float(fid.compute())
                row["inception_score"] = inception_score(torch.cat(probs))
            if self.hps is not None:
                row["hpsv2"] = self.hps(part, prompts)
            out["sets"][name] = row
        sets = out["sets"]
        # headline figures: FID and IS on COCO (the only set with reference images), CLIP and HPSv2 averaged
        out["fid"] = sets.get("coco", {}).get("fid")
        out["inception_score"] = sets.get("coco", {}).get("inception_score")
        out["clip_score"] = float(np.mean([s["clip_score"] for s in sets.values()]))
        if self.hps is not None:
            out["hpsv2"] = float(np.mean([s["hpsv2"] for s in sets.values()]))
        return out

    def context(self) -> dict:
        return {"fid_features": f"Inception pool3 ({self.p.inception}), MS-COCO val2017 images as reference",
                "clip_model": self.p.clip_model, "hpsv2_weights": self.p.hpsv2_weights,
                "prompt_sets": {k: len(v) for k, v in self.sets.items()}}
