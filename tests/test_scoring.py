"""The sd15 evaluation suite: prompt-set readers, Inception Score, the reference statistics' checks with tiny
randomly initialised stand-ins for the FID Inception (TorchScript) and CLIP, built from configs (no download); and
the streaming scorers' memory: what they keep, and what scoring a model allocates, for N and 4N images. A whole
sd15 reference + evaluate run is the rehearsal's (tests/test_e2e.py)."""

import json
import re
import shutil
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sd_distill.bench.rehearsal import stand_in_clip, stand_in_inception
from sd_distill.errors import UserError
from sd_distill.models.tokenizer import build_tokenizer
from sd_distill.params import EvaluateParams, ReferenceParams, resolve
from sd_distill.runner import run_stage
from sd_distill.scoring import (DigitSuite, Spread, TextImageSuite, coco_captions, hpsv2_prompts, inception_score,
                                pairwise_rms, parti_prompts)
from sd_distill.stages import reference
from sd_distill.stages.evaluate import score
from tests.conftest import write_params


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


def test_pairwise_rms_by_hand():
    # two points 5 apart: the only pair's distance; three corners of a unit square: sqrt((1 + 1 + 2) / 3)
    assert pairwise_rms(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert pairwise_rms(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])) == pytest.approx((4 / 3) ** 0.5)


def test_spread_streamed_in_uneven_batches_equals_all_pairs_per_group():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(37, 5, generator=gen) * torch.arange(1, 6)  # anisotropic, different per feature
    groups = np.random.default_rng(0).integers(0, 3, 37)
    features[groups == 2] += 100.0  # a far-away group: the running sums must cancel its offset exactly
    spread = Spread(3, 5)
    for start in range(0, 37, 8):
        spread.add(features[start:start + 8], groups[start:start + 8])
    expected = [pairwise_rms(features[torch.from_numpy(groups == g)]) for g in range(3)]
    np.testing.assert_allclose(spread.result(), expected, rtol=1e-9)
    same = Spread(1, 4)
    same.add(torch.ones(6, 4) * 7.0, np.zeros(6, np.int64))  # one mode only: no diversity
    assert same.result()[0] == pytest.approx(0.0, abs=1e-6)


def test_spread_names_the_groups_with_fewer_than_two_members():
    spread = Spread(4, 2)
    spread.add(torch.zeros(3, 2), np.array([0, 0, 2]))
    with pytest.raises(ValueError, match=r"groups \[1, 2, 3\] have \[0, 1, 0\]"):
        spread.result()


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    stand_in_inception(root / "inception.pt")
    stand_in_clip(root / "clip", ["a red cube", "first caption", "second caption", "photo anime"], max_length=16)
    return root


def test_sd15_evaluation_names_a_missing_inception_file(smoke_project, tmp_path):
    shutil.copytree(smoke_project / "models", tmp_path / "models")
    shutil.copytree(smoke_project / "data", tmp_path / "data")
    captions, images = coco_fixture(tmp_path / "coco")
    params = resolve(write_params(
        tmp_path, profile="sd15", base={"device": "cpu", "mixed_precision": "no"},
        reference={"sets": ["coco"], "images": 2, "coco_captions": str(captions), "coco_images": str(images),
                   "inception": str(tmp_path / "nowhere.pt")},
        evaluate={"prompt_sets": ["coco"], "images_per_set": 2, "coco_captions": str(captions),
                  "inception": str(tmp_path / "nowhere.pt")}))
    with pytest.raises(UserError, match="evaluate.inception: .*nowhere.pt does not exist"):
        run_stage("evaluate", params, tmp_path)
    assert not (tmp_path / "reports" / "metrics.json").exists()
    with pytest.raises(UserError, match="reference.inception: .*nowhere.pt does not exist"):
        run_stage("reference", params, tmp_path)


def coco_reference(root, stand_ins, captions, images, n, inception="inception.pt", side=24):
    """``data/reference`` with the COCO sums of the first ``n`` fixture images at ``side`` px (no stage run)."""
    p = ReferenceParams(sets=("coco",), images=n, batch_size=5, coco_captions=str(captions), coco_images=str(images),
                        inception=str(stand_ins / inception))
    reference.write(root, {"coco": reference.coco_statistics(p, side, "cpu")})
    return reference.Reference(root)


def test_evaluate_refuses_coco_statistics_made_with_another_inception_count_or_side(smoke_project, stand_ins,
                                                                                   tmp_path):
    captions, images = coco_fixture(tmp_path / "coco")
    stand_in_inception(stand_ins / "other-inception.pt", seed=1)
    ref = coco_reference(tmp_path / "ref", stand_ins, captions, images, 4)
    files = [f for _, f in coco_captions(str(captions), 4)]
    sums, info = ref.coco(files, stand_ins / "inception.pt", 24)  # what it was made with: accepted
    assert int(sums["count"]) == 4 and sums["outer"].shape == (16, 16) and info["count"] == 4
    manifest = re.escape(str(tmp_path / "ref" / "manifest.json"))
    with pytest.raises(UserError, match=rf"{manifest}: coco extractor_sha256: expected '[0-9a-f]{{64}}' \(from "
                                        r"evaluate.inception\), found '[0-9a-f]{64}'"):
        ref.coco(files, stand_ins / "other-inception.pt", 24)
    with pytest.raises(UserError, match=r"coco resolution: expected 512 \(from the teacher's output side\), found 24"):
        ref.coco(files, stand_ins / "inception.pt", 512)
    with pytest.raises(UserError, match=r"coco count: expected 3 \(from evaluate.images_per_set\), found 4"):
        ref.coco(files[:3], stand_ins / "inception.pt", 24)
    with pytest.raises(UserError, match=rf"{manifest}: no 'digits' statistics \(it has \['coco'\]\); add digits to "
                                        "reference.sets"):
        ref.digits(smoke_project / "data" / "prepared")
    # the whole stage refuses it before sampling anything, and writes nothing
    shutil.copytree(smoke_project / "models", tmp_path / "models")
    shutil.copytree(smoke_project / "data" / "prepared", tmp_path / "data" / "prepared")
    params = resolve(write_params(
        tmp_path, profile="sd15", base={"device": "cpu", "mixed_precision": "no"},
        reference={"sets": ["coco"], "images": 4, "coco_captions": str(captions), "coco_images": str(images),
                   "inception": str(stand_ins / "inception.pt")},
        evaluate={"prompt_sets": ["coco"], "images_per_set": 4, "coco_captions": str(captions),
                  "inception": str(stand_ins / "other-inception.pt"), "clip_model": str(stand_ins / "clip")}))
    run_stage("reference", params, tmp_path)
    with pytest.raises(UserError, match="coco extractor_sha256: expected"):
        run_stage("evaluate", params, tmp_path)
    assert not (tmp_path / "reports" / "metrics.json").exists()


def test_a_changed_statistics_file_is_refused(stand_ins, tmp_path):
    captions, images = coco_fixture(tmp_path / "coco")
    coco_reference(tmp_path / "ref", stand_ins, captions, images, 4)
    stats = tmp_path / "ref" / "stats.npz"
    stats.write_bytes(stats.read_bytes()[:-10])
    with pytest.raises(UserError, match=re.escape(f"{stats}: missing, or its sha256 differs")):
        reference.Reference(tmp_path / "ref")


# -- memory: a scorer keeps sums, not images, and scoring a model holds one batch ------------------------------

def held_bytes(obj, *leave_out) -> int:
    """Bytes of every numpy array and torch tensor reachable from ``obj`` through attributes and containers,
    ``leave_out`` (the suite and its feature extractor, shared by every model's scorer) not followed."""
    seen, total, todo = {id(x) for x in leave_out}, 0, [obj]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, np.ndarray):
            total += x.nbytes
        elif isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            todo.extend(x)
        elif hasattr(x, "__dict__"):
            todo.extend(vars(x).values())
    return total


def digit_suite(smoke_project, n: int, batch: int = 20) -> DigitSuite:
    data = smoke_project / "data"
    p = EvaluateParams(samples_per_prompt=n // 10, batch_size=batch)
    return DigitSuite(data / "prepared", reference.Reference(data / "reference"), p, seed=0)


def test_digit_scorer_keeps_the_same_state_for_n_and_4n_images(smoke_project):
    rng = np.random.default_rng(0)
    held = {}
    for n in (100, 400):
        suite = digit_suite(smoke_project, n)
        scorer = suite.start()
        for start in range(0, n, 20):
            scorer.add(start, rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
        result = scorer.result()
        assert np.isfinite(result["fid"]) and 0 <= result["accuracy"] <= 1
        assert scorer.grid().shape == (10, 16, 16, 3)
        held[n] = held_bytes(scorer, suite, suite.extractor)
    assert held[400] == held[100]  # 300 images more, not one byte more
    assert held[400] < 400 * 16 * 16 * 3  # FID's sums and ten tiles: less than the images it scored


def test_text_image_scorer_keeps_only_the_inception_probabilities_per_image(stand_ins, tmp_path):
    captions, images = coco_fixture(tmp_path / "coco", n=32)
    rng = np.random.default_rng(0)
    held = {}
    for n in (8, 32):
        ref = coco_reference(tmp_path / f"ref-{n}", stand_ins, captions, images, n)
        p = EvaluateParams(suite="text-image", prompt_sets=("coco",), images_per_set=n, batch_size=4, grid_columns=3,
                           coco_captions=str(captions), inception=str(stand_ins / "inception.pt"),
                           clip_model=str(stand_ins / "clip"))
        suite = TextImageSuite(p, seed=0, resolution=24, device="cpu", reference=ref)
        scorer = suite.start()
        for start in range(0, n, 4):
            scorer.add(start, rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8))
        result = scorer.result()
        assert result["sets"]["coco"]["images"] == n and np.isfinite(result["fid"])
        assert 1 <= result["inception_score"] <= 12
        held[n] = held_bytes(scorer, suite, suite.inception)
    classes = 12  # the stand-in's
    assert held[32] - held[8] == (32 - 8) * classes * 4  # float32 class probabilities, nothing else per image


class FakePipe:
    """The stock pipeline's call as ``evaluate.sample`` makes it, drawing (n, side, side, 3) float images in [0, 1]
    from each generator's seed."""

    def __init__(self, side: int):
        self.side = side

    def __call__(self, prompt, num_inference_steps, guidance_scale, generator, output_type):
        images = [np.random.default_rng(g.initial_seed()).random((self.side, self.side, 3), dtype=np.float32)
                  for g in generator]
        return SimpleNamespace(images=np.stack(images))


def test_scoring_a_model_allocates_the_same_for_n_and_4n_images(smoke_project):
    side, n = 64, 400
    image_bytes = side * side * 3  # uint8
    pipe = FakePipe(side)
    peaks = {}
    for count in (20, n, 4 * n):  # the first warms up lazy initialisation
        suite = digit_suite(smoke_project, count, batch=10)
        tracemalloc.start()
        metrics, tiles = score(pipe, suite, suite.p, steps=1, calls=1)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert metrics["samples"] == count and tiles.shape == (10, side, side, 3)
    # keeping the images would need 4n * image_bytes (19.7 MB) at 4n, 3n * image_bytes more than at n
    assert peaks[4 * n] < n * image_bytes
    assert peaks[4 * n] - peaks[n] < n * image_bytes / 4
