"""The tiny profile's digit classifier: judge of prompt adherence and feature extractor for FID.

It stands in for Inception (FID) and CLIP (prompt adherence) where those cannot run: images are 16x16
digits and nothing may be downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from sd_distill.errors import MissingInput
from sd_distill.params import ClassifierParams


class DigitClassifier(nn.Module):
    """Input (B, 3, H, W) floats in [0, 1] (resized to ``resolution``); ``features`` gives (B, num_features)."""

    def __init__(self, resolution: int = 16, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.resolution, self.width = resolution, width
        self.num_features = 2 * width
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, path: Path, test_accuracy: float) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(
            {"resolution": self.resolution, "width": self.width, "test_accuracy": test_accuracy}, indent=2))

    @classmethod
    def load(cls, path: Path) -> "DigitClassifier":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise MissingInput(f"{config_file}: no classifier; the tiny/smoke `prepare` stage writes it")
        config = json.loads(config_file.read_text())
        model = cls(resolution=config["resolution"], width=config["width"])
        model.load_state_dict(load_file(Path(path) / "model.safetensors"))
        return model.eval()


class FeatureExtractor(nn.Module):
    """``DigitClassifier.features`` shaped for ``torchmetrics`` FID (``num_features``, images in [0, 1])."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.classifier.features(x)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def train_classifier(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     p: ClassifierParams, seed: int) -> tuple[DigitClassifier, float]:
    """Train on (N, H, W, 3) uint8 images with 1-pixel random shifts; returns the model and its test accuracy."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = to_tensor(train_x), torch.from_numpy(train_y)
    model = DigitClassifier(resolution=train_x.shape[1], width=p.width)
    opt = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, weight_decay=1e-4)
    steps = p.epochs * ((len(x) + p.batch_size - 1) // p.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.learning_rate, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier", unit="step", disable=None)
    for _ in range(p.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), p.batch_size):
            idx = order[i:i + p.batch_size]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            batch = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    acc = (predict(model, to_tensor(test_x)) == torch.from_numpy(test_y)).float().mean().item()
    return model.eval(), acc
