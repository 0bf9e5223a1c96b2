"""k8s/: every kustomization renders, validates (kubernetes-validate --strict) and passes checkov, and the
manifests keep their promises: restricted pods, least-privilege RBAC, network policies, GPU scheduling only
in the gpu overlay, MLflow's flags (a real `mlflow server`), the repro Job's script (real bash, git, dvc), the
TrainJob's shape and the README's examples. Real tools throughout; no cluster is needed (nor reachable)."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from sd_distill import registry
from sd_distill.orchestrators import common
from sd_distill.params import PROFILE_NAMES, SECTIONS

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
LINT_BIN = ROOT / ".venv-lint" / "bin"
TRAINER_BIN = ROOT / ".venv" / "bin"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
K8S_VERSION = "1.37.0"

OVERLAYS = ["overlays/cpu", "overlays/gpu"]
TRAINJOBS = ["trainjob", "trainjob/pytorchjob"]
RENDERED = OVERLAYS + TRAINJOBS
CRD_GROUPS = ("trainer.kubeflow.org/", "kubeflow.org/")
RUNNER_SA = "sd-distill-runner"
PIPELINE_LABEL = {"app.kubernetes.io/name": "sd-distill"}
MLFLOW_LABEL = {"app.kubernetes.io/name": "mlflow"}
POSTGRES_LABEL = {"app.kubernetes.io/name": "postgres"}
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def lint_tool(name: str) -> Path:
    path = LINT_BIN / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make setup-lint`")
    return path


def trainer_tool(name: str) -> Path:
    path = TRAINER_BIN / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make setup`")
    return path


def kustomize(path: Path) -> str:
    if not Path(KUBECTL).is_file():
        pytest.fail("kubectl (with kustomize) is not installed")
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return out.stdout


@functools.cache
def _render(rel: str) -> str:
    return kustomize(K8S / rel)


def docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render(rel)) if d]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def is_crd(obj: dict) -> bool:
    return obj["apiVersion"].startswith(CRD_GROUPS)


def pod_templates(objs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) of every pod an object makes; the TrainJob's as the Trainer assembles it."""
    out = []
    for o in objs:
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
            spec = json.loads(json.dumps(o["spec"]["template"]["spec"]))
            for claim in o["spec"].get("volumeClaimTemplates", []):  # the StatefulSet controller adds these
                name = claim["metadata"]["name"]
                spec.setdefault("volumes", []).append(
                    {"name": name, "persistentVolumeClaim": {"claimName": f"{name}-{o['metadata']['name']}-0"}})
            out.append((where, o["spec"]["template"].get("metadata", {}), spec))
        elif o["kind"] == "CronJob":
            t = o["spec"]["jobTemplate"]["spec"]["template"]
            out.append((where, t.get("metadata", {}), t["spec"]))
        elif o["kind"] == "PyTorchJob":
            for role, replica in o["spec"]["pytorchReplicaSpecs"].items():
                out.append((f"{where}/{role}", replica["template"].get("metadata", {}), replica["template"]["spec"]))
        elif o["kind"] == "TrainJob":
            (node,) = [j for j in trainjob_replicated_jobs(o) if j["name"] == "node"]
            pod = node["template"]["spec"]["template"]
            spec = json.loads(json.dumps(pod["spec"]))
            (container,) = spec["containers"]  # the runtime's `node` container, with what the Trainer API sets
            container.update(image=o["spec"]["trainer"]["image"], resources=o["spec"]["trainer"]["resourcesPerNode"])
            out.append((where, pod.get("metadata", {}), spec))
    return out


def trainjob_replicated_jobs(trainjob: dict) -> list[dict]:
    (patch,) = trainjob["spec"]["runtimePatches"]
    return patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions would need more than this helper
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# -- rendering and validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", RENDERED)
def test_kustomization_renders_into_the_sd_distill_namespace(rel):
    objs = docs(rel)
    assert objs
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "sd-distill", (o["kind"], o["metadata"]["name"])


@pytest.mark.parametrize("rel", OVERLAYS)
def test_builtin_kinds_pass_kubernetes_validate_strict(rel, tmp_path):
    validate = lint_tool("kubernetes-validate")
    objs = [o for o in docs(rel) if not is_crd(o)]
    assert {"Namespace", "Deployment", "StatefulSet", "Job", "NetworkPolicy", "Role"} <= {o["kind"] for o in objs}
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(objs, sort_keys=False))
    out = subprocess.run([validate, "--strict", "--kubernetes-version", K8S_VERSION, str(rendered)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed for resource") == len(objs), out.stdout
    assert "Couldn't find schema" not in out.stdout + out.stderr
    # the control: --strict refuses a field Kubernetes does not have
    job = json.loads(json.dumps(one(objs, "Job", "sd-distill-repro")))
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    refused = subprocess.run([validate, "--strict", "--kubernetes-version", K8S_VERSION, str(bad)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "gpus" in refused.stdout + refused.stderr


@pytest.mark.parametrize("rel", TRAINJOBS)
def test_training_directories_hold_only_the_training_crd(rel):
    objs = docs(rel)
    assert [o["kind"] for o in objs] == (["TrainJob"] if rel == "trainjob" else ["PyTorchJob"])
    assert all(is_crd(o) for o in objs)  # kubernetes-validate has no schema for them: checked below instead


@pytest.fixture(scope="module")
def checkov_reports():
    checkov = lint_tool("checkov")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
           "LOG_LEVEL": "WARNING"}
    out = subprocess.run([checkov, "-d", str(K8S), "--framework", "kubernetes", "--framework", "kustomize",
                          "--skip-download", "-o", "json"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.stdout.strip(), out.stderr
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return {r["check_type"]: r for r in reports}, out.returncode


def test_checkov_finds_no_failed_check_in_the_files_nor_the_rendered_overlays(checkov_reports):
    reports, rc = checkov_reports
    assert set(reports) == {"kubernetes", "kustomize"}
    for kind, report in reports.items():
        summary = report["summary"]
        failed = [(c["check_id"], c["resource"], c["file_path"]) for c in report["results"]["failed_checks"]]
        assert summary["failed"] == 0 and not failed, (kind, failed)
        assert summary["parsing_errors"] == 0, kind
        assert summary["passed"] > 100, (kind, summary)
    assert rc == 0
    # the kustomize framework scanned what users apply: both overlays, Job included
    resources = {c["resource"] for c in reports["kustomize"]["results"]["passed_checks"]}
    for overlay in OVERLAYS:
        assert any(r.startswith(f"overlay:{overlay}:Job.sd-distill.sd-distill-repro") for r in resources), overlay


def test_every_checkov_skip_is_annotated_with_a_reason(checkov_reports):
    reports, _ = checkov_reports
    skipped = [c for r in reports.values() for c in r["results"]["skipped_checks"]]
    assert skipped
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason.split()) >= 5, (check["check_id"], check["resource"], reason)
    # the annotations on the objects, in checkov's `checkov.io/skipN: ID=reason` form
    annotated = [v for o in docs("overlays/gpu") for k, v in o["metadata"].get("annotations", {}).items()
                 if k.startswith("checkov.io/skip")]
    assert annotated and all(re.fullmatch(r"CKV2?_K8S_\d+=\S.{20,}", v) for v in annotated)


# -- what every pod promises ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", RENDERED)
def test_every_pod_template_meets_the_restricted_profile_and_more(rel):
    objs = docs(rel)
    pods = pod_templates(objs)
    assert pods
    service_accounts = {o["metadata"]["name"]: o for o in find(docs("overlays/gpu"), "ServiceAccount")}
    for where, _meta, spec in pods:
        psc = spec.get("securityContext", {})
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(field), (where, field)
        # a token only where the pod's service account may call the API; the runner's has none
        sa = spec.get("serviceAccountName", "default")
        assert spec.get("automountServiceAccountToken") is False or (
            sa == RUNNER_SA and service_accounts[sa].get("automountServiceAccountToken") is False), where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            assert set(v) - {"name"} <= RESTRICTED_VOLUME_TYPES, (where, v)
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            at = f"{where}/{c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, at
            assert sc.get("runAsUser", psc.get("runAsUser")) not in (None, 0), at
            seccomp = sc.get("seccompProfile") or psc.get("seccompProfile") or {}
            assert seccomp.get("type") == "RuntimeDefault", at
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert not sc.get("privileged"), at
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), at
            assert sc.get("readOnlyRootFilesystem") is True, at
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= set(volumes), (at, "mount of an undeclared volume")
            assert "emptyDir" in volumes[mounts["/tmp"]], (at, "a writable /tmp")  # HOME=/tmp, scratch
            home = env_of(c).get("HOME")
            assert home is None or home.get("value") == "/tmp", at
            res = c.get("resources", {})
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(key, {})), (at, key)
            image = c["image"]
            name, _, tag = image.rpartition("@")[0].rpartition(":") if "@" in image else image.rpartition(":")
            assert name and tag and tag != "latest" and re.search(r"\d", tag), (at, image)


def test_the_namespace_enforces_the_restricted_pod_security_standard():
    (ns,) = find(docs("overlays/gpu"), "Namespace")
    assert ns["metadata"]["name"] == "sd-distill"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_gpu_overlay_puts_the_job_on_one_gpu_node_and_cpu_overlay_does_not():
    gpu = one(docs("overlays/gpu"), "Job", "sd-distill-repro")["spec"]["template"]["spec"]
    cpu = one(docs("overlays/cpu"), "Job", "sd-distill-repro")["spec"]["template"]["spec"]
    (g,), (c,) = gpu["containers"], cpu["containers"]
    assert g["resources"]["limits"][common.GPU_RESOURCE] == "1"
    assert gpu["nodeSelector"] == common.GPU_NODE_SELECTOR == {"nvidia.com/gpu.present": "true"}
    assert gpu["tolerations"] == common.GPU_TOLERATIONS
    assert common.GPU_RESOURCE not in c["resources"].get("limits", {})
    assert common.GPU_RESOURCE not in c["resources"].get("requests", {})
    assert "nodeSelector" not in cpu and "tolerations" not in cpu
    for objs in (docs("overlays/cpu"), docs("overlays/gpu")):  # nothing else asks for a GPU
        for where, _meta, spec in pod_templates([o for o in objs if o["kind"] != "Job"]):
            for container in spec["containers"]:
                assert common.GPU_RESOURCE not in json.dumps(container["resources"]), where
    # the profile each overlay writes into a new project, and the image it runs
    assert env_of(g)["SD_DISTILL_PROFILE"]["value"] == "sd15"
    assert env_of(c)["SD_DISTILL_PROFILE"]["value"] == "tiny"
    assert {env_of(g)["SD_DISTILL_PROFILE"]["value"], env_of(c)["SD_DISTILL_PROFILE"]["value"]} <= set(PROFILE_NAMES)
    assert g["image"] == common.IMAGE
    assert c["image"] == common.IMAGE + "-cpu"
    assert int(g["resources"]["limits"]["memory"].removesuffix("Gi")) > int(
        c["resources"]["limits"]["memory"].removesuffix("Gi"))


def test_repro_job_retries_expires_and_mounts_the_project_caches_and_mlflow_secret():
    objs = docs("overlays/gpu")
    job = one(objs, "Job", "sd-distill-repro")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert 0 < job["spec"]["backoffLimit"] <= 5 and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == RUNNER_SA
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "sd-distill"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    assert mounts[common.ARTIFACTS_MOUNT]["persistentVolumeClaim"]["claimName"] == common.ARTIFACTS_PVC
    env = env_of(c)
    assert mounts[env["HF_HOME"]["value"]]["persistentVolumeClaim"]["claimName"] == "sd-distill-model-cache"
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    for key in common.MLFLOW_SECRET_REQUIRED + common.MLFLOW_SECRET_OPTIONAL:
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == common.MLFLOW_SECRET and ref["key"] == key
        assert ref.get("optional", False) == (key in common.MLFLOW_SECRET_OPTIONAL)
    for key, value in common.CACHE_ENV.items():  # the stage pods' caches, except Hugging Face's own volume
        if key != "HF_HOME":
            assert env[key]["value"] == value, key
    assert c["command"][:3] == ["/usr/bin/tini", "-g", "--"]  # the image's entrypoint (sd-distill) replaced
    assert c["args"][0].rstrip().endswith("exec sd-distill repro")
    pvcs = {p["metadata"]["name"]: p for p in find(objs, "PersistentVolumeClaim")}
    assert set(pvcs) == {common.ARTIFACTS_PVC, "sd-distill-model-cache"}
    for pvc in pvcs.values():
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and "storageClassName" not in pvc["spec"]


def test_repro_job_script_prepares_a_dvc_project_like_make_run(tmp_path):
    """The Job's shell script, run for real (bash, git, dvc, sd-distill) against a scratch project folder."""
    trainer_tool("sd-distill")
    (c,) = one(docs("overlays/cpu"), "Job", "sd-distill-repro")["spec"]["template"]["spec"]["containers"]
    project = tmp_path / "workspace" / "sd-distill"
    script = c["args"][0].replace(common.WORKDIR, str(project))
    assert script.count(str(project)) == 2 and "/workspace" not in script.replace(str(project), "")
    script = script.replace("exec sd-distill repro", "exec dvc status --json")  # everything but the training
    env = {**os.environ, "PATH": f"{TRAINER_BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "SD_DISTILL_PROFILE": env_of(c)["SD_DISTILL_PROFILE"]["value"], "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
           "GIT_CONFIG_NOSYSTEM": "1"}

    def run() -> dict:
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    status = run()
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params == {"profile": "tiny", **{s: {} for s in SECTIONS}}  # every section: DVC's params deps
    from sd_distill import dvcgen
    assert (project / "dvc.yaml").read_text() == dvcgen.render()
    assert (project / ".git").is_dir() and (project / ".dvc").is_dir()
    presets = "src/sd_distill/params/presets.py"
    assert (project / presets).read_bytes() == (ROOT / presets).read_bytes()
    assert not list((project / "src").rglob("__pycache__"))
    # DVC sees every stage, and every code dependency exists (none reported deleted)
    assert {s.split("@")[0] for s in status} == {s.name.split("@")[0] for s in registry.STAGES}
    code = {path: state for changes in status.values() for change in changes
            for path, state in change.get("changed deps", {}).items() if path.startswith("src/")}
    assert code and "deleted" not in code.values(), code
    # a project's params.yaml is the user's: a second run keeps it
    (project / "params.yaml").write_text("profile: smoke\n" + "".join(f"{s}: {{}}\n" for s in SECTIONS))
    run()
    assert yaml.safe_load((project / "params.yaml").read_text())["profile"] == "smoke"


# -- RBAC, secrets, network ---------------------------------------------------------------------------------

def test_launcher_role_grants_pods_and_their_logs_only():
    objs = docs("overlays/gpu")
    role = one(objs, "Role", "sd-distill-launcher")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {(("",), ("pods",)): {"create", "get", "list", "watch", "delete", "patch"},
                     (("",), ("pods/log",)): {"get", "list"}}
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    (binding,) = find(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sd-distill-launcher"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sd-distill-launcher", "namespace": "sd-distill"}]
    runner = one(objs, "ServiceAccount", RUNNER_SA)
    assert runner["automountServiceAccountToken"] is False


def test_mlflow_serves_artifacts_on_postgres_with_the_password_from_its_secret():
    objs = docs("overlays/gpu")
    deploy = one(objs, "Deployment", "mlflow")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    env = env_of(c)
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "sd-distill-postgres", "key": "password"}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert not any("POSTGRES_PASSWORD" in a or "postgresql://" in a for a in c["args"])  # not on the command line
    assert c["command"][-2:] == ["mlflow", "server"]
    assert "--serve-artifacts" in c["args"]
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in c["args"]
    config = one(objs, "ConfigMap", "sd-distill-mlflow-config")["data"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]["configMapKeyRef"]["name"] == "sd-distill-mlflow-config"
    assert config["MLFLOW_ARTIFACTS_DESTINATION"] == "/workspace/mlartifacts"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"] == common.ARTIFACTS_PVC
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    service = one(objs, "Service", "mlflow")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 5000 and port["targetPort"] in ("http", 5000)
    assert selects({"matchLabels": service["spec"]["selector"]}, deploy["spec"]["template"]["metadata"]["labels"])


def test_mlflow_server_accepts_the_deployments_arguments_and_answers_in_cluster_and_port_forward_hosts(tmp_path):
    """Runs `mlflow server` (the version the image installs) with the rendered args and ConfigMap values."""
    mlflow = trainer_tool("mlflow")
    objs = docs("overlays/gpu")
    (c,) = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    config = one(objs, "ConfigMap", "sd-distill-mlflow-config")["data"]
    values = {}
    for e in c["env"]:  # what the kubelet does: Secret and ConfigMap values, then $(VAR) in order
        src = e.get("valueFrom", {})
        if "configMapKeyRef" in src:
            values[e["name"]] = config[src["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in src:
            values[e["name"]] = "0123abcd"
        else:
            values[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], e["value"])
    assert values["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow:0123abcd@postgres:5432/mlflow"
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in c["args"]]
    port = free_port()
    artifacts = tmp_path / "mlartifacts"
    swap = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}", "--workers=2": "--workers=1",
            f"--artifacts-destination={config['MLFLOW_ARTIFACTS_DESTINATION']}": f"--artifacts-destination={artifacts}"}
    assert set(swap) <= set(args), args
    argv = [str(mlflow), "server", *(swap.get(a, a) for a in args)]
    env = {**os.environ, **{k: v for k, v in values.items() if not k.startswith("POSTGRES")},
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db", "HOME": str(tmp_path),
           "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if request(f"{base}/health") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        tracking = dotenv(K8S / "secrets/mlflow.example.env")["MLFLOW_TRACKING_URI"]
        for host in (tracking.split("://", 1)[1], "mlflow:5000", "mlflow.sd-distill.svc.cluster.local:5000",
                     "localhost:5000", "127.0.0.1:8080"):
            assert request(search, host=host) == 200, host
        assert request(search, host="rebind.attacker.example:5000") == 403
        # artifacts go through the server to MLFLOW_ARTIFACTS_DESTINATION
        upload = f"{base}/api/2.0/mlflow-artifacts/artifacts/0/run/artifacts/hello.txt"
        assert request(upload, host="mlflow.sd-distill.svc:5000", method="PUT", data=b"hi") == 200
        assert (artifacts / "0/run/artifacts/hello.txt").read_bytes() == b"hi"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, host: str | None = None, method: str = "GET", data: bytes | None = None) -> int:
    req = urllib.request.Request(url, method=method, data=data, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def dotenv(path: Path) -> dict[str, str]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def test_postgres_runs_as_the_alpine_postgres_user_with_a_read_only_root():
    objs = docs("overlays/gpu")
    sts = one(objs, "StatefulSet", "postgres")
    spec = sts["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    image, _, tag = c["image"].partition(":")
    assert image == "postgres" and re.fullmatch(r"\d+\.\d+-alpine", tag)
    assert spec["securityContext"]["runAsUser"] == 70 and spec["securityContext"]["fsGroup"] == 70
    env = env_of(c)
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    data_mount = next(p for p, m in mounts.items() if m["name"] == claim["metadata"]["name"])
    assert env["PGDATA"]["value"].startswith(data_mount.rstrip("/") + "/")  # a subdirectory (lost+found)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path in ("/var/run/postgresql", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    password = env["POSTGRES_PASSWORD_FILE"]["value"]
    secret_mount = next(p for p in mounts if password.startswith(p + "/"))
    assert volumes[mounts[secret_mount]["name"]]["secret"]["secretName"] == "sd-distill-postgres"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"][0] == "pg_isready", probe
    service = one(objs, "Service", "postgres")
    assert service["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "postgres"
    assert service["spec"]["ports"][0]["port"] == 5432


def test_network_policies_deny_ingress_and_admit_only_the_pipeline_to_mlflow_and_mlflow_to_postgres():
    objs = docs("overlays/gpu")
    policies = {p["metadata"]["name"]: p["spec"] for p in find(objs, "NetworkPolicy")}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")}

    def admitted(spec: dict) -> tuple[list[dict], set[int]]:
        (rule,) = spec["ingress"]
        return rule["from"], {p["port"] for p in rule["ports"]}

    # exactly one policy admits traffic to each of MLflow and PostgreSQL
    to_mlflow = [n for n, s in policies.items() if s.get("ingress") and selects(s["podSelector"], pods["mlflow"])]
    to_postgres = [n for n, s in policies.items() if s.get("ingress") and selects(s["podSelector"], pods["postgres"])]
    assert len(to_mlflow) == 1 and len(to_postgres) == 1
    peers, ports = admitted(policies[to_mlflow[0]])
    assert ports == {5000}
    assert {"podSelector": {"matchLabels": PIPELINE_LABEL}} in peers
    assert {"namespaceSelector": {"matchLabels": {"sd-distill/mlflow-client": "true"}}} in peers
    assert len(peers) == 2
    pipeline = peers[0]["podSelector"]
    assert selects(pipeline, pods["sd-distill-repro"]) and not selects(pipeline, pods["postgres"])
    peers, ports = admitted(policies[to_postgres[0]])
    assert ports == {5432} and peers == [{"podSelector": {"matchLabels": MLFLOW_LABEL}}]
    assert selects(peers[0]["podSelector"], pods["mlflow"])
    assert not selects(peers[0]["podSelector"], pods["sd-distill-repro"])
    # the Airflow and Kubeflow stage pods carry the label MLflow admits
    assert '"app.kubernetes.io/name": "sd-distill"' in (ROOT / "dags/sd_distill.py").read_text()
    assert 'add_pod_label(task, "app.kubernetes.io/name", "sd-distill")' in (
        ROOT / "src/sd_distill/orchestrators/kubeflow.py").read_text()
    # TrainJob and PyTorchJob nodes: admitted to MLflow, and to each other (rendezvous, NCCL)
    peers_policy = next(s for s in policies.values() if selects(s["podSelector"], {"app.kubernetes.io/component": "trainjob"})
                        and s.get("ingress"))
    for rel in TRAINJOBS:
        for where, meta, _spec in pod_templates(docs(rel)):
            labels = meta["labels"]
            assert selects(pipeline, labels), where
            assert selects(peers_policy["podSelector"], labels), where
            assert [p["podSelector"] for p in peers_policy["ingress"][0]["from"]] == [peers_policy["podSelector"]]


def test_secret_examples_hold_placeholders_for_every_key_the_manifests_read(tmp_path):
    keys: dict[str, set[str]] = {}
    for rel in RENDERED:
        for where, _meta, spec in pod_templates(docs(rel)):
            for c in spec["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref and not ref.get("optional"):
                        keys.setdefault(ref["name"], set()).add(ref["key"])
            for v in spec.get("volumes", []):
                if "secret" in v:
                    keys.setdefault(v["secret"]["secretName"], set()).update(i["key"] for i in v["secret"]["items"])
    assert keys == {"sd-distill-postgres": {"password"}, common.MLFLOW_SECRET: set(common.MLFLOW_SECRET_REQUIRED)}
    files = {"sd-distill-postgres": "postgres.example.env", common.MLFLOW_SECRET: "mlflow.example.env"}
    for secret, file in files.items():
        path = K8S / "secrets" / file
        out = subprocess.run([KUBECTL, "create", "secret", "generic", secret, "-n", "sd-distill",
                              f"--from-env-file={path}", "--dry-run=client", "-o", "json"],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": os.devnull})
        assert out.returncode == 0, out.stderr
        assert keys[secret] <= set(json.loads(out.stdout)["data"]), secret
    assert dotenv(K8S / "secrets/postgres.example.env") == {"password": "CHANGE-ME"}
    for path in (K8S / "secrets").glob("*.env"):
        for key, value in dotenv(path).items():
            assert value == "CHANGE-ME" or not re.search(r"KEY|PASSWORD|TOKEN|password", key), (path, key)
    # the example tracking URI is the Service this base creates
    objs = docs("overlays/gpu")
    uri = dotenv(K8S / "secrets/mlflow.example.env")["MLFLOW_TRACKING_URI"]
    host, _, port = uri.removeprefix("http://").partition(":")
    name, namespace, _svc = host.split(".")
    service = one(objs, "Service", name)
    assert service["metadata"]["namespace"] == namespace and int(port) == service["spec"]["ports"][0]["port"]
    allowed = one(objs, "ConfigMap", "sd-distill-mlflow-config")["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"{host}:{port}" in allowed and "localhost:*" in allowed


# -- multi-node training --------------------------------------------------------------------------------------

def _stage_and_grad_accum(env: dict) -> tuple[registry.Stage, str, int]:
    stage = registry.get(env["SD_DISTILL_STAGE"]["value"])
    key, _, value = env["SD_DISTILL_SET"]["value"].partition("=")
    return stage, key, int(value)


def _check_training_command(argv: list[str], env: dict) -> None:
    text = " ".join(argv)
    assert argv[0] == "torchrun" and "--no-python" in argv
    assert "sd-distill run $(SD_DISTILL_STAGE)" in text
    assert f"--params {common.WORKDIR}/params.yaml" in text
    assert "--set $(SD_DISTILL_SET)" in text and "--profile $(SD_DISTILL_PROFILE)" in text
    assert set(re.findall(r"\$\((\w+)\)", text)) - {"MASTER_ADDR", "MASTER_PORT"} <= set(env)


def test_trainjob_runs_one_data_parallel_stage_on_nodes_times_gpus_under_torchrun():
    (tj,) = docs("trainjob")
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and tj["kind"] == "TrainJob"
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                        "name": "torch-distributed"}
    trainer = tj["spec"]["trainer"]
    nodes, per_node = trainer["numNodes"], trainer["numProcPerNode"]
    assert isinstance(nodes, int) and nodes >= 2 and isinstance(per_node, int) and per_node >= 1
    for key in ("requests", "limits"):
        assert int(trainer["resourcesPerNode"][key][common.GPU_RESOURCE]) == per_node, key
    env = env_of(trainer)
    _check_training_command(trainer["command"] + trainer.get("args", []), env)
    assert "args" not in trainer
    stage, key, grad_accum = _stage_and_grad_accum(env)
    assert stage.name == "halve@8" and stage.resources.data_parallel
    assert key == f"{stage.params_section}.train.grad_accum"
    assert grad_accum % (nodes * per_node) == 0  # the loop deals micro-batches across every process
    assert env["SD_DISTILL_PROFILE"]["value"] == "sd15"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == common.MLFLOW_SECRET
    assert trainer["image"] == common.IMAGE
    (node,) = trainjob_replicated_jobs(tj)
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == RUNNER_SA
    assert pod["nodeSelector"] == common.GPU_NODE_SELECTOR and pod["tolerations"] == common.GPU_TOLERATIONS
    (container,) = pod["containers"]
    assert container["name"] == "node"  # the torch-distributed runtime's trainer container
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts[common.ARTIFACTS_MOUNT]["persistentVolumeClaim"]["claimName"] == common.ARTIFACTS_PVC
    assert mounts[env["HF_HOME"]["value"]]["persistentVolumeClaim"]["claimName"] == "sd-distill-model-cache"
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"


def test_pytorchjob_alternative_matches_the_trainjob():
    (job,) = docs("trainjob/pytorchjob")
    (tj,) = docs("trainjob")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    nodes = sum(r["replicas"] for r in replicas.values())
    per_node = int(job["spec"]["nprocPerNode"])
    assert (nodes, per_node) == (tj["spec"]["trainer"]["numNodes"], tj["spec"]["trainer"]["numProcPerNode"])
    for role, replica in replicas.items():
        (c,) = replica["template"]["spec"]["containers"]
        assert c["name"] == "pytorch" and c["image"] == common.IMAGE, role
        assert int(c["resources"]["limits"][common.GPU_RESOURCE]) == per_node, role
        env = env_of(c)
        _check_training_command(c["command"], env)
        assert "--master-addr=$(MASTER_ADDR)" in c["command"], role
        stage, _key, grad_accum = _stage_and_grad_accum(env)
        assert stage.resources.data_parallel and grad_accum % (nodes * per_node) == 0, role
        assert {e["name"]: e.get("value") for e in c["env"]} == {
            e["name"]: e.get("value") for e in tj["spec"]["trainer"]["env"]}, role


# -- the README's examples ----------------------------------------------------------------------------------

def readme_yaml_block(after: str) -> str:
    text = (K8S / "README.md").read_text()
    start = text.rindex("```yaml\n", 0, text.index(after))
    return text[start + len("```yaml\n"):text.index("```", start + 3)]


def render_readme_example(marker: str, base: str, folder):
    """The README's kustomization after ``marker``, written to ``folder`` (its ``../k8s/<base>`` made real)."""
    folder.mkdir()
    rel = os.path.relpath(K8S / base, folder)
    (folder / "kustomization.yaml").write_text(readme_yaml_block(marker).replace(f"../k8s/{base}", rel))
    return [d for d in yaml.safe_load_all(kustomize(folder)) if d]


def test_readme_overlay_example_sets_storage_class_image_and_s3(tmp_path):
    objs = render_readme_example("# my-cluster/kustomization.yaml", "overlays/gpu", tmp_path / "my-cluster")
    for pvc in find(objs, "PersistentVolumeClaim"):
        assert pvc["spec"]["storageClassName"] == "nfs-rwx", pvc["metadata"]["name"]
    sts = one(objs, "StatefulSet", "postgres")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    config = one(objs, "ConfigMap", "sd-distill-mlflow-config")["data"]
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    images = {c["image"] for _w, _m, spec in pod_templates(objs) for c in spec["containers"]}
    assert images == {"registry.example.com/ml/sd-distill-trainer:0.1.0", "postgres:17.6-alpine"}


def test_readme_trainjob_patch_changes_stage_nodes_and_gpus(tmp_path):
    (tj,) = render_readme_example("resources: [../k8s/trainjob]", "trainjob", tmp_path / "vpred")
    trainer = tj["spec"]["trainer"]
    env = env_of(trainer)
    stage, key, grad_accum = _stage_and_grad_accum(env)
    assert tj["metadata"]["name"] == "sd-distill-vpred" and stage.name == "vpred"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"][common.GPU_RESOURCE] == "8"
    assert key == "vpred.train.grad_accum" and grad_accum % 32 == 0


# -- the opt-in RBAC for multi-node hand-off, and the TrainJob the orchestrators build ---------------------

def test_trainjob_launcher_rbac_grants_trainjobs_only_to_the_launcher(tmp_path):
    objs = docs("trainjob-launcher")
    rendered = tmp_path / "rbac.yaml"
    rendered.write_text(yaml.safe_dump_all(objs, sort_keys=False))
    out = subprocess.run([lint_tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_VERSION,
                          str(rendered)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    role = one(objs, "Role", "sd-distill-trainjob-launcher")
    assert role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                              "verbs": ["create", "get", "list", "watch", "delete"]}]
    binding = one(objs, "RoleBinding", "sd-distill-trainjob-launcher")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sd-distill-launcher",
                                    "namespace": "sd-distill"}]


def test_the_orchestrators_trainjob_has_the_committed_trainjobs_shape_and_a_valid_pod(tmp_path):
    (committed,) = docs("trainjob")
    stage = registry.get("halve@8")
    built = common.trainjob_manifest(
        stage, name="sd-distill-halve-8-x", namespace="sd-distill", image="ghcr.io/sd-distill/trainer:0.1.0",
        profile="sd15", overrides={"halve.train.grad_accum": 8}, workdir=common.WORKDIR, pipeline_run="airflow:r",
        nodes=2, gpus_per_node=4, node_selector=common.GPU_NODE_SELECTOR, tolerations=common.GPU_TOLERATIONS)
    for key in ("apiVersion", "kind"):
        assert built[key] == committed[key]
    assert built["spec"]["runtimeRef"] == committed["spec"]["runtimeRef"]
    trainer, theirs = built["spec"]["trainer"], committed["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"][common.GPU_RESOURCE] == "4"
    assert trainer["command"][:5] == ["torchrun", "--no-python", "sd-distill", "run", "halve@8"]
    assert theirs["command"][:3] == trainer["command"][:3]
    cmd = trainer["command"]
    assert cmd[cmd.index("--params") + 1] == f"{common.WORKDIR}/params.yaml"
    assert cmd[cmd.index("--profile") + 1] == "sd15" and cmd[cmd.index("--pipeline-run") + 1] == "airflow:r"
    assert json.loads(cmd[cmd.index("--overrides") + 1]) == {"halve.train.grad_accum": 8}
    env = env_of(trainer)
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == common.MLFLOW_SECRET
    (mine,) = trainjob_replicated_jobs(built)
    (ref,) = trainjob_replicated_jobs(committed)
    assert mine["name"] == ref["name"]
    pod, ref_pod = mine["template"]["spec"]["template"], ref["template"]["spec"]["template"]
    assert pod["spec"]["containers"][0]["name"] == ref_pod["spec"]["containers"][0]["name"]
    assert pod["spec"]["containers"][0]["securityContext"] == ref_pod["spec"]["containers"][0]["securityContext"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "sd-distill"  # MLflow admits it
    # the merged pod the Trainer would create, checked like any other
    spec = json.loads(json.dumps(pod["spec"]))
    spec["containers"][0].update(image=trainer["image"], command=trainer["command"], env=trainer["env"],
                                 resources=trainer["resourcesPerNode"])
    merged = tmp_path / "pod.yaml"
    merged.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node-0"},
                                      "spec": spec}))
    out = subprocess.run([lint_tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_VERSION,
                          str(merged)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
