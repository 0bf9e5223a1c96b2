import subprocess

from PIL import Image

from tests.conftest import BIN, ROOT


def cli(*args, cwd=None):
    return subprocess.run([str(BIN / "sd-distill"), *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_command():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("stages", "params", "run", "repro", "dvc", "sample", "inspect", "report"):
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
    out = cli("run", "evaluate", "--dry-run", "--set", "evaluate.sampling_steps=9", cwd=tmp_path)
    assert out.returncode == 0
    assert '"sampling_steps": 9' in out.stdout and '"teacher"' not in out.stdout


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


def test_report_prints_every_model_with_its_figures(tmp_path):
    import json

    (tmp_path / "reports").mkdir()
    row = {"unet_calls_per_image": 128, "fid": 0.984, "fid_ratio": 1.0, "accuracy": 0.998, "latency_ms": 120.0,
           "unet_parameters": 4_434_660, "unet_macs_per_image": 6.28e9, "decoder": "AutoencoderKL"}
    student = {**row, "unet_calls_per_image": 1, "fid": 1.1, "fid_ratio": 1.1179, "latency_ms": 3.0,
               "decoder": "AutoencoderTiny"}
    metrics = {"profile": "tiny", "teacher": row, "models": {"teacher@64": row, "student@1": student}}
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(metrics))
    out = cli("report", "--sort", "latency", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "@" in line]
    assert "student@1" in lines[0] and "teacher@64" in lines[1]  # fastest first
    assert "1.12x" in lines[0] and "40.0x" in lines[0] and "tiny" in lines[0]  # FID ratio, speedup, decoder
    assert "0.984" in lines[1] and "4.43M" in lines[1] and "6.28G" in lines[1]


def test_report_without_metrics_names_the_file(tmp_path):
    out = cli("report", cwd=tmp_path)
    assert out.returncode == 2 and "reports/metrics.json" in out.stderr and "run the pipeline" in out.stderr
    (tmp_path / "bad.json").write_text('{"models": {}}')
    out = cli("report", "--metrics", "bad.json", cwd=tmp_path)
    assert out.returncode == 2 and "bad.json" in out.stderr and "non-empty 'models'" in out.stderr


def test_help_ends_with_examples_then_exit_statuses_then_environment():
    from sd_distill.cli import build_parser
    from sd_distill.errors import EXIT_STATUSES

    text = build_parser().format_help()
    examples, statuses, environment = (text.index(h) for h in ("\nexamples:\n", "\nexit status:\n", "\nenvironment:\n"))
    assert examples < statuses < environment
    assert "sd-distill plan --profile sd15" in text[examples:statuses]  # the last example, before the statuses
    block = text[statuses:environment]
    rows = [line.split()[0] for line in block.splitlines()[2:] if line.startswith("  ") and line[2:3].isdigit()]
    assert rows == [str(s.status) for s in EXIT_STATUSES]
    assert "MLFLOW_TRACKING_URI" in text[environment:]


def test_readme_exit_status_table_is_errors_exit_statuses():
    from sd_distill.errors import exit_status_table

    readme = (ROOT / "README.md").read_text()
    start = readme.index("| `sd-distill run` exits with |")
    table = readme[start:readme.index("\n\n", start) + 1]
    assert table == exit_status_table()
    assert "The exit statuses are `sd_distill.errors.EXIT_STATUSES`, which `sd-distill --help` prints too" in readme
