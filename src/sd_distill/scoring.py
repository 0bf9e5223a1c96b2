"""What ``evaluate`` measures on one model's samples, as a suite per profile, scored batch by batch.

A suite fixes the prompts and seeds (the same for every model). ``suite.start()`` gives a scorer for one model:
``add(start, images)`` takes the images of prompts ``start, start + 1, ...`` as the sampler makes them and keeps
running sums only: FID's feature count, sum and sum of outer products (float64, in torchmetrics'
``FrechetInceptionDistance``), right answers per digit, CLIP and HPSv2 score sums, the Inception Score's class
probabilities (float32 on the CPU, 4 KB an image: IS needs them all) and the grid's few tiles. ``result()`` gives
the figures. So 30,000 images per set need no more memory than 1,000. The real side of FID is the ``reference``
stage's statistics (``stages.reference``), made once; a suite asks them for the feature extractor, images and
resolution it uses and gets a clear error if they were made for others.

- ``DigitSuite`` (tiny, smoke): ``samples_per_prompt`` images per digit prompt; classifier accuracy (prompt
  adherence), FID in the digit classifier's feature space against the real test split, and diversity: per digit
  prompt, the RMS distance between two of its samples in the same feature space (``Spread``), averaged over the
  digits and read against the same figure for the real test images of each digit (``diversity_vs_real``).
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
INCEPTION_FILE = "the TorchScript FID Inception inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid)"
DIGIT_FEATURES = "digit-classifier features (penultimate layer)"


# --------------------------------------------------------------------------- prompt sets (sd15)
def need_path(path: str | None, key: str, what: str) -> Path:
    """``path`` as a ``Path`` that exists, or a ``UserError`` naming params key ``key`` (``evaluate.inception``)."""
    if not path:
        raise UserError(f"{key} is not set; it must point at {what}")
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key}: {p} does not exist; expected {what}")
    return p


def coco_captions(path: str | None, n: int, key: str = "evaluate.coco_captions") -> list[tuple[str, str]]:
    """(caption, image file name) for the first ``n`` images by id, the first caption of each (COCO 2017 val)."""
    p = need_path(path, key, "MS-COCO's annotations/captions_val2017.json")
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
    p = need_path(path, "evaluate.parti_prompts", "PartiPrompts.tsv (tab-separated, a 'Prompt' column)")
    with open(p, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if "Prompt" not in (reader.fieldnames or []):
            raise UserError(f"{p}: no 'Prompt' column (found {reader.fieldnames})")
        return [row["Prompt"].strip() for row in reader if row["Prompt"].strip()][:n]


def hpsv2_prompts(path: str | None, n: int) -> list[str]:
    """HPSv2 benchmark prompts: a folder of ``<style>.json`` lists (anime, concept-art, paintings, photo) or one
    list; ``n`` in all, the same share from each style, styles in name order."""
    p = need_path(path, "evaluate.hpsv2_prompts",
                  "the HPSv2 benchmark prompts (a folder of <style>.json lists, or one list)")
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
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            return np.asarray(im)
    except OSError as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise UserError(f"{path}: not a readable image ({exc})") from None


# --------------------------------------------------------------------------- Inception (FID, IS)
class InceptionFeatures(torch.nn.Module):
    """The TorchScript FID Inception (``inception-2015-12-05.pt``): uint8 NCHW in, ``num_features`` (2048) pool
    features out."""

    def __init__(self, net: torch.nn.Module, num_features: int):
        super().__init__()
        self.net, self.num_features = net, num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, return_features=True)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, no_output_bias=True)  # softmax over the 1008 classes (StyleGAN2-ADA's IS setting)


@torch.no_grad()
def load_inception(path: str | None, device: str, key: str = "evaluate.inception") -> InceptionFeatures:
    p = need_path(path, key, INCEPTION_FILE)
    try:
        net = torch.jit.load(str(p), map_location=device).eval()
    except RuntimeError as exc:
        raise UserError(f"{key}: {p} is not a TorchScript file: {exc}") from None
    # one call on the model's device tells the feature width (torchmetrics would probe on the CPU)
    width = net(torch.zeros(1, 3, 299, 299, dtype=torch.uint8, device=device), return_features=True).shape[-1]
    return InceptionFeatures(net, int(width))


def inception_score(probs: torch.Tensor, splits: int = 10) -> float:
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))), averaged over ``splits`` chunks."""
    probs = probs.double()
    scores = []
    for chunk in probs.chunk(min(splits, len(probs))):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (torch.log(chunk + 1e-12) - torch.log(marginal + 1e-12))).sum(1).mean()
        scores.append(torch.exp(kl).item())
    return float(np.mean(scores))


def nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8, what the FID Inception takes."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- FID from running sums
def fid_metric(extractor: torch.nn.Module, real: dict[str, np.ndarray] | None = None,
               device: str = "cpu") -> FrechetInceptionDistance:
    """torchmetrics' FID (Heusel et al. 2017) on ``extractor``'s features (it has ``num_features``), which keeps
    per side the count, the feature sum and the sum of outer products (float64) and nothing per image. With
    ``real`` (``real_sums``' arrays, e.g. from ``data/reference/stats.npz``) the real side starts from those."""
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False).to(device)
    if real is not None:
        if real["sum"].shape != (extractor.num_features,):
            raise ValueError(f"real-image sums of {real['sum'].shape[0]} features, the extractor gives "
                             f"{extractor.num_features}")
        metric.real_features_num_samples = torch.tensor(int(real["count"]), device=device)
        metric.real_features_sum = torch.from_numpy(real["sum"]).to(device, torch.float64)
        metric.real_features_cov_sum = torch.from_numpy(real["outer"]).to(device, torch.float64)
    return metric


def real_sums(metric: FrechetInceptionDistance) -> dict[str, np.ndarray]:
    """The real side of ``metric``: ``count`` (a scalar), ``sum`` (D,) and ``outer`` (D, D), float64 on the CPU."""
    return {"count": np.array(int(metric.real_features_num_samples)),
            "sum": metric.real_features_sum.cpu().numpy(), "outer": metric.real_features_cov_sum.cpu().numpy()}


@torch.no_grad()
def feature_fid(extractor: torch.nn.Module, real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between ``extractor`` features of two whole (N, H, W, 3) uint8 sets at once (what the
    streamed scorers must reproduce)."""
    from sd_distill.models.classifier import to_tensor

    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    metric.update(to_tensor(real), real=True)
    metric.update(to_tensor(fake), real=False)
    return float(metric.compute())


class Spread:
    """Per group (a digit), how far apart its members are in feature space: the root-mean-square distance
    between two different members, sqrt(mean_{i != j} |f_i - f_j|^2), from running sums only. For n features
    of one group, sum_{i != j} |f_i - f_j|^2 = 2 n sum_i |f_i|^2 - 2 |sum_i f_i|^2, so a group keeps its count,
    its feature sum (D,) and its sum of squared norms (float64): memory does not grow with the images.

    This is the diversity figure next to FID: a generator that collapses onto a few modes per prompt scores low
    here even when its samples are sharp (DMD-style training can trade one for the other)."""

    def __init__(self, groups: int, dim: int):
        self.count = np.zeros(groups, np.int64)
        self.sum = np.zeros((groups, dim), np.float64)
        self.squares = np.zeros(groups, np.float64)

    def add(self, features: torch.Tensor, groups: np.ndarray) -> None:
        """``features`` (n, D) of members of ``groups`` (n,) ints in [0, groups)."""
        f = features.detach().double().cpu().numpy()
        np.add.at(self.count, groups, 1)
        np.add.at(self.sum, groups, f)
        np.add.at(self.squares, groups, (f * f).sum(1))

    def result(self) -> np.ndarray:
        """(groups,) RMS pairwise distance; a ``ValueError`` naming the groups with fewer than two members."""
        short = np.flatnonzero(self.count < 2)
        if len(short):
            raise ValueError(f"diversity needs at least 2 images per group; groups {short.tolist()} have "
                             f"{self.count[short].tolist()}")
        n = self.count.astype(np.float64)
        mean_square = 2 * (n * self.squares - (self.sum ** 2).sum(1)) / (n * (n - 1))
        return np.sqrt(np.maximum(mean_square, 0.0))  # cancellation can leave -1e-16 for identical members


def pairwise_rms(features: torch.Tensor) -> float:
    """sqrt(mean_{i != j} |f_i - f_j|^2) of one (n, D) set, all pairs at once (what ``Spread`` must reproduce)."""
    f = features.double()
    d2 = torch.cdist(f, f).pow(2)
    n = len(f)
    return float((d2.sum() / (n * (n - 1))).sqrt())


class Tiles:
    """The images at prompt positions ``index`` (the grid's), copied out of the batches that pass by."""

    def __init__(self, index: list[int]):
        self.index, self.kept = list(index), {}

    def add(self, start: int, images: np.ndarray) -> None:
        for i in self.index:
            if start <= i < start + len(images):
                self.kept[i] = images[i - start].copy()  # a copy: a view would keep the whole batch alive

    def images(self) -> np.ndarray:
        """(len(index), H, W, 3) uint8, in ``index`` order."""
        return np.stack([self.kept[i] for i in self.index])


def _check_complete(seen: int, expected: int) -> None:
    if seen != expected:
        raise RuntimeError(f"scored {seen} images, the suite has {expected} prompts")


# --------------------------------------------------------------------------- suites
class DigitSuite:
    """tiny/smoke: digit prompts, classifier accuracy and FID in the classifier's feature space.

    ``reference`` is a ``stages.reference.Reference``: the real test split's feature sums, checked against this
    classifier and these prepared data."""

    ratio_keys = ("fid", "accuracy", "diversity")

    def __init__(self, data: Path, reference, p: EvaluateParams, seed: int):
        from sd_distill.data.sources import DIGIT_WORDS
        from sd_distill.models.classifier import DigitClassifier, FeatureExtractor

        self.p, self.words = p, DIGIT_WORDS
        self.classifier = DigitClassifier.load(data / "classifier")
        self.extractor = FeatureExtractor(self.classifier)
        self.real, self.reference = reference.digits(data)
        self.labels = np.repeat(np.arange(10), p.samples_per_prompt)
        self.prompts = [p.prompt_template.format(word=DIGIT_WORDS[d]) for d in self.labels]
        self.seeds = [seed * 1_000_003 + i for i in range(len(self.prompts))]
        self.latency_prompt = p.prompt_template.format(word=DIGIT_WORDS[7])
        cols = min(p.grid_columns, len(self.prompts))
        self.grid_index = [(c % 10) * p.samples_per_prompt + c // 10 for c in range(cols)]
        self.data = data

    def start(self) -> "DigitScorer":
        return DigitScorer(self)

    def context(self) -> dict:
        config = json.loads((self.data / "classifier" / "config.json").read_text())
        return {"fid_features": DIGIT_FEATURES,
                "classifier": {"test_accuracy": config["test_accuracy"]},
                "reference": {"fid_val_vs_test": self.reference["fid_val_vs_test"],
                              "val_images": self.reference["val_images"], "test_images": self.reference["count"],
                              "diversity": self.reference["diversity"]}}


class DigitScorer:
    """One model's images against a ``DigitSuite``: right answers and images per digit, FID's fake-side sums."""

    def __init__(self, suite: DigitSuite):
        self.suite = suite
        self.fid = fid_metric(suite.extractor, suite.real)
        self.right, self.seen = np.zeros(10, np.int64), np.zeros(10, np.int64)
        self.spread = Spread(10, suite.extractor.num_features)
        self.tiles = Tiles(suite.grid_index)

    @torch.no_grad()
    def add(self, start: int, images: np.ndarray) -> None:
        """``images`` (n, H, W, 3) uint8 are those of prompts ``start ... start + n - 1``."""
        from sd_distill.models.classifier import predict, to_tensor

        labels = self.suite.labels[start:start + len(images)]
        x = to_tensor(images)
        np.add.at(self.right, labels, (predict(self.suite.classifier, x).numpy() == labels).astype(np.int64))
        np.add.at(self.seen, labels, 1)
        self.fid.update(x, real=False)
        self.spread.add(self.suite.extractor(x), labels)
        self.tiles.add(start, images)

    def result(self) -> dict:
        _check_complete(int(self.seen.sum()), len(self.suite.prompts))
        spread = self.spread.result()
        diversity = float(spread.mean())
        return {"accuracy": float(self.right.sum() / self.seen.sum()),
                "accuracy_per_digit": {self.suite.words[d]: float(self.right[d] / self.seen[d]) for d in range(10)},
                "fid": float(self.fid.compute()),
                "diversity": diversity,
                "diversity_per_digit": {self.suite.words[d]: float(spread[d]) for d in range(10)},
                "diversity_vs_real": diversity / self.suite.reference["diversity"]}

    def grid(self) -> np.ndarray:
        return self.tiles.images()


class TextImageSuite:
    """sd15: COCO / PartiPrompts / HPSv2 prompts; FID and IS (COCO), CLIP score (all sets), HPSv2 (if given).

    ``reference`` is a ``stages.reference.Reference``: the COCO images' Inception sums, checked against these
    images, this Inception file and ``resolution`` (the teacher's output side)."""

    ratio_keys = ("fid", "clip_score", "inception_score", "hpsv2")

    def __init__(self, p: EvaluateParams, seed: int, resolution: int, device: str, reference):
        if not p.prompt_sets:
            raise UserError("evaluate.prompt_sets is empty; the sd15 evaluation needs at least one of "
                            f"{list(PROMPT_SETS)}")
        self.p, self.device, self.resolution = p, device, resolution
        self.sets: dict[str, list[str]] = {}
        self.real: dict[str, np.ndarray] | None = None
        for name in p.prompt_sets:
            if name == "coco":
                pairs = coco_captions(p.coco_captions, p.images_per_set)
                inception = need_path(p.inception, "evaluate.inception", INCEPTION_FILE)
                self.real, _ = reference.coco([f for _, f in pairs], inception, resolution)
                self.sets["coco"] = [c for c, _ in pairs]
            elif name == "parti":
                self.sets["parti"] = parti_prompts(p.parti_prompts, p.images_per_set)
            else:
                self.sets["hpsv2"] = hpsv2_prompts(p.hpsv2_prompts, p.images_per_set)
        self.prompts = [s for prompts in self.sets.values() for s in prompts]
        starts = np.cumsum([0] + [len(v) for v in self.sets.values()])
        self.ranges = {name: (int(a), int(b)) for name, a, b in zip(self.sets, starts[:-1], starts[1:])}
        self.seeds = [seed * 1_000_003 + i for i in range(len(self.prompts))]
        self.latency_prompt = self.prompts[0]
        self.grid_index = list(range(min(p.grid_columns, len(self.prompts))))
        self.inception = load_inception(p.inception, device) if "coco" in self.sets else None
        self.clip = self._clip(p.clip_model)
        self.hps = self._hps(p.hpsv2_weights) if p.hpsv2_weights else None

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
        need_path(weights, "evaluate.hpsv2_weights", "the HPSv2 checkpoint (HPS_v2_compressed.pt)")
        try:
            import hpsv2  # noqa: F401
        except ImportError:
            raise UserError("evaluate.hpsv2_weights is set but the `hpsv2` package is not installed "
                            "(pip install hpsv2); unset it to skip HPSv2") from None
        from hpsv2.img_score import score as hps_score  # HPSv2's own scorer: score(images, prompt, cp=checkpoint)

        return lambda images, prompts: [float(hps_score([Image.fromarray(im)], pr, cp=weights)[0])
                                        for im, pr in zip(images, prompts)]

    @torch.no_grad()
    def clip_scores(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """Per image, CLIP score (Hessel et al. 2021, as torchmetrics defines it): 100 * max(cos(image, text), 0).
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
            scores.append((100 * (img * txt).sum(-1)).clamp(min=0).double().cpu())
        return torch.cat(scores)

    def start(self) -> "TextImageScorer":
        return TextImageScorer(self)

    def context(self) -> dict:
        return {"fid_features": f"Inception pool3 ({self.p.inception}), MS-COCO val2017 images as reference",
                "clip_model": self.p.clip_model, "hpsv2_weights": self.p.hpsv2_weights,
                "prompt_sets": {k: len(v) for k, v in self.sets.items()}}


class TextImageScorer:
    """One model's images against a ``TextImageSuite``: per set the image count and CLIP / HPSv2 score sums; for
    COCO FID's fake-side sums and the Inception class probabilities (float32, CPU)."""

    def __init__(self, suite: TextImageSuite):
        self.suite = suite
        self.sums = {name: {"images": 0, "clip_score": 0.0, "hpsv2": 0.0} for name in suite.sets}
        self.fid = fid_metric(suite.inception, suite.real, suite.device) if suite.real is not None else None
        self.probs: list[torch.Tensor] = []
        self.tiles = Tiles(suite.grid_index)

    @torch.no_grad()
    def add(self, start: int, images: np.ndarray) -> None:
        """``images`` (n, H, W, 3) uint8 are those of prompts ``start ... start + n - 1`` (a batch may span sets)."""
        s = self.suite
        for name, (lo, hi) in s.ranges.items():
            a, b = max(lo, start), min(hi, start + len(images))
            if a >= b:
                continue
            part, prompts, sums = images[a - start:b - start], s.prompts[a:b], self.sums[name]
            sums["images"] += len(part)
            sums["clip_score"] += float(s.clip_scores(part, prompts).sum())
            if name == "coco":
                fake = nchw(part).to(s.device)
                self.fid.update(fake, real=False)
                self.probs.append(s.inception.probabilities(fake).float().cpu())
            if s.hps is not None:
                sums["hpsv2"] += sum(s.hps(part, prompts))
        self.tiles.add(start, images)

    def result(self) -> dict:
        _check_complete(sum(v["images"] for v in self.sums.values()), len(self.suite.prompts))
        out: dict = {"sets": {}}
        for name, sums in self.sums.items():
            n = sums["images"]
            row = {"images": n, "clip_score": sums["clip_score"] / n}
            if name == "coco":
                row["fid"] = float(self.fid.compute())
                row["inception_score"] = inception_score(torch.cat(self.probs))
            if self.suite.hps is not None:
                row["hpsv2"] = sums["hpsv2"] / n
            out["sets"][name] = row
        sets = out["sets"]
        # headline figures: FID and IS on COCO (the only set with reference images), CLIP and HPSv2 averaged
        out["fid"] = sets.get("coco", {}).get("fid")
        out["inception_score"] = sets.get("coco", {}).get("inception_score")
        out["clip_score"] = float(np.mean([s["clip_score"] for s in sets.values()]))
        if self.suite.hps is not None:
            out["hpsv2"] = float(np.mean([s["hpsv2"] for s in sets.values()]))
        return out

    def grid(self) -> np.ndarray:
        return self.tiles.images()
