"""The student as an MLflow pyfunc model: a table of prompts in, one generated image per row out.

``StudentPipeline`` wraps any stock diffusers ``StableDiffusionPipeline`` folder (``models/student``);
``log_student`` logs one with an explicit signature, input example and pinned requirements, and ships the
``sd_distill`` package beside it (``code_paths``) so that it loads where sd-distill is not installed::

    model = mlflow.pyfunc.load_model("models:/sd-distill-student@champion")
    images = model.predict(pd.DataFrame({"prompt": ["a handwritten digit seven"], "seed": [3]}))  # (1, H, W, 3) uint8

Imports no torch at module level: the pipeline is loaded in ``load_context``.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from sd_distill.errors import MissingInput
from sd_distill.names import MODEL_CARD

DEFAULT_STEPS = 1
DEFAULT_GUIDANCE = 7.5
EXAMPLE_PROMPT = "a handwritten digit seven"
# Distributions the model needs at load and predict time (sd_distill.models.parts imports params: pydantic, yaml).
REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "numpy", "pandas", "pydantic", "pyyaml")

# column -> (MLflow type, Python type named in errors, required)
COLUMNS = {
    "prompt": ("string", "str", True),
    "num_inference_steps": ("long", "int", False),
    "guidance_scale": ("double", "float", False),
    "seed": ("long", "int", False),
}


def read_card(folder: Path | str) -> dict:
    """The folder's ``distill.json`` (empty for a pipeline folder that has none)."""
    path = Path(folder) / MODEL_CARD
    return json.loads(path.read_text()) if path.is_file() else {}


def check_input(frame) -> None:
    """Raise ``ValueError`` naming the column, what was expected and what was found."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError("model input: expected a pandas DataFrame with a 'prompt' column, "
                         f"found {type(frame).__name__}")
    columns = [str(c) for c in frame.columns]
    if "prompt" not in columns:
        raise ValueError(f"model input: missing required column 'prompt' (str); found columns {columns}")
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"model input: unknown column(s) {unknown}; allowed: {list(COLUMNS)}")
    for i, value in enumerate(frame["prompt"]):
        if not isinstance(value, str):
            raise ValueError(f"model input: column 'prompt' expects str in every row, found "
                             f"{type(value).__name__} {value!r} in row {i}")
    for name in ("num_inference_steps", "seed"):
        if name in frame and not pd.api.types.is_integer_dtype(frame[name]):
            raise ValueError(f"model input: column {name!r} expects int, found dtype {frame[name].dtype}")
    if "num_inference_steps" in frame and (frame["num_inference_steps"] < 1).any():
        raise ValueError(f"model input: column 'num_inference_steps' expects int >= 1, found "
                         f"{frame['num_inference_steps'].min()}")
    if "guidance_scale" in frame:
        column = frame["guidance_scale"]
        if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
            raise ValueError(f"model input: column 'guidance_scale' expects float, found dtype {column.dtype}")
        if column.isna().any():
            raise ValueError("model input: column 'guidance_scale' expects float, found NaN")


class StudentPipeline(mlflow.pyfunc.PythonModel):
    """Generates images with the pipeline folder logged as artifact ``pipeline``.

    Input: a DataFrame with ``prompt`` (str) and optional ``num_inference_steps`` (int; default the folder's
    ``distill.json`` value, else 1), ``guidance_scale`` (float, diffusers convention; default ``distill.json``,
    else 7.5) and ``seed`` (int, default 0). Output: (N, H, W, 3) uint8 RGB, one image per row; each row is
    sampled alone with ``torch.Generator().manual_seed(seed)``, so a row's image does not depend on the others.
    """

    def load_context(self, context) -> None:
        import torch

        from sd_distill.models.parts import load_pipeline

        folder = context.artifacts["pipeline"]
        self.pipe = load_pipeline(folder, device="cuda" if torch.cuda.is_available() else "cpu")
        card = read_card(folder)
        self.default_steps = int(card.get("num_inference_steps", DEFAULT_STEPS))
        self.default_guidance = float(card.get("guidance_scale", DEFAULT_GUIDANCE))
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.size = (side, side)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        import torch

        check_input(model_input)
        n = len(model_input)
        steps = model_input.get("num_inference_steps", pd.Series([self.default_steps] * n))
        guidance = model_input.get("guidance_scale", pd.Series([self.default_guidance] * n))
        seeds = model_input.get("seed", pd.Series([0] * n))
        images = []
        for prompt, s, g, seed in zip(model_input["prompt"], steps, guidance, seeds):
            out = self.pipe(prompt=prompt, num_inference_steps=int(s), guidance_scale=float(g),
                            generator=torch.Generator().manual_seed(int(seed)), output_type="np").images[0]
            images.append((out * 255).round().clip(0, 255).astype(np.uint8))
        if not images:
            return np.zeros((0, *self.size, 3), dtype=np.uint8)
        return np.stack(images)


def image_size(folder: Path | str) -> tuple[int, int]:
    """(H, W) the pipeline makes by default: UNet sample size times the VAE's spatial factor, as diffusers
    computes it (``2 ** (len(vae.block_out_channels) - 1)``; ``AutoencoderTiny`` records the same key)."""
    folder = Path(folder)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return side, side


def signature(height: int = -1, width: int = -1) -> ModelSignature:
    inputs = Schema([ColSpec(kind, name, required=required) for name, (kind, _, required) in COLUMNS.items()])
    outputs = Schema([TensorSpec(np.dtype("uint8"), (-1, height, width, 3))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """The current environment's versions, without local labels (``torch==2.4.1``, not ``2.4.1+cpu``, which
    only the PyTorch index serves; pip matches the plain pin against any local build)."""
    return [f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in REQUIREMENTS]


def input_example(card: dict) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [EXAMPLE_PROMPT],
                         "num_inference_steps": [int(card.get("num_inference_steps", DEFAULT_STEPS))],
                         "guidance_scale": [float(card.get("guidance_scale", DEFAULT_GUIDANCE))],
                         "seed": [0]})


def log_student(folder: Path | str, name: str = "student", **log_model_kwargs):
    """Log the pipeline folder as a pyfunc model (in the active run, if any); returns MLflow's ``ModelInfo``.

    MLflow loads the logged model and predicts the one-row input example while logging (a failure there is
    only a warning), so logging costs one pipeline load and one image.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise MissingInput(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=StudentPipeline(),
        artifacts={"pipeline": str(folder)},
        code_paths=[str(Path(__file__).resolve().parent)],  # the sd_distill package: not on PyPI
        signature=signature(*image_size(folder)),
        input_example=input_example(read_card(folder)),
        pip_requirements=pip_requirements(),
        **log_model_kwargs,
    )
