import functools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


# -- the three orchestrator runs, in the background -------------------------------------------------------------
# The sd15 rehearsal through DVC and the smoke DAG through Airflow and through kfp.local are each a chain of stage
# processes (about 2.5 to 3 minutes each on 2 cores) that shares nothing with the other tests. So the session starts
# the runs its tests need at once, one after another in one background thread, and moves the tests that read them
# to the end: the rest of the suite runs on one core while the runs use the other. The runs' processes get one
# thread each (two multi-threaded torch processes on two cores wait on each other's spinning threads).
BACKGROUND = ("rehearsal_run", "airflow_run", "kfp_run")  # in the order they run
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
AIRFLOW_PYTHON = ROOT / ".venv-airflow" / "bin" / "python"


def pytest_collection_modifyitems(config, items):
    """Tests that read a background run go last, ordered by the last run they need (stable otherwise)."""
    def last_run(item) -> int:
        return max((BACKGROUND.index(n) for n in BACKGROUND if n in item.fixturenames), default=-1)

    items.sort(key=last_run)


class Background:
    """Jobs run one at a time in a thread; ``result(name)`` waits for one. Closing stops what still runs."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchestrator-runs")
        self._jobs: dict[str, Future] = {}
        self._procs: list[subprocess.Popen] = []
        self._closed = False

    def submit(self, name: str, job) -> None:
        self._jobs[name] = self._pool.submit(job)

    def result(self, name: str):
        if name not in self._jobs:
            raise KeyError(f"{name} was not started: is it in conftest.BACKGROUND?")
        return self._jobs[name].result()

    def sh(self, args, cwd, env) -> subprocess.CompletedProcess:
        """``sh`` in the background: one thread per process, and stopped by ``close``."""
        if self._closed:
            raise RuntimeError("the session is over")
        proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env={**env, **ONE_THREAD}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._procs.append(proc)
        stdout, stderr = proc.communicate()
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if out.returncode:
            raise AssertionError(f"{' '.join(map(str, args))} failed ({out.returncode}):\n{stdout[-3000:]}\n"
                                 f"{stderr[-3000:]}")
        return out

    def close(self) -> None:
        self._closed = True
        for job in self._jobs.values():
            job.cancel()
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        self._pool.shutdown(wait=True)


def git_env(base: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def rehearsal_job(bg: Background, base: Path):
    """The sd15 rehearsal through `sd-distill repro` (dvc repro under an MLflow parent run) in a temporary git repo:
    the sd15 preset on a local teacher with SD v1.5's structure at reduced width, 64 px, two optimizer steps per
    stage, stand-in scorers (``sd_distill.bench.rehearsal``)."""
    env = git_env(base)
    root = base / "project"
    bg.sh([sys.executable, "-c", "import sys; from pathlib import Path; from sd_distill.bench import rehearsal; "
           "rehearsal.build(Path(sys.argv[1]))", root], base, env)
    shutil.copytree(ROOT / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    bg.sh(["git", "init", "-q"], root, env)
    bg.sh(["git", "add", "-A"], root, env)
    bg.sh(["git", "commit", "-qm", "init"], root, env)
    started = time.time()
    first = bg.sh([BIN / "sd-distill", "repro"], root, env)
    seconds = time.time() - started
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    registration = json.loads((root / "reports" / "registration.json").read_text())  # the reruns register again
    # then what tests/test_e2e.py checks of later runs (here, so that the reruns also overlap the other tests):
    # a second `dvc repro` with nothing changed, and one after an evaluate param changed
    lock = (root / "dvc.lock").read_text()
    again = bg.sh([BIN / "dvc", "repro"], root, env)
    again_lock = (root / "dvc.lock").read_text()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["latency_repeats"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    changed = bg.sh([BIN / "dvc", "repro"], root, env)
    return {"root": root, "env": env, "first": first, "base": base, "metrics": metrics, "seconds": seconds,
            "registration": registration, "again": again, "lock_before_again": lock,
            "lock_after_again": again_lock,
            "changed": changed, "changed_metrics": json.loads((root / "reports" / "metrics.json").read_text())}


def airflow_env(home: Path) -> dict:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "SD_DISTILL_BIN": str(BIN / "sd-distill")}


def airflow_job(bg: Background, base: Path):
    """dag.test() of the smoke profile in local mode: every stage runs `sd-distill run` on the "worker" (an
    Airflow home of its own, so the tests that drive Airflow meanwhile do not share its SQLite database)."""
    if not AIRFLOW_PYTHON.is_file():
        raise AssertionError(f"{AIRFLOW_PYTHON} is missing: `make setup-airflow` creates Airflow's environment")
    home, project = base / "home", base / "project"
    home.mkdir()
    project.mkdir()
    uri = f"sqlite:///{base / 'mlflow.db'}"
    env = airflow_env(home)
    bg.sh([AIRFLOW_PYTHON.parent / "airflow", "db", "migrate"], home, env)
    out = bg.sh([AIRFLOW_PYTHON, ROOT / "tests" / "airflow_driver.py", "run",
                 json.dumps({"profile": "smoke", "mode": "local"})], home,
                {**env, "SD_DISTILL_PROJECT": str(project), "MLFLOW_TRACKING_URI": uri})
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "root": project, "tracking_uri": uri}


def kfp_job(bg: Background, base: Path):
    """The compiled pipeline's components run by kfp.local's SubprocessRunner (tests/kfp_driver.py)."""
    uri = f"sqlite:///{base / 'mlflow.db'}"  # its own store: the tests that run meanwhile write the session's
    out = bg.sh([sys.executable, ROOT / "tests" / "kfp_driver.py", base], base,
                {**os.environ, "MLFLOW_TRACKING_URI": uri})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    root = base / "project"
    return {**result, "root": root, "tracking_uri": uri,
            "metrics": json.loads((root / "reports" / "metrics.json").read_text())}


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory, mlflow_store):
    """Starts the background runs that the collected tests need (none for a run of other tests only)."""
    needed = {n for item in request.session.items for n in BACKGROUND if n in item.fixturenames}
    jobs = {"rehearsal_run": ("e2e", rehearsal_job), "airflow_run": ("airflow-run", airflow_job),
            "kfp_run": ("kfp-run", kfp_job)}
    bg = Background()
    for name in BACKGROUND:
        if name in needed:
            folder, job = jobs[name]
            bg.submit(name, functools.partial(job, bg, tmp_path_factory.mktemp(folder)))
    yield bg
    bg.close()


@pytest.fixture(scope="session")
def rehearsal_run(background):
    return background.result("rehearsal_run")


@pytest.fixture(scope="session")
def airflow_run(background):
    return background.result("airflow_run")


@pytest.fixture(scope="session")
def kfp_run(background):
    return background.result("kfp_run")


@pytest.fixture(scope="session")
def airflow(tmp_path_factory):
    """Runs tests/airflow_driver.py in .venv-airflow against a freshly migrated SQLite metadata database."""
    if not AIRFLOW_PYTHON.is_file():
        pytest.fail(f"{AIRFLOW_PYTHON} is missing: `make setup-airflow` creates Airflow's environment")
    home = tmp_path_factory.mktemp("airflow")
    env = airflow_env(home)
    sh([AIRFLOW_PYTHON.parent / "airflow", "db", "migrate"], home, env)

    def drive(command: str, conf: dict | None = None, extra_env: dict | None = None) -> dict:
        out = sh([AIRFLOW_PYTHON, ROOT / "tests" / "airflow_driver.py", command, json.dumps(conf or {})],
                 home, {**env, **(extra_env or {})})
        return json.loads(out.stdout.strip().splitlines()[-1])

    def cli(*args: str):
        return sh([AIRFLOW_PYTHON.parent / "airflow", *args], home, env, check=False)

    drive.cli = cli
    return drive
