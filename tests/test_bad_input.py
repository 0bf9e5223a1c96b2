"""Bad input (issue 8, items 6 and 8): a malformed params.yaml, a missing model folder, a model of the wrong kind
for a stage, a pipeline folder without safetensors or with a pickle planted in it, and prepare's input above the
reject threshold each stop with exit status 2 and ONE error line that names the file or key, what was expected and
what was found; nothing is loaded, nothing published, no input changed.

The models are tiny pipelines built from the smoke profile's configs (random weights), not trained.
"""

import hashlib
import json
import pickle
import pickletools
import re
import shutil
from pathlib import Path

import pytest
import torch

from sd_distill.cli import main
from sd_distill.models import parts
from sd_distill.models.tokenizer import build_tokenizer
from sd_distill.params import resolve
from tests.conftest import write_params
from tests.test_prepare import make_folder


def digest(root: Path) -> str:
    """sha256 over a file tree's paths and bytes: equal before and after means nothing was changed or deleted."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


# progress log records (sd-distill's "12:00:00 INFO ...", MLflow's "2026/01/01 12:00:00 INFO ...") are not errors
LOG_RECORD = re.compile(r"^(\d{4}/\d\d/\d\d )?\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def one_error_line(capsys, command: str) -> str:
    """The one line the CLI printed for the error (log records aside), checked for its prefix; no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sd-distill {command}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A StableDiffusionPipeline folder with the smoke shapes: epsilon prediction, no guidance input (a teacher)."""
    p = resolve(write_params(tmp_path_factory.mktemp("params"))).teacher
    torch.manual_seed(0)
    tokenizer = build_tokenizer(["a handwritten digit one two seven"], max_length=p.text_encoder.max_length)
    unet = parts.build_unet(p.unet, sample_size=4, in_channels=p.vae.latent_channels,
                            cross_attention_dim=p.text_encoder.hidden_size)
    pipe = parts.assemble(parts.build_vae(p.vae), parts.build_text_encoder(p.text_encoder, tokenizer), tokenizer,
                          unet, parts.build_sampling_scheduler(p))
    folder = tmp_path_factory.mktemp("pipeline") / "teacher"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def model(pipeline: Path, dest: Path, prediction_type=None, guidance_dim=None, steps=None) -> Path:
    """A copy of ``pipeline`` at ``dest`` that claims another prediction type / guidance input / step count (the
    configs only: every check runs before a weight is read)."""
    shutil.copytree(pipeline, dest)
    if prediction_type:
        edit_json(dest / "scheduler" / "scheduler_config.json", prediction_type=prediction_type)
    if guidance_dim:
        edit_json(dest / "unet" / "config.json", time_cond_proj_dim=guidance_dim)
    if steps:
        (dest / "distill.json").write_text(json.dumps({"num_inference_steps": steps}))
    return dest


def project(tmp_path: Path) -> Path:
    for data in ("prepared", "latents"):  # the stages below fail on their model before reading these
        (tmp_path / "data" / data).mkdir(parents=True)
    write_params(tmp_path)
    return tmp_path


# -- malformed params.yaml -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("profile: smoke\nteacher:\n  unet_train: {steps: 3\n  vae: {}\n", ":4:6: not valid YAML: expected ',' or '}'"),
    ("profile: smoke\nbase:\n\tseed: 1\n", ":3:1: not valid YAML: found character '\\t'"),
    ("profile: smoke\nteacher: {}\nteacher: {kl_weight: 0.1}\n", ":3:1: not valid YAML: found duplicate key 'teacher'"),
    ("profile: !!python/object/apply:os.system [touch pwned]\n", ":1:10: not valid YAML: could not determine a "
                                                                 "constructor for the tag"),
    ("- teacher\n- base\n", ": expected a mapping of sections at the top level (section: {key: value}), found list"),
    ("profile: smoke\nteacher: 5\n", ": section 'teacher' must be a mapping of keys to values, found int 5"),
    ("profile: smoke\nbase: {seed: abc}\n", ": base.seed: Input should be a valid integer, unable to parse string as "
                                            "an integer (found 'abc')"),
    ("profile: smoke\nteacher: {unet: 5}\n", ": teacher.unet: Input should be a valid dictionary or instance of "
                                             "UnetArch (found 5)"),
    ("profile: [smoke]\n", ": profile: expected one of tiny, smoke, sd15, found ['smoke']"),
])
def test_malformed_params_yaml_gives_one_line_naming_file_and_place(tmp_path, capsys, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert main(["run", "teacher", "--params", str(path)]) == 2
    assert f"{path}{expected}" in one_error_line(capsys, "run")
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# -- missing model folder ------------------------------------------------------------------------------------

def test_sample_of_a_missing_model_folder_names_it(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "models" / "nope"), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert f"{tmp_path / 'models' / 'nope'}: model folder does not exist" in one_error_line(capsys, "sample")
    assert not (tmp_path / "x.png").exists()


def test_stage_with_a_missing_model_folder_names_the_stage_to_run(tmp_path, capsys):
    root = project(tmp_path)
    assert main(["run", "guidance", "--params", str(root / "params.yaml")]) == 2
    line = one_error_line(capsys, "run")
    assert f"stage guidance: input vpred ({root / 'models' / 'vpred'}) does not exist; run " in line
    assert line.endswith("vpred first")


def test_pipeline_folder_missing_a_part_names_it(pipeline, tmp_path, capsys):
    folder = model(pipeline, tmp_path / "m")
    shutil.rmtree(folder / "unet")
    assert main(["sample", str(folder), "--prompt", "x"]) == 2
    assert f"{folder / 'unet'}: no UNet2DConditionModel folder (config.json)" in one_error_line(capsys, "sample")


# -- wrong prediction type or architecture for the stage -----------------------------------------------------

WRONG_KIND = [
    # stage, input folder, how it is wrong, what the error line says
    ("guidance", "models/vpred", {}, ["must predict v", "scheduler_config.json prediction_type is 'epsilon', "
                                      "expected 'v_prediction'", "`sd-distill run vpred`"]),
    ("vpred", "models/teacher", {"guidance_dim": 16}, ["must not be w-conditioned", "unet/config.json "
                                                       "time_cond_proj_dim is 16, expected null", "run teacher`"]),
    ("prune", "models/guided", {"prediction_type": "v_prediction"},
     ["must be w-conditioned", "time_cond_proj_dim is null", "expected an integer", "`sd-distill run guidance`"]),
    ("halve@32", "models/pruned", {"guidance_dim": 16},
     ["must predict v", "prediction_type is 'epsilon', expected 'v_prediction'", "`sd-distill run prune`"]),
    ("halve@8", "models/steps-16", {"prediction_type": "v_prediction", "guidance_dim": 16, "steps": 4},
     ["distill.json: num_inference_steps is 4, expected 16", "`sd-distill run halve@16` writes a 16-step model"]),
    ("halve@32", "models/pruned", {"prediction_type": "v_prediction", "guidance_dim": 16, "steps": 2},
     ["distill.json: num_inference_steps is 2, expected no distill.json"]),
]


@pytest.mark.parametrize("stage, folder, wrong, says", WRONG_KIND, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG_KIND)])
def test_model_of_the_wrong_kind_for_the_stage_is_refused(pipeline, tmp_path, capsys, stage, folder, wrong, says):
    root = project(tmp_path)
    model(pipeline, root / folder, **wrong)
    before = digest(root / "models")
    assert main(["run", stage, "--params", str(root / "params.yaml")]) == 2
    line = one_error_line(capsys, "run")
    assert f"{stage}: {root / folder}" in line
    for fragment in says:
        assert fragment in line
    assert digest(root / "models") == before  # nothing written, nothing removed


def test_unet_of_another_class_is_refused(pipeline, tmp_path, capsys):
    folder = model(pipeline, tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    edit_json(folder / "model_index.json", unet=[index["unet"][0], "UNet2DModel"])
    assert main(["sample", str(folder), "--prompt", "x"]) == 2
    assert ("model_index.json: unet is 'UNet2DModel', expected 'UNet2DConditionModel'"
            in one_error_line(capsys, "sample"))


def test_unet_from_another_model_is_refused(pipeline, tmp_path, capsys):
    folder = model(pipeline, tmp_path / "m")
    edit_json(folder / "unet" / "config.json", cross_attention_dim=768)
    assert main(["inspect", str(folder)]) == 2
    line = one_error_line(capsys, "inspect")
    assert "unet/config.json: cross_attention_dim is 768, expected the text encoder's hidden_size (16)" in line


def test_decoder_refuses_a_teacher_whose_vae_is_a_tiny_autoencoder(pipeline, tmp_path, capsys):
    root = project(tmp_path)
    folder = model(pipeline, root / "models" / "teacher")
    edit_json(folder / "vae" / "config.json", _class_name="AutoencoderTiny")
    assert main(["run", "decoder", "--params", str(root / "params.yaml")]) == 2
    assert "vae/config.json: model class is 'AutoencoderTiny', expected 'AutoencoderKL'" in one_error_line(capsys, "run")


# -- safetensors only: pickles are refused unopened ----------------------------------------------------------

class Canary:
    """Unpickling this creates ``path``: what a hostile checkpoint would do instead, run by pickle itself."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def calls_on_load(payload: bytes) -> tuple[str, str]:
    """What unpickling ``payload`` would call, and the call's first string argument, read from its opcodes
    (pickletools only disassembles: nothing in it is imported or called)."""
    ops = list(pickletools.genops(payload))
    strings = [arg for op, arg, _ in ops if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE")]
    assert any(op.name == "REDUCE" for op, _, _ in ops), "the payload calls nothing on load"
    assert any(op.name in ("STACK_GLOBAL", "GLOBAL") for op, _, _ in ops), "the payload imports nothing on load"
    return strings[1], strings[2]  # module, name, then the arguments


@pytest.mark.parametrize("planted, replaces", [
    ("unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors"),  # in place of the weights
    ("text_encoder/pytorch_model.bin", None),  # next to model.safetensors
    ("vae/diffusion_pytorch_model.ckpt", None),
    ("v1-5-pruned.ckpt", None),  # the root of the folder
    ("unet/ema.pt", None),
    ("scheduler/state.pkl", None),
])
def test_planted_pickle_is_refused_and_never_unpickled(pipeline, tmp_path, capsys, planted, replaces):
    folder = model(pipeline, tmp_path / "m")
    canary = tmp_path / "canary"
    payload = pickle.dumps(Canary(canary))
    assert calls_on_load(payload) == ("open", str(canary))  # live, read without running it: it would open the canary
    if replaces:
        (folder / replaces).unlink()
    (folder / planted).write_bytes(payload)
    before = digest(folder)
    assert main(["sample", str(folder), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    line = one_error_line(capsys, "sample")
    assert f"{folder / planted}: pickle-bearing weight file in model folder {folder}" in line
    assert "expected safetensors weights only" in line
    assert not canary.exists() and not (tmp_path / "x.png").exists()
    assert digest(folder) == before


def test_stage_refuses_a_planted_pickle_before_loading(pipeline, tmp_path, capsys):
    root = project(tmp_path)
    folder = model(pipeline, root / "models" / "vpred", prediction_type="v_prediction")
    canary = tmp_path / "canary"
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Canary(canary)))
    assert main(["run", "guidance", "--params", str(root / "params.yaml")]) == 2
    assert "unet/diffusion_pytorch_model.bin: pickle-bearing weight file" in one_error_line(capsys, "run")
    assert not canary.exists() and not (root / "models" / "guided").exists()


def test_folder_without_safetensors_weights_is_refused(pipeline, tmp_path, capsys):
    folder = model(pipeline, tmp_path / "m")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert main(["sample", str(folder), "--prompt", "x"]) == 2
    line = one_error_line(capsys, "sample")
    assert f"{folder / 'vae'}: no safetensors weights (*.safetensors), found no weight file" in line


def test_single_model_folder_with_a_pickle_is_refused(tmp_path):
    from diffusers import AutoencoderTiny

    canary = tmp_path / "canary"
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    (tmp_path / "decoder" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Canary(canary)))
    with pytest.raises(parts.ModelError, match="diffusion_pytorch_model.bin: pickle-bearing weight file"):
        parts.load_model(AutoencoderTiny, tmp_path / "decoder", producer="decoder")
    assert not canary.exists()


# -- prepare above its reject threshold ----------------------------------------------------------------------

def test_prepare_above_the_reject_threshold_fails_with_counts_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "raw"
    src.mkdir()
    make_folder(src, good=40)  # 16 planted bad of 56: far above max_reject_rate 5%
    before = digest(src)
    write_params(tmp_path, prepare={"source": "folder", "path": str(src), "resolution": 16, "min_size": 8,
                                    "max_reject_rate": 0.05})
    assert main(["run", "prepare", "--params", str(tmp_path / "params.yaml")]) == 2
    line = one_error_line(capsys, "run")
    assert "prepare: 16 of 56 samples rejected (28.6%), above prepare.max_reject_rate=5.0%" in line
    assert "not_rgb 4 (e.g. gray, rgba, palette)" in line and "empty_file 1 (e.g. zero_bytes)" in line
    assert digest(src) == before and not any((tmp_path / "data").glob("*"))  # no data/prepared, no partial


def test_a_good_folder_passes_every_check_and_loads(pipeline, tmp_path):
    """The checks refuse only what is wrong: the same folder, untouched, loads for the stage that wants a teacher,
    and its VAE loads alone."""
    from diffusers import AutoencoderKL

    from sd_distill.stages import vpred

    pipe = parts.load_pipeline(pipeline, needs=vpred.NEEDS)
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.unet.config.time_cond_proj_dim is None
    assert isinstance(parts.load_model(AutoencoderKL, pipeline / "vae", producer="teacher"), AutoencoderKL)
