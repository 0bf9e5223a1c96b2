import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: sd-distill and dvc live here


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """One real MLflow SQLite store for the session (created once: its migrations take seconds)."""
    store = tmp_path_factory.mktemp("mlflow")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield os.environ["MLFLOW_TRACKING_URI"]
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def write_params(folder: Path, profile: str = "smoke", **sections) -> Path:
    path = folder / "params.yaml"
    from sd_distill.params import SECTIONS

    body = {"profile": profile, **{name: {} for name in SECTIONS}}
    body.update(sections)
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory):
    """A project folder where every stage before evaluate ran once on the smoke profile (shared, read-only)."""
    from sd_distill import registry
    from sd_distill.params import resolve
    from sd_distill.runner import run_stage

    root = tmp_path_factory.mktemp("smoke")
    params = resolve(write_params(root))
    for stage in registry.STAGES:
        if stage.name in ("evaluate", "register"):  # the reporting tail; tests run it on copies
            break
        run_stage(stage.name, params, root)
    return root
