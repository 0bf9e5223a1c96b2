"""Security (#8, items 8-10): no code runs from a file we load, no credential leaks, static checks pass.

- A scan of the source (``ast``) for loads that execute code: ``torch.load`` without ``weights_only=True``,
  pickle, ``trust_remote_code``, ``yaml.load`` without a safe loader, ``eval``/``exec``, a shell.
- bandit on the package: every finding fixed or skipped with ``# nosec BXXX: <reason>``.
- pip-audit on the pinned dependencies against PyPI's vulnerability data; accepted findings, each with its
  reason, are listed in ``.pip-audit-ignore``. Skipped, saying why, where the service cannot be reached.
- Canary credentials in the environment appear in none of a stage's output, its MLflow run, the compiled
  Kubeflow pipeline or the Airflow DAG's rendered pods, and the pods get MLflow's credentials only from a Secret.
"""

from __future__ import annotations

import ast
import concurrent.futures
import io
import json
import os
import re
import secrets
import subprocess
import time
import tokenize
import warnings
from pathlib import Path

import pytest

from sd_distill.orchestrators import common
from tests.conftest import BIN, ROOT, write_params

LINT_BIN = ROOT / ".venv-lint" / "bin"


def lint_tool(name: str) -> Path:
    path = LINT_BIN / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make setup-lint`")
    return path


# -- item 8: no code execution from files -----------------------------------------------------------------

SCANNED = ("src", "dags", "components")
PICKLES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
UNPICKLE = {f"{m}.{f}" for m in PICKLES for f in ("load", "loads", "Unpickler")} | {"joblib.load",
                                                                                    "pandas.read_pickle"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
SUBPROCESS = {f"subprocess.{f}" for f in ("run", "call", "check_call", "check_output", "Popen")}
ALWAYS_SHELL = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}
EVAL = {"eval", "exec", "builtins.eval", "builtins.exec"}
RULES = ("torch-load", "pickle", "trust-remote-code", "yaml-load", "eval-exec", "shell")


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (``import torch as T``: T -> torch)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _qualname(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _qualname(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _safe_loaders(tree: ast.AST, aliases: dict[str, str]) -> set[str]:
    """PyYAML's safe loaders, and the module's classes whose every base is one (``class L(yaml.SafeLoader)``)."""
    safe, classes = set(SAFE_YAML_LOADERS), [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    while grown := {c.name for c in classes if c.name not in safe and c.bases
                    and all(_qualname(b, aliases) in safe for b in c.bases)}:
        safe |= grown
    return safe


def unsafe_calls(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, rule) of every call in ``source`` that can execute code from a file or a string."""
    tree = ast.parse(source, filename)
    aliases, found = _aliases(tree), []
    safe_loaders = _safe_loaders(tree, aliases)
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = _qualname(call.func, aliases)
        kw = {k.arg: k.value for k in call.keywords}
        if "trust_remote_code" in kw and not _is_const(kw["trust_remote_code"], False):
            found.append((call.lineno, "trust-remote-code"))
        if name == "torch.load" and not _is_const(kw.get("weights_only"), True):
            found.append((call.lineno, "torch-load"))
        elif name in UNPICKLE or (name == "numpy.load" and not _is_const(kw.get("allow_pickle", ast.Constant(False)),
                                                                         False)):
            found.append((call.lineno, "pickle"))
        elif name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader", call.args[1] if len(call.args) > 1 else None)
            if loader is None or _qualname(loader, aliases) not in safe_loaders:
                found.append((call.lineno, "yaml-load"))
        elif name in UNSAFE_YAML:
            found.append((call.lineno, "yaml-load"))
        elif name in EVAL:
            found.append((call.lineno, "eval-exec"))
        elif name in ALWAYS_SHELL or (name in SUBPROCESS and "shell" in kw and not _is_const(kw["shell"], False)):
            found.append((call.lineno, "shell"))
    return sorted(found)


# The scanner's own test file: unsafe calls as data (callee, arguments, the rule that must flag it, None for the safe
# forms), written out to a temporary file and parsed, never run.
PLANTED_HEADER = """\
import os, pickle, subprocess
import numpy as np
import torch as T
import yaml
from transformers import AutoModel
from yaml import load as yload


class Strict(yaml.SafeLoader): ...
class Loose(yaml.Loader): ...
class Looser(Loose): ...

"""
PLANTED_CALLS = [
    ("T.load", '"w.pt"', "torch-load"),
    ("T.load", '"w.pt", weights_only=False', "torch-load"),
    ("T.load", '"w.pt", **options', "torch-load"),
    ("pickle.loads", "blob", "pickle"),
    ("np.load", '"a.npy", allow_pickle=True', "pickle"),
    ("AutoModel.from_pretrained", '"./local-model", trust_remote_code=True', "trust-remote-code"),
    ("yaml.load", "text", "yaml-load"),
    ("yload", "text, Loader=yaml.Loader", "yaml-load"),
    ("yaml.full_load", "text", "yaml-load"),
    ("yaml.load", "text, Loader=Looser", "yaml-load"),
    ("eval", '"1 + 1"', "eval-exec"),
    ("exec", '"x = 1"', "eval-exec"),
    ("subprocess.run", '"ls " + path, shell=True', "shell"),
    ("os.system", '"ls"', "shell"),
    ("T.load", '"w.pt", weights_only=True', None),
    ("np.load", '"a.npy"', None),
    ("yaml.load", "text, Loader=yaml.SafeLoader", None),
    ("yaml.load", "text, Loader=Strict", None),
    ("yaml.safe_load", "text", None),
    ("subprocess.run", '["ls", path], shell=False', None),
    ("AutoModel.from_pretrained", '"./local-model", trust_remote_code=False', None),
    ("model.eval", "", None),
    ("ast.literal_eval", '"1"', None),
]


def test_source_scan_catches_a_planted_example_of_every_unsafe_load(tmp_path):
    first = PLANTED_HEADER.count("\n") + 1
    planted = tmp_path / "planted.py"
    planted.write_text(PLANTED_HEADER + "".join(f"{callee}({args})\n" for callee, args, _ in PLANTED_CALLS))
    expected = sorted((first + i, rule) for i, (_, _, rule) in enumerate(PLANTED_CALLS) if rule)
    assert {rule for _, rule in expected} == set(RULES)
    assert unsafe_calls(planted.read_text(), str(planted)) == expected


def test_no_source_file_loads_code_from_a_file_or_string():
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert ROOT / "src/sd_distill/cli.py" in files and ROOT / "dags/sd_distill.py" in files
    found = [f"{p.relative_to(ROOT)}:{line}: {rule}" for p in files
             for line, rule in unsafe_calls(p.read_text(), str(p))]
    assert found == [], "unsafe loads (safetensors, weights_only=True, yaml.safe_load, an argument list):\n" + \
        "\n".join(found)


# -- item 10: bandit ----------------------------------------------------------------------------------------

NOSEC = re.compile(r"#\s*nosec\s+B\d{3}(,\s*B\d{3})*:\s+\S")


def test_bandit_finds_nothing_unjustified_in_the_package():
    out = subprocess.run([lint_tool("bandit"), "-r", "src/sd_distill", "-f", "json", "-q"], cwd=ROOT,
                         capture_output=True, text=True)
    report = json.loads(out.stdout)
    assert report["errors"] == []
    assert report["metrics"]["_totals"]["loc"] > 1000  # it read the package
    findings = [f"{r['filename']}:{r['line_number']}: {r['test_id']} {r['issue_severity'].lower()}: "
                f"{r['issue_text']}" for r in report["results"]]
    assert findings == [], ("bandit: fix each, or where it is a false positive say why on its line with "
                            "`# nosec BXXX: <reason>`:\n" + "\n".join(findings))


def test_every_bandit_skip_names_its_check_and_a_reason():
    bare = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.COMMENT and "nosec" in tok.string.lower() and not NOSEC.search(tok.string):
                bare.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.string}")
    assert bare == [], "write `# nosec BXXX: <reason>`:\n" + "\n".join(bare)


# -- item 10: pip-audit -------------------------------------------------------------------------------------

PINNED = ("constraints.txt", "constraints-airflow.txt")
IGNORE_FILE = ROOT / ".pip-audit-ignore"
# CVE-2018-18074: requests 2.19.0 sends the Authorization header on a redirect from https to http
KNOWN_VULNERABLE = ("requests", "2.19.0", {"PYSEC-2018-28", "GHSA-x84v-xcm2-53pg", "CVE-2018-18074"})
SERVICES = ("pypi", "osv")  # PyPI's per-version JSON API, else api.osv.dev
AUDIT_PROCESSES = 6  # one HTTP request per pin: a few processes at once cut the wait, not the CPU


def pip_audit(pins: list[tuple[str, str]], service: str, folder: Path) -> tuple[list[dict], str]:
    """pip-audit's JSON ``dependencies`` for ``pins`` (no resolution, no pip, no venv), and its stderr."""
    folder.mkdir(parents=True, exist_ok=True)
    requirements = folder / "requirements.txt"
    requirements.write_text("".join(f"{n}=={v}\n" for n, v in pins))
    out = subprocess.run([lint_tool("pip-audit"), "--vulnerability-service", service, "-r", requirements,
                          "--no-deps", "--disable-pip", "--progress-spinner", "off", "--format", "json",
                          "--aliases", "on", "--desc", "off", "--timeout", "20", "--cache-dir", folder / "cache"],
                         capture_output=True, text=True)
    try:
        return json.loads(out.stdout)["dependencies"], out.stderr
    except (json.JSONDecodeError, KeyError):
        return [], out.stderr or out.stdout


@pytest.fixture(scope="module")
def audit_service(tmp_path_factory):
    """The first vulnerability service that reports the known-vulnerable pin; skips if none answers."""
    base, why = tmp_path_factory.mktemp("pip-audit"), []
    name, version, ids = KNOWN_VULNERABLE
    for service in SERVICES:
        deps, err = pip_audit([(name, version)], service, base / f"probe-{service}")
        dep = next((d for d in deps if d["name"] == name), None)
        if dep is None or "skip_reason" in dep:
            last = (dep or {}).get("skip_reason") or (err.strip().splitlines() or ["no output"])[-1]
            why.append(f"{service}: {last[:200]}")
            continue
        reported = {i for v in dep["vulns"] for i in (v["id"], *v.get("aliases", []))}
        assert reported & ids, f"pip-audit ({service}) audited {name}=={version} and missed {sorted(ids)}"
        return service, base
    pytest.skip("pip-audit cannot reach a vulnerability service from here, so no pin was audited: "
                + "; ".join(why))


def pin(name: str, version: str) -> tuple[str, str]:
    """As pip-audit names a dependency: canonical name, normalised version."""
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    return canonicalize_name(name), str(Version(version))


def read_pins(path: Path) -> list[tuple[str, str]]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [pin(*line.split("==")) for line in lines if line]


def read_ignores() -> dict[str, str]:
    """``.pip-audit-ignore``: an advisory ID, whitespace, the reason it is accepted; ``#`` comments."""
    ignores = {}
    for n, line in enumerate(IGNORE_FILE.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            vuln_id, _, reason = line.partition(" ")
            assert reason.strip(), f"{IGNORE_FILE.name}:{n}: {vuln_id} has no reason"
            ignores[vuln_id] = reason.strip()
    return ignores


def test_pip_audit_reports_a_known_vulnerable_pin(audit_service):
    service, _ = audit_service  # the fixture audited requests 2.19.0 and checked CVE-2018-18074 was reported
    assert service in SERVICES


def test_pinned_dependencies_have_no_unaccepted_known_vulnerabilities(audit_service):
    service, base = audit_service
    ignores = read_ignores()
    where: dict[tuple[str, str], list[str]] = {}  # each pin once, with the files that hold it
    for path in PINNED:
        for name_version in read_pins(ROOT / path):
            where.setdefault(name_version, []).append(path)
    chunks: list[dict[str, str]] = [{} for _ in range(AUDIT_PROCESSES)]
    for name, version in sorted(where):  # a name at most once per requirements file
        min((c for c in chunks if name not in c), key=len)[name] = version
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(AUDIT_PROCESSES) as pool:
        results = list(pool.map(lambda k: pip_audit(sorted(chunks[k].items()), service, base / f"pins-{k}"),
                                range(AUDIT_PROCESSES)))
    seconds = time.time() - started
    deps = [d for chunk_deps, _ in results for d in chunk_deps]
    unaudited = [f"{d['name']}: {d['skip_reason']}" for d in deps if "skip_reason" in d]
    missing = sorted(set(where) - {pin(d["name"], d["version"]) for d in deps if "vulns" in d})
    found, accepted, seen = [], [], set()
    for d in deps:
        for v in d.get("vulns", []):
            ids = {v["id"], *v.get("aliases", [])}
            seen |= ids
            files = ", ".join(where.get(pin(d["name"], d["version"]), []))
            line = (f"{d['name']}=={d['version']} ({files}): {v['id']} (aliases "
                    f"{', '.join(v.get('aliases', [])) or '-'}; fixed in {', '.join(v['fix_versions']) or '-'})")
            reason = next((ignores[i] for i in sorted(ids) if i in ignores), None)
            (accepted if reason else found).append(f"{line}: accepted: {reason}" if reason else line)
    print(f"pip-audit via {service}: {len(where) - len(missing)} pins in {seconds:.1f} s; "
          f"{len(found)} unaccepted, {len(accepted)} accepted finding(s)")
    for line in found + accepted:
        print("  " + line)
    if accepted:
        warnings.warn("pip-audit: accepted known vulnerabilities in our pins:\n" + "\n".join(accepted))
    stale = sorted(set(ignores) - seen)
    if stale:
        warnings.warn(f"{IGNORE_FILE.name}: no longer reported, remove: {', '.join(stale)}")
    assert missing == [], f"pins pip-audit did not audit: {missing}; it said: {unaudited}"
    assert found == [], (f"known vulnerabilities in our pins: upgrade the pin, or list the ID in "
                         f"{IGNORE_FILE.name} with the reason it cannot be upgraded yet:\n" + "\n".join(found))


# -- item 9: secrets stay secret ----------------------------------------------------------------------------

# The secrets a user holds. Not MLFLOW_TRACKING_USERNAME: a name, not a secret; MLflow records it as a run's
# `mlflow.user` tag on purpose (the Secret still carries it, and the pods' check below covers it).
CREDENTIAL_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AZURE_STORAGE_CONNECTION_STRING")
MLFLOW_KEYS = (*common.MLFLOW_SECRET_REQUIRED, *common.MLFLOW_SECRET_OPTIONAL)


@pytest.fixture(scope="module")
def canary():
    """A random token, and the environment of a user holding credentials that contain it."""
    token = f"sdcanary{secrets.token_hex(12)}"
    env = {var: f"{token}-{var.lower()}" for var in CREDENTIAL_VARS}
    env["AZURE_STORAGE_CONNECTION_STRING"] = (f"DefaultEndpointsProtocol=https;AccountName=sddistill;"
                                              f"AccountKey={token};EndpointSuffix=core.windows.net")
    return token, env


def leaks(token: str, *places: Path) -> list[str]:
    """Every file under ``places`` whose bytes contain ``token``."""
    files = [f for p in places for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    assert files, f"nothing to search in {places}"
    return [str(f) for f in files if token.encode() in f.read_bytes()]


def test_canary_credentials_stay_out_of_a_stage_run_its_logs_and_mlflow(canary, mlflow_store, tmp_path):
    import mlflow

    token, credentials = canary
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, prepare={"max_images": 120, "classifier": {"epochs": 1}})
    marker = f"secrets-test-{secrets.token_hex(6)}"  # finds the run and proves the searches read its data
    env = {**os.environ, **credentials, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run([BIN / "sd-distill", "-v", "run", "prepare", "--pipeline-run", marker], cwd=project,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert token not in out.stdout and token not in out.stderr

    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("sd-distill")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`sd_distill.pipeline_run` = '{marker}'")
    assert run.data.params and run.data.tags["sd_distill.stage"] == "prepare"
    for key, value in {**run.data.params, **run.data.tags}.items():
        assert token not in key and token not in value, key
    store = Path(mlflow_store.removeprefix("sqlite:///"))
    db = [f for f in store.parent.iterdir() if f.name.startswith(store.name)]  # mlflow.db and any -wal/-journal
    assert any(marker.encode() in f.read_bytes() for f in db)
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "art"),
                                                         tracking_uri=mlflow_store))
    assert (artifacts / "params.json").is_file()
    assert leaks(token, *db, artifacts, project) == []
    assert (project / "data").is_dir()


def test_canary_credentials_stay_out_of_the_compiled_kubeflow_pipeline(canary, tmp_path):
    import yaml

    token, credentials = canary
    out = tmp_path / "pipeline.yaml"
    env = {**os.environ, **credentials, "MLFLOW_TRACKING_URI": f"https://user:{token}@mlflow.example"}
    done = subprocess.run([BIN / "sd-distill", "kfp", "compile", "--out", out], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert token not in out.read_text() + done.stdout + done.stderr
    pipeline, platform = yaml.safe_load_all(out.read_text())
    for executor in pipeline["deploymentSpec"]["executors"].values():
        names = {e["name"] for e in executor["container"].get("env", [])}
        assert not names & {*MLFLOW_KEYS, *CREDENTIAL_VARS}, names
    for name, executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        from_secret = {k["envVar"] for s in executor.get("secretAsEnv", []) if s["secretName"] == common.MLFLOW_SECRET
                       for k in s["keyToEnv"]}
        assert from_secret == set(MLFLOW_KEYS), name


def env_lists(tree) -> list[list[dict]]:
    """Every container ``env`` list in a rendered pod or TrainJob."""
    if isinstance(tree, dict):
        own = [tree["env"]] if isinstance(tree.get("env"), list) else []
        return own + [e for v in tree.values() for e in env_lists(v)]
    return [e for v in tree for e in env_lists(v)] if isinstance(tree, list) else []


def test_canary_credentials_stay_out_of_airflow_pods_which_get_mlflow_credentials_from_the_secret(canary,
                                                                                                 airflow):
    token, credentials = canary
    rendered = airflow("pods", {"mode": "kubernetes", "profile": "sd15", "gpus": 2, "nodes": 2, "namespace": "ml"},
                       {**credentials, "MLFLOW_TRACKING_URI": f"https://user:{token}@mlflow.example"})
    assert rendered["errors"] == {} and rendered["pods"] and rendered["trainjobs"]
    assert token not in json.dumps(rendered)
    for task_id, spec in [*rendered["pods"].items(), *rendered["trainjobs"].items()]:
        envs = env_lists(spec)
        assert envs, task_id
        for env in envs:
            by_name = {e["name"]: e for e in env}
            assert set(MLFLOW_KEYS) <= set(by_name), (task_id, sorted(by_name))
            for name in set(by_name) & {*MLFLOW_KEYS, *CREDENTIAL_VARS}:
                entry = by_name[name]
                assert "value" not in entry, (task_id, name)
                assert entry["valueFrom"]["secretKeyRef"] == {
                    "name": common.MLFLOW_SECRET, "key": name, "optional": name not in common.MLFLOW_SECRET_REQUIRED}
