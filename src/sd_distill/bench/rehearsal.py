"""The sd15 profile rehearsed on a CPU in minutes: every stage through ``dvc repro``, on SD v1.5's structure.

``build(project)`` writes a DVC project whose ``params.yaml`` is the sd15 preset with only sizes turned down:

- the teacher is a local ``StableDiffusionPipeline`` folder with SD v1.5's structure at reduced width
  (``bench.data.sd_shaped_teacher``: four UNet stages of two layers, 768-wide cross-attention, a 77-token CLIP text
  encoder, an 8x VAE with 4 latent channels), random weights, at 64 px;
- the training data is a folder of JPEGs with a ``metadata.jsonl`` of unique captions (``bench.data.synthetic_pairs``),
  read by the streaming ``prepare`` as a real sd15 run reads it, and encoded with ``encode.embeddings: computed``;
- every training stage keeps the preset's recipe (optimizer, schedule, loss weights, gradient checkpointing,
  accumulation) and runs ``REHEARSAL_STEPS`` optimizer steps on micro-batches of ``REHEARSAL_BATCH``;
- the evaluation is the sd15 suite (COCO FID and IS, CLIP score on COCO, PartiPrompts and HPSv2 prompts) with
  randomly initialised stand-ins for the FID Inception (TorchScript, the same call signature) and CLIP (a
  ``CLIPModel`` folder built from a config), and small COCO-, Parti- and HPSv2-shaped prompt files.

What is turned down is listed in ``overrides()``: nothing else differs from ``--profile sd15``. The numbers it
produces mean nothing (random weights); what it shows is that the sd15 code paths run end to end.
``python -m sd_distill.bench.rehearsal --out DIR`` builds the project and runs it (``--build-only`` to look first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess  # nosec B404: runs git and sd-distill from this environment, argument lists, no shell
import sys
from pathlib import Path

from sd_distill.bench.data import WORDS, sd_shaped_teacher, synthetic_pairs

SIDE = 64  # pixels: 8x8 latents
SAMPLES = 48  # training pairs (about 38 after the 10% / 10% val and test splits)
EVAL_PROMPTS = 4  # per prompt set
REHEARSAL_STEPS = 2  # optimizer steps per training stage
REHEARSAL_BATCH = 4  # samples per micro-batch (prune: task_share 0.25 of it is one w = 0 sample)


def _small(train: dict | None = None) -> dict:
    """A training section cut to ``REHEARSAL_STEPS`` steps of ``REHEARSAL_BATCH`` samples, the rest of the recipe
    (optimizer, schedule, accumulation, checkpointing) left as the preset has it."""
    return {**(train or {}), "steps": REHEARSAL_STEPS, "batch_size": REHEARSAL_BATCH, "warmup_steps": 0,
            "checkpoint_every": 1, "log_every": 1}


def overrides(project: Path) -> dict:
    """The sections of ``params.yaml`` that differ from the sd15 preset: sizes and local files, nothing else."""
    from sd_distill.params import HALVING_STEPS, PROFILES

    sd15 = PROFILES["sd15"]
    eval_dir = project / "data" / "eval"
    sections = {
        # no GPU here: float32 on the CPU (the preset's bf16 autocast needs CUDA to be worth anything)
        "base": {"device": "cpu", "mixed_precision": "no"},
        "prepare": {"path": "data/raw", "resolution": SIDE, "min_size": SIDE, "shard_size": 16},
        "teacher": {"source": "teacher"},
        "encode": {"batch_size": 16},
        "halve": {"round_train_steps": {n: REHEARSAL_STEPS for n in HALVING_STEPS}},
        "dmd": {"fake_warmup": 1},  # one fake-only step, then one that updates the generator (ratio 10 kept)
        "decoder": {"eval_images": 4},
        "assemble": {"select_images": 4, "batch_size": 4, "inception": str(eval_dir / "inception.pt")},
        "evaluate": {"sampling_steps": 4, "baseline_sampling_steps": [2, 1], "batch_size": 4, "images_per_set": EVAL_PROMPTS,
                     "latency_warmup": 0, "latency_repeats": 1, "grid_columns": 4,
                     "coco_captions": str(eval_dir / "coco" / "captions_val2017.json"),
                     "parti_prompts": str(eval_dir / "PartiPrompts.tsv"), "hpsv2_prompts": str(eval_dir / "hpsv2"),
                     "inception": str(eval_dir / "inception.pt"), "clip_model": str(eval_dir / "clip")},
        "reference": {"images": EVAL_PROMPTS, "batch_size": 4,
                      "coco_captions": str(eval_dir / "coco" / "captions_val2017.json"),
                      "coco_images": str(eval_dir / "coco" / "val2017"), "inception": str(eval_dir / "inception.pt")},
    }
    for stage in ("vpred", "guidance", "prune", "halve", "dmd", "decoder"):
        preset_train = sd15.get(stage, {}).get("train", {})
        sections.setdefault(stage, {})["train"] = _small(preset_train)
    return sections


def _stand_in_inception_class():
    import torch

    class StandInInception(torch.nn.Module):
        """The call signature of StyleGAN2-ADA's TorchScript Inception at toy size: uint8 NCHW in; features
        (``return_features``) or class probabilities out."""

        def __init__(self, features: int = 16, classes: int = 12):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, features, 3, stride=2)
            self.head = torch.nn.Linear(features, classes)

        def forward(self, x: torch.Tensor, return_features: bool = False,
                    no_output_bias: bool = False) -> torch.Tensor:
            x = torch.nn.functional.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear")
            feats = torch.relu(self.conv(x)).mean(dim=(2, 3))
            if return_features:
                return feats
            return torch.softmax(self.head(feats), dim=1)

    return StandInInception


def stand_in_inception(path: Path, seed: int = 0) -> None:
    """A TorchScript file with the FID Inception's call signature (16 features, 12 classes), randomly initialised
    from ``seed``: what ``evaluate.inception`` and ``reference.inception`` load."""
    import torch

    torch.manual_seed(seed)
    torch.jit.save(torch.jit.script(_stand_in_inception_class()()), str(path))


def stand_in_clip(folder: Path, captions: list[str], max_length: int = 32) -> None:
    """A ``CLIPModel`` folder (safetensors) and its ``CLIPProcessor``, built from a tiny config with an offline
    tokenizer of ``captions``' words: what ``evaluate.clip_model`` loads."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sd_distill.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(captions, max_length=max_length)
    config = CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": max_length,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)


def eval_files(root: Path, n: int, side: int) -> list[str]:
    """COCO-, PartiPrompts- and HPSv2-shaped prompt files under ``root`` (``n`` prompts each; COCO with ``n`` JPEGs
    of ``side`` px); returns every prompt written."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    words = lambda: " ".join(rng.choice(WORDS, size=4))  # noqa: E731
    (root / "coco" / "val2017").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (side + 8, side, 3), dtype=np.uint8)).save(root / "coco" / "val2017" / name)
        images.append({"id": i + 1, "file_name": name})
        annotations.append({"id": i + 1, "image_id": i + 1, "caption": f"a {words()}"})
    (root / "coco" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    parti = [f"a {words()} in the style of a painting" for _ in range(n)]
    (root / "PartiPrompts.tsv").write_text("Prompt\tCategory\n" + "".join(f"{p}\tArts\n" for p in parti))
    (root / "hpsv2").mkdir(exist_ok=True)
    hps = {style: [f"{style} of a {words()}" for _ in range(n)] for style in ("anime", "photo")}
    for style, prompts in hps.items():
        (root / "hpsv2" / f"{style}.json").write_text(json.dumps(prompts))
    return [a["caption"] for a in annotations] + parti + [p for ps in hps.values() for p in ps]


def build(project: Path, samples: int = SAMPLES, side: int = SIDE) -> Path:
    """A DVC project in ``project`` (git and DVC initialised) ready for ``sd-distill repro``; returns it."""
    import yaml

    import sd_distill
    from sd_distill import dvcgen
    from sd_distill.params import SECTIONS

    project.mkdir(parents=True, exist_ok=True)
    synthetic_pairs(project / "data" / "raw", samples, side)
    sd_shaped_teacher(project / "teacher", side)
    eval_dir = project / "data" / "eval"
    prompts = eval_files(eval_dir, EVAL_PROMPTS, side)
    stand_in_inception(eval_dir / "inception.pt")
    stand_in_clip(eval_dir / "clip", prompts)
    # every section present (DVC reads each stage's section from params.yaml), the preset's unless overridden
    sections = {name: {} for name in SECTIONS} | overrides(project)
    (project / "params.yaml").write_text(yaml.safe_dump({"profile": "sd15", **sections}, sort_keys=False))
    (project / "dvc.yaml").write_text(dvcgen.render())
    # the stages' DVC code dependencies are paths under src/: the package as it is installed here
    package = Path(sd_distill.__file__).parent
    shutil.copytree(package, project / "src" / "sd_distill", ignore=shutil.ignore_patterns("__pycache__"))
    # the local inputs (raw pairs, teacher folder, evaluation files) stay out of git, as a user's would
    (project / ".gitignore").write_text("__pycache__/\n/checkpoints/\n/mlflow.db\n/mlruns/\n/mlartifacts/\n"
                                        ".*.partial*\n/teacher/\n/data/raw/\n/data/eval/\n")
    (project / ".dvcignore").write_text("__pycache__\n*.pyc\n")
    return project


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_distill.bench.rehearsal",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty folder for the project")
    parser.add_argument("--build-only", action="store_true", help="write the project, do not run it")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty")
    build(args.out)
    if args.build_only:
        print(f"rehearsal: project in {args.out}; run `sd-distill repro` there")
        return 0
    for command in (["git", "init", "-q"], [str(Path(sys.executable).with_name("dvc")), "init", "-q"]):
        subprocess.run(command, cwd=args.out, check=True)  # nosec B603: git and this environment's dvc, no shell
    cli = str(Path(sys.executable).with_name("sd-distill"))
    return subprocess.run([cli, "repro"], cwd=args.out, env=os.environ).returncode  # nosec B603: sd-distill here


if __name__ == "__main__":
    sys.exit(main())
