import json
import os
import shutil
import subprocess
import sys
import time
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


def sh(args, cwd, env, check=True):
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-3000:]}")
    return out


# -- the smoke profile through each orchestrator, once per session ------------------------------------------

@pytest.fixture(scope="session")
def rehearsal_run(tmp_path_factory):
    """The sd15 rehearsal through `sd-distill repro` (dvc repro under an MLflow parent run) in a temporary git repo:
    the sd15 preset on a local teacher with SD v1.5's structure at reduced width, 64 px, two optimizer steps per
    stage, stand-in scorers (``sd_distill.bench.rehearsal``)."""
    from sd_distill.bench import rehearsal

    base = tmp_path_factory.mktemp("e2e")
    root = rehearsal.build(base / "project")
    shutil.copytree(ROOT / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh(["git", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "init"], root, env)
    started = time.time()
    first = sh([BIN / "sd-distill", "repro"], root, env)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    return {"root": root, "env": env, "first": first, "base": base, "metrics": metrics,
            "seconds": time.time() - started}


AIRFLOW_PYTHON = ROOT / ".venv-airflow" / "bin" / "python"


@pytest.fixture(scope="session")
def airflow(tmp_path_factory):
    """Runs tests/airflow_driver.py in .venv-airflow against a freshly migrated SQLite metadata database."""
    if not AIRFLOW_PYTHON.is_file():
        pytest.fail(f"{AIRFLOW_PYTHON} is missing: `make setup-airflow` creates Airflow's environment")
    home = tmp_path_factory.mktemp("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
           "SD_DISTILL_BIN": str(BIN / "sd-distill")}
    sh([AIRFLOW_PYTHON.parent / "airflow", "db", "migrate"], home, env)

    def drive(command: str, conf: dict | None = None, extra_env: dict | None = None) -> dict:
        out = sh([AIRFLOW_PYTHON, ROOT / "tests" / "airflow_driver.py", command, json.dumps(conf or {})],
                 home, {**env, **(extra_env or {})})
        return json.loads(out.stdout.strip().splitlines()[-1])

    def cli(*args: str):
        return sh([AIRFLOW_PYTHON.parent / "airflow", *args], home, env, check=False)

    drive.cli = cli
    return drive


@pytest.fixture(scope="session")
def airflow_run(airflow, tmp_path_factory):
    """dag.test() of the smoke profile in local mode: every stage runs `sd-distill run` on the "worker"."""
    base = tmp_path_factory.mktemp("airflow-run")
    project = base / "project"
    project.mkdir()
    uri = f"sqlite:///{base / 'mlflow.db'}"
    result = airflow("run", {"profile": "smoke", "mode": "local"},
                     {"SD_DISTILL_PROJECT": str(project), "MLFLOW_TRACKING_URI": uri})
    return {**result, "root": project, "tracking_uri": uri}


@pytest.fixture(scope="session")
def kfp_run(tmp_path_factory):
    """The compiled pipeline's components run by kfp.local's SubprocessRunner (this environment's Python)."""
    from kfp import local

    from sd_distill.orchestrators import kubeflow

    base = tmp_path_factory.mktemp("kfp-run")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(base / "pipeline-root"))
    started = time.time()
    task = kubeflow.build()(profile="smoke", workdir=str(base / "project"), gpus=0)
    return {"task": task, "root": base / "project", "seconds": time.time() - started,
            "metrics": json.loads((base / "project" / "reports" / "metrics.json").read_text())}
