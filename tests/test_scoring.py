"""The sd15 evaluation suite: prompt-set readers, Inception Score, and a whole sd15-profile evaluate run with tiny
randomly initialised stand-ins for the FID Inception (TorchScript) and CLIP, built from configs (no download)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from sd_distill.errors import UserError
from sd_distill.models.tokenizer import build_tokenizer
from sd_distill.params import resolve
from sd_distill.runner import run_stage
from sd_distill.scoring import coco_captions, hpsv2_prompts, inception_score, parti_prompts
from tests.conftest import write_params


class StandInInception(torch.nn.Module):
    """The call signature of StyleGAN2-ADA's TorchScript Inception, at toy size: uint8 NCHW in, features or
    class probabilities out."""

    def __init__(self, features: int = 16, classes: int = 12):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, features, 3, stride=2)
        self.head = torch.nn.Linear(features, classes)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear")
        feats = torch.relu(self.conv(x)).mean(dim=(2, 3))
        if return_features:
            return feats
        return torch.softmax(self.head(feats), dim=1)


def coco_fixture(root, n=6):
    (root / "val2017").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(n):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / "val2017" / name)
        images.append({"id": 100 + i, "file_name": name})
        annotations += [{"id": 2 * i + 1, "image_id": 100 + i, "caption": f" first caption {i} "},
                        {"id": 2 * i + 2, "image_id": 100 + i, "caption": f"second caption {i}"}]
    (root / "captions.json").write_text(json.dumps({"images": images[::-1], "annotations": annotations[::-1]}))
    return root / "captions.json", root / "val2017"


def test_coco_takes_the_first_caption_of_each_image_in_id_order(tmp_path):
    captions, _ = coco_fixture(tmp_path)
    pairs = coco_captions(str(captions), 4)
    assert pairs == [(f"first caption {i}", f"{i:012d}.jpg") for i in range(4)]
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(UserError, match="bad.json: not a COCO captions file"):
        coco_captions(str(tmp_path / "bad.json"), 4)
    with pytest.raises(UserError, match="evaluate.coco_captions is not set"):
        coco_captions(None, 4)


def test_parti_and_hpsv2_prompts(tmp_path):
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\na red cube\tObjects\n\t\na blue bird\tAnimals\n")
    assert parti_prompts(str(tmp_path / "parti.tsv"), 5) == ["a red cube", "a blue bird"]
    (tmp_path / "nope.tsv").write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(UserError, match="no 'Prompt' column"):
        parti_prompts(str(tmp_path / "nope.tsv"), 5)
    styles = tmp_path / "hps"
    styles.mkdir()
    for style in ("photo", "anime"):
        (styles / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(5)]))
    assert hpsv2_prompts(str(styles), 4) == ["anime 0", "anime 1", "photo 0", "photo 1"]  # same share per style
    (styles / "paintings.json").write_text('{"not": "a list"}')
    with pytest.raises(UserError, match="paintings.json: expected a JSON list"):
        hpsv2_prompts(str(styles), 4)
    with pytest.raises(UserError, match="evaluate.hpsv2_prompts: .*missing does not exist"):
        hpsv2_prompts(str(tmp_path / "missing"), 4)


def test_inception_score_is_one_for_uniform_and_k_for_k_distinct_confident_classes():
    assert inception_score(torch.full((8, 5), 0.2), splits=1) == pytest.approx(1.0)
    assert inception_score(torch.eye(4), splits=1) == pytest.approx(4.0, rel=1e-6)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(StandInInception()), str(root / "inception.pt"))
    tokenizer = build_tokenizer(["a red cube", "first caption", "second caption", "photo anime"], max_length=16)
    config = CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    CLIPModel(config).save_pretrained(root / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(root / "clip")
    return root


def test_sd15_profile_evaluation_with_stand_ins(smoke_project, stand_ins, tmp_path):
    shutil.copytree(smoke_project / "models", tmp_path / "models")
    shutil.copytree(smoke_project / "data", tmp_path / "data")
    captions, images = coco_fixture(tmp_path / "coco")
    (tmp_path / "parti.tsv").write_text("Prompt\na red cube\na blue bird\n")
    params = resolve(write_params(  # evaluate reads the image size from the teacher, not from prepare's params
        tmp_path, profile="sd15",
        base={"device": "cpu", "mixed_precision": "no"},
        evaluate={"steps": 4, "baseline_steps": [2, 1], "batch_size": 4, "prompt_sets": ["coco", "parti"],
                  "images_per_set": 4, "latency_repeats": 1, "grid_columns": 3,
                  "coco_captions": str(captions), "coco_images": str(images), "parti_prompts": str(tmp_path / "parti.tsv"),
                  "inception": str(stand_ins / "inception.pt"), "clip_model": str(stand_ins / "clip")}))
    run_stage("evaluate", params, tmp_path)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert "inception.pt" in metrics["fid_features"] and metrics["prompt_sets"] == {"coco": 4, "parti": 2}
    teacher, student = metrics["models"]["teacher@4"], metrics["models"]["student@1"]
    for row in (teacher, student):
        assert row["samples"] == 6 and set(row["sets"]) == {"coco", "parti"}
        assert np.isfinite(row["fid"]) and row["fid"] >= 0 and row["fid"] == row["sets"]["coco"]["fid"]
        assert 1.0 <= row["inception_score"] <= 12  # between one class and the stand-in's 12
        assert row["clip_score"] == pytest.approx(np.mean([s["clip_score"] for s in row["sets"].values()]))
        assert "accuracy" not in row
    assert teacher["fid_ratio"] == pytest.approx(1.0) and teacher["clip_score_ratio"] == pytest.approx(1.0)
    assert student["clip_score_ratio"] == pytest.approx(student["clip_score"] / teacher["clip_score"])
    header = (tmp_path / "reports" / "quality_vs_steps.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["steps", "student_fid", "student_clip_score", "student_inception_score"]
    header = next(line for line in (tmp_path / "reports" / "report.md").read_text().splitlines()
                  if line.startswith("| model |"))
    assert "| CLIP |" in header and "| IS |" in header and "accuracy" not in header


def test_sd15_evaluation_names_a_missing_inception_file(smoke_project, tmp_path):
    shutil.copytree(smoke_project / "models", tmp_path / "models")
    shutil.copytree(smoke_project / "data", tmp_path / "data")
    captions, images = coco_fixture(tmp_path / "coco")
    params = resolve(write_params(
        tmp_path, profile="sd15", base={"device": "cpu", "mixed_precision": "no"},
        evaluate={"prompt_sets": ["coco"], "images_per_set": 2, "coco_captions": str(captions),
                  "coco_images": str(images), "inception": str(tmp_path / "nowhere.pt")}))
    with pytest.raises(UserError, match="evaluate.inception: .*nowhere.pt does not exist"):
        run_stage("evaluate", params, tmp_path)
    assert not (tmp_path / "reports" / "metrics.json").exists()
