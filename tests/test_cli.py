import subprocess

from PIL import Image

from tests.conftest import BIN


def cli(*args, cwd=None):
    return subprocess.run([str(BIN / "sd-distill"), *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_command():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("stages", "params", "run", "repro", "dvc", "sample"):
        assert command in out.stdout


def test_unknown_stage_is_a_clear_error(tmp_path):
    out = cli("run", "nosuch", cwd=tmp_path)
    assert out.returncode == 2
    assert "unknown stage 'nosuch'" in out.stderr and "prepare" in out.stderr


def test_bad_params_stop_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: smoke\nteacher: {unet_train: {steps: 0}}\n")
    out = cli("run", "teacher", cwd=tmp_path)
    assert out.returncode == 2
    assert "teacher.unet_train.steps" in out.stderr and "greater than or equal to 1" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "models").exists()


def test_dry_run_prints_only_the_stage_section(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: smoke\n")
    out = cli("run", "evaluate", "--dry-run", "--set", "evaluate.steps=9", cwd=tmp_path)
    assert out.returncode == 0
    assert '"steps": 9' in out.stdout and '"teacher"' not in out.stdout


def test_missing_input_names_the_stage_to_run_first(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: smoke\n")
    out = cli("run", "teacher", cwd=tmp_path)
    assert out.returncode == 2 and "run prepare first" in out.stderr


def test_sample_writes_the_requested_png(smoke_project, tmp_path):
    target = tmp_path / "seven.png"
    out = cli("sample", str(smoke_project / "models" / "teacher"), "--prompt", "a handwritten digit seven",
              "--steps", "2", "--guidance", "3", "--seed", "1", "--out", str(target), "--scale", "2")
    assert out.returncode == 0, out.stderr
    assert Image.open(target).size == (32, 32)


def test_sample_on_a_folder_without_a_model_says_so(tmp_path):
    out = cli("sample", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "no model_index.json" in out.stderr
