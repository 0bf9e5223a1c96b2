import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from sd_distill.models import parts
from sd_distill.models.tokenizer import build_tokenizer
from sd_distill.params import GateBound, resolve
from sd_distill.runner import run_stage
from sd_distill.serving import StudentPipeline, check_input, image_size
from sd_distill.stages.register import Champion, MissingMetric, decide, registration_key
from tests.conftest import write_params

NAME = "sd-distill-student"  # register.model_name's default
GATE = (GateBound(metric="fid_ratio", op="<=", value=1.3), GateBound(metric="accuracy_ratio", op=">=", value=0.96))
GOOD = {"fid": 1.20, "fid_ratio": 1.10, "accuracy": 0.97, "accuracy_ratio": 0.98, "seconds_per_image": 0.01}
WORSE = {**GOOD, "fid": 1.70, "fid_ratio": 1.55}  # fails fid_ratio <= 1.3
BETTER = {**GOOD, "fid": 1.05, "fid_ratio": 0.96}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A registry of this module's own (a fresh SQLite file), so versions count from 1."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A stock StableDiffusionPipeline folder with the smoke profile's shapes (random weights) and a model card."""
    p = resolve(write_params(tmp_path_factory.mktemp("params"))).teacher
    torch.manual_seed(0)
    tokenizer = build_tokenizer(["a handwritten digit one two seven"], max_length=p.text_encoder.max_length)
    text = parts.build_text_encoder(p.text_encoder, tokenizer)
    unet = parts.build_unet(p.unet, sample_size=4, in_channels=p.vae.latent_channels,
                            cross_attention_dim=p.text_encoder.hidden_size)
    folder = tmp_path_factory.mktemp("pipeline") / "student"
    pipe = parts.assemble(parts.build_vae(p.vae), text, tokenizer, unet, parts.build_sampling_scheduler(p))
    pipe.save_pretrained(folder)
    (folder / "distill.json").write_text(json.dumps({"num_inference_steps": 1, "guidance_scale": 7.5}))
    return folder


def make_project(root, student_dir, row, **register):
    """data/prepared, models/student and reports/metrics.json: what the register stage reads."""
    (root / "data" / "prepared").mkdir(parents=True, exist_ok=True)
    (root / "data" / "prepared" / "manifest.json").write_text(json.dumps({"shards": [], "samples": {"train": 0}}))
    if not (root / "models" / "student").exists():
        shutil.copytree(student_dir, root / "models" / "student")
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports" / "metrics.json").write_text(json.dumps({"models": {"student@1": row, "teacher@4": {}}}))
    return resolve(write_params(root, register=register) if register else write_params(root))


def snapshot(root, summary):
    client = MlflowClient()  # search_model_versions leaves .aliases empty; get_model_version fills it
    versions = {int(v.version): client.get_model_version(NAME, v.version)
                for v in client.search_model_versions(f"name = '{NAME}'")}
    return {
        "record": json.loads((root / "reports" / "registration.json").read_text()),
        "summary": dict(summary),
        "versions": {n: (sorted(v.aliases), dict(v.tags)) for n, v in versions.items()},
    }


@pytest.fixture(scope="module")
def history(store, student_dir, tmp_path_factory):
    """One project registered four times: a good student, the same again, a worse row, a better row."""
    root = tmp_path_factory.mktemp("project")
    out = {}
    for step, row in (("first", GOOD), ("again", GOOD), ("worse", WORSE), ("better", BETTER)):
        # force: the runner would skip a rerun with the same inputs itself; this is the registry's own check
        summary = run_stage("register", make_project(root, student_dir, row), root, force=step == "again")
        out[step] = snapshot(root, summary)
    return out


# --------------------------------------------------------------------------- the gate, pure
def test_gate_promotes_a_better_candidate_and_refuses_a_worse_one():
    first = decide(GOOD, GATE, "fid", "min", champion=None)
    assert first.passed and first.promoted and first.label == "promoted"
    assert first.reasons == "fid_ratio 1.1 <= 1.3 ok; accuracy_ratio 0.98 >= 0.96 ok; no champion yet"

    better = decide(BETTER, GATE, "fid", "min", champion=Champion(1, 1.20))
    assert better.promoted and "fid 1.05 < champion v1 fid 1.2" in better.reasons

    passes_but_worse = decide({**GOOD, "fid": 1.25}, GATE, "fid", "min", champion=Champion(1, 1.20))
    assert passes_but_worse.passed and not passes_but_worse.promoted
    assert passes_but_worse.label == "kept champion v1"
    assert "fid 1.25 not < champion v1 fid 1.2" in passes_but_worse.reasons

    tie = decide(GOOD, GATE, "fid", "min", champion=Champion(1, 1.20))
    assert not tie.promoted  # the candidate must beat the champion, not equal it

    worse = decide(WORSE, GATE, "fid", "min", champion=None)
    assert not worse.passed and not worse.promoted and worse.label == "gate failed"
    assert "fid_ratio 1.55 <= 1.3 FAILED" in worse.reasons
    assert [c["ok"] for c in worse.checks] == [False, True]

    higher_is_better = decide({**GOOD, "accuracy": 0.99}, GATE, "accuracy", "max", champion=Champion(1, 0.97))
    assert higher_is_better.promoted and "accuracy 0.99 > champion v1 accuracy 0.97" in higher_is_better.reasons


def test_nan_metric_fails_the_gate():
    d = decide({**GOOD, "fid_ratio": float("nan")}, GATE, "fid", "min")
    assert not d.passed and "fid_ratio nan <= 1.3 FAILED" in d.reasons


def test_missing_gate_key_is_an_error_naming_it_and_the_row_keys():
    bounds = (*GATE, GateBound(metric="clip_score_ratio", op=">=", value=0.9))
    with pytest.raises(MissingMetric, match="'clip_score_ratio' is not in the student's row") as err:
        decide(GOOD, bounds, "fid", "min")
    assert "fid_ratio" in str(err.value) and "accuracy_ratio" in str(err.value)


def test_key_follows_weights_and_metrics_but_not_the_runners_params_record(student_dir, tmp_path):
    student = shutil.copytree(student_dir, tmp_path / "student")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    p = resolve(write_params(tmp_path)).register
    key = registration_key(data, student, GOOD, p)
    (student / "params.resolved.json").write_text('{"base": {"device": "cuda"}}')
    assert registration_key(data, student, {**GOOD, "seconds_per_image": 9.0}, p) == key
    assert registration_key(data, student, {**GOOD, "fid": 1.3}, p) != key
    weights = student / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert registration_key(data, student, GOOD, p) != key


# --------------------------------------------------------------------------- the stage, end to end
def test_first_registration_passes_the_gate_and_becomes_champion(history):
    first = history["first"]
    assert first["record"]["version"] == 1 and first["record"]["created"] is True
    assert first["record"]["decision"] == "promoted" and first["record"]["passed"] is True
    assert first["record"]["aliases"] == ["candidate", "champion"] and first["record"]["champion_version"] == 1
    assert [g["ok"] for g in first["record"]["gate"]] == [True, True]
    aliases, tags = first["versions"][1]
    assert aliases == ["candidate", "champion"]
    assert tags["sd_distill.gate"] == "pass" and tags["sd_distill.decision"] == "promoted"
    assert tags["sd_distill.key"] == first["record"]["key"] and float(tags["sd_distill.metric.fid"]) == GOOD["fid"]
    assert first["summary"]["version"] == 1 and first["summary"]["promoted"] == 1


def test_registering_the_same_inputs_again_is_a_no_op(history):
    first, again = history["first"], history["again"]
    assert again["record"]["created"] is False and again["record"]["key"] == first["record"]["key"]
    assert again["record"]["version"] == 1 and again["record"]["decision"] == "promoted"
    assert again["versions"] == first["versions"]  # still one version, same aliases and tags
    assert again["summary"]["created"] == 0


def test_worse_student_gets_candidate_but_champion_stays(history):
    worse = history["worse"]
    assert worse["record"]["version"] == 2 and worse["record"]["created"] is True
    assert worse["record"]["decision"] == "gate failed" and worse["record"]["champion_version"] == 1
    assert worse["record"]["key"] != history["first"]["record"]["key"]
    assert worse["versions"][1][0] == ["champion"] and worse["versions"][2][0] == ["candidate"]
    tags = worse["versions"][2][1]
    assert tags["sd_distill.gate"] == "fail" and "fid_ratio 1.55 <= 1.3 FAILED" in tags["sd_distill.reasons"]
    assert worse["summary"]["promoted"] == 0


def test_better_student_takes_champion(history):
    better = history["better"]
    assert better["record"]["version"] == 3 and better["record"]["decision"] == "promoted"
    assert better["versions"][3][0] == ["candidate", "champion"]
    assert better["versions"][1][0] == [] and better["versions"][2][0] == []
    assert "fid 1.05 < champion v1 fid 1.2" in better["versions"][3][1]["sd_distill.reasons"]


def test_missing_gate_key_stops_the_stage_before_registering(store, student_dir, tmp_path):
    params = make_project(tmp_path, student_dir, GOOD, gate=[{"metric": "clip_score_ratio", "op": ">=", "value": 0.9}])
    before = len(MlflowClient().search_model_versions(f"name = '{NAME}'"))
    with pytest.raises(MissingMetric, match="clip_score_ratio"):
        run_stage("register", params, tmp_path)
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == before
    assert not (tmp_path / "reports" / "registration.json").exists()


# --------------------------------------------------------------------------- the served model
@pytest.fixture(scope="module")
def champion(history):
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def test_champion_generates_uint8_images_of_the_pipeline_size_per_seed(champion, student_dir):
    h, w = image_size(student_dir)
    assert (h, w) == (8, 8)  # UNet sample_size 4 x VAE factor 2 (two VAE stages)
    images = champion.predict(pd.DataFrame({"prompt": ["a handwritten digit one"] * 3, "seed": [1, 2, 1]}))
    assert images.dtype == np.uint8 and images.shape == (3, h, w, 3)
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])
    assert champion.metadata.get_output_schema().inputs[0].shape == (-1, h, w, 3)


def test_prediction_rows_carry_their_own_steps_and_guidance(champion):
    frame = pd.DataFrame({"prompt": ["a handwritten digit seven"] * 2, "num_inference_steps": [1, 2],
                          "guidance_scale": [1.0, 1.0], "seed": [0, 0]})
    images = champion.predict(frame)
    default = champion.predict(frame[["prompt"]].iloc[:1])  # card's 1 step, guidance 7.5, seed 0
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], default[0])


def test_predict_without_prompt_column_names_it(champion):
    with pytest.raises(ValueError, match="missing required column 'prompt'"):
        champion.unwrap_python_model().predict(None, pd.DataFrame({"seed": [1]}))
    with pytest.raises(Exception, match="prompt"):  # MLflow's own schema check runs first through pyfunc
        champion.predict(pd.DataFrame({"seed": [1]}))


def test_wrong_column_types_name_the_column():
    with pytest.raises(ValueError, match=r"'seed' expects int, found dtype float64"):
        check_input(pd.DataFrame({"prompt": ["a"], "seed": [1.5]}))
    with pytest.raises(ValueError, match=r"'prompt' expects str in every row, found int 3 in row 1"):
        check_input(pd.DataFrame({"prompt": ["a", 3]}))
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['steps'\]"):
        check_input(pd.DataFrame({"prompt": ["a"], "steps": [2]}))
    assert isinstance(StudentPipeline(), mlflow.pyfunc.PythonModel)


# --------------------------------------------------------------------------- registrations racing each other
class Jittery:
    """A real MlflowClient whose calls each start after a random pause of up to 20 ms (seeded per thread), so that
    racing registrations interleave in many orders rather than in the scheduler's usual one."""

    def __init__(self, client, seed: int):
        import random

        self._client, self._rng = client, random.Random(seed)

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            import time

            time.sleep(self._rng.uniform(0, 0.02))
            return attr(*args, **kwargs)

        return call


def test_twenty_concurrent_registrations_leave_one_consistent_champion(student_dir, tmp_path, monkeypatch):
    """20 candidates registered at once (threads on a fresh SQLite registry, none of them finding the model name
    registered yet): one version each, and `champion` ends on the best that passed the gate, whatever the
    interleaving of reads and alias moves."""
    from concurrent.futures import ThreadPoolExecutor

    from sd_distill.serving import log_student
    from sd_distill.stages.register import register

    uri = f"sqlite:///{tmp_path / 'race.db'}"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, uri)
    # one connection per thread: 20 registration processes would each have their own
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "25")
    p = make_project(tmp_path, student_dir, GOOD).register.model_copy(update={"model_name": "sd-distill-race"})
    with mlflow.start_run():
        uri = log_student(student_dir).model_uri
    # fid 1.00..1.19 in a scrambled order; every third candidate fails the gate (fid_ratio above 1.3)
    rows = [{**GOOD, "fid": 1.0 + 0.01 * ((7 * i) % 20), "fid_ratio": 1.5 if i % 3 == 1 else 1.0} for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        done = list(pool.map(lambda i: register(Jittery(MlflowClient(), i), uri, rows[i], f"race-{i}", p), range(20)))

    client = MlflowClient()
    versions = {int(v.version): client.get_model_version(p.model_name, v.version)
                for v in client.search_model_versions(f"name = '{p.model_name}'")}
    assert len(versions) == 20 and sorted(int(mv.version) for mv, _ in done) == sorted(versions)
    by_key = {v.tags["sd_distill.key"]: v for v in versions.values()}
    assert sorted(by_key) == sorted(f"race-{i}" for i in range(20))
    passed = [i for i in range(20) if rows[i]["fid_ratio"] <= 1.3]
    best = min(passed, key=lambda i: rows[i]["fid"])
    holders = [n for n, v in versions.items() if "champion" in v.aliases]
    assert holders == [int(by_key[f"race-{best}"].version)]
    assert len([n for n, v in versions.items() if "candidate" in v.aliases]) == 1
    for i, (mv, decision) in enumerate(done):
        tags = versions[int(mv.version)].tags
        assert tags["sd_distill.gate"] == ("pass" if i in passed else "fail") and decision.passed == (i in passed)
        assert float(tags["sd_distill.metric.fid"]) == rows[i]["fid"]
    assert by_key[f"race-{best}"].tags["sd_distill.decision"] == "promoted"
    assert client.get_model_version_by_alias(p.model_name, "champion").tags["sd_distill.key"] == f"race-{best}"
