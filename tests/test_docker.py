"""docker/: hadolint on every Dockerfile, and what the images promise (user, caches, versions, build context)."""

import fnmatch
import re
import subprocess

import pytest

from tests.conftest import ROOT

HADOLINT = ROOT / ".venv-lint" / "bin" / "hadolint"
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu", "docker/airflow.Dockerfile"]
TRAINERS = ["docker/Dockerfile", "docker/Dockerfile.cpu"]


def final_stage(path: str) -> str:
    return re.split(r"^FROM ", (ROOT / path).read_text(), flags=re.M)[-1]


def pinned(name: str, constraints: str) -> str:
    return re.search(rf"^{re.escape(name)}==(\S+)$", (ROOT / constraints).read_text(), re.M).group(1)


@pytest.mark.parametrize("path", DOCKERFILES)
def test_hadolint_passes_at_the_strictest_threshold(path):
    if not HADOLINT.is_file():
        pytest.fail(f"{HADOLINT} is missing: run `make setup-lint`")
    out = subprocess.run([HADOLINT, "--failure-threshold", "style", path], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", TRAINERS)
def test_trainer_images_run_sd_distill_as_a_fixed_non_root_user_with_writable_caches(path):
    stage = final_stage(path)
    assert re.search(r"^USER 1000:1000$", stage, re.M)
    assert '"sd-distill"]' in re.search(r"^ENTRYPOINT (.*)$", stage, re.M).group(1)
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        value = re.search(rf"{var}=(\S+)", stage).group(1)
        assert value.startswith(("/workspace/", "/tmp/")), (var, value)  # writable with a read-only root


@pytest.mark.parametrize("path", DOCKERFILES)
def test_base_images_are_pinned_by_tag(path):
    text = (ROOT / path).read_text()
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M) + [
        b for b in re.findall(r"^FROM (\S+)", text, re.M) if not b.startswith("$")]
    assert bases
    for base in bases:
        name, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), base


def test_images_install_the_versions_the_tests_ran_with():
    torch = pinned("torch", "constraints.txt")
    for path in TRAINERS:
        text = (ROOT / path).read_text()
        assert f"torch=={torch}" in text and "-c constraints.txt" in text
    assert "download.pytorch.org/whl/cu" in (ROOT / "docker/Dockerfile").read_text()  # the CUDA wheel index
    airflow = (ROOT / "docker/airflow.Dockerfile").read_text()
    assert f"apache/airflow:{pinned('apache-airflow', 'constraints-airflow.txt')}-python3.11" in airflow
    assert "-c /opt/sd-distill/constraints-airflow.txt" in airflow


def dockerignore_keeps(path: str) -> bool:
    """Docker's rule: the last matching line decides; `!` re-includes; a directory pattern covers its files."""
    keep = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        covered = pattern == "**" or fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in path.split("/")))
        if covered:
            keep = negate
    return keep


@pytest.mark.parametrize("path, kept", [
    ("pyproject.toml", True), ("constraints.txt", True), ("README.md", True), ("src/sd_distill/cli.py", True),
    ("dags/sd_distill.py", True), ("data/prepared/manifest.json", False), ("models/teacher/model_index.json", False),
    (".venv/bin/python", False), (".venv-airflow/bin/airflow", False), ("checkpoints/teacher/step-1/x", False),
    ("mlflow.db", False), ("mlartifacts/1/x", False), (".git/HEAD", False),
    ("src/sd_distill/__pycache__/cli.cpython-311.pyc", False),
])
def test_build_context_holds_the_package_and_not_data_models_or_environments(path, kept):
    assert dockerignore_keeps(path) is kept
