"""What Airflow and Kubeflow share about a stage: its name, its command line and the pod it runs in.

Both orchestrators build from ``registry.STAGES`` through this module, so they run the same stages with the
same edges and the same ``sd-distill run`` command that ``dvc repro`` runs. Imports no torch, no airflow and
no kfp: the DAG file reads it at parse time.

Run parameters (both orchestrators): ``profile`` and ``overrides`` (``{"section.key": value}``) go on the
command line as ``--profile`` and ``--overrides`` and are layered on top of the project's ``params.yaml``
(absent is fine: the profile's preset). The orchestrated run's id goes as ``--pipeline-run``: it tags
the MLflow runs and makes a retry resume from the stage's last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sd_distill import registry
from sd_distill.hashing import file_hashes, sha256_file
from sd_distill.params import PROFILE_NAMES, SECTIONS

log = logging.getLogger("sd_distill")


def terminated_exit_code(pod: Any, container: str) -> int | None:
    """The exit status of ``container`` in a finished pod (a ``kubernetes.client.V1Pod``); None if unknown."""
    statuses = getattr(getattr(pod, "status", None), "container_statuses", None) or []
    for status in statuses:
        terminated = getattr(getattr(status, "state", None), "terminated", None)
        if status.name == container and terminated is not None:
            return terminated.exit_code
    return None

# The cluster-side contract (the k8s/ manifests create these): one image runs every stage.
IMAGE = "ghcr.io/sd-distill/trainer:0.1.0"
ARTIFACTS_PVC = "sd-distill-artifacts"  # ReadWriteMany: data, checkpoints, models, reports of every run
ARTIFACTS_MOUNT = "/workspace"
WORKDIR = f"{ARTIFACTS_MOUNT}/sd-distill"  # the project folder (params.yaml, data/, models/, reports/)
# tracking URI and credentials; never a run parameter
MLFLOW_SECRET = "sd-distill-mlflow"  # nosec B105: the Secret's name, not a credential
MLFLOW_SECRET_REQUIRED = ("MLFLOW_TRACKING_URI",)
MLFLOW_SECRET_OPTIONAL = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
RUN_AS_USER = 1000  # the trainer image's non-root user (docker/Dockerfile)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
# Paths inside the pod, each an emptyDir of its own (no other user shares them), not this host's temp folders
SHM_MOUNT = "/dev/shm"  # nosec B108: a pod-private emptyDir mount path
TMP_MOUNT = "/tmp"  # nosec B108: a pod-private emptyDir mount path
SHM_LIMIT = "8Gi"  # /dev/shm for DataLoader workers: a memory-backed emptyDir
RETRIES = 2  # attempts after the first; each resumes from the stage's last checkpoint
RETRY_DELAY_S = 60
# The root filesystem is read-only: every cache lives on the artifacts volume or in /tmp (an emptyDir).
CACHE_ENV = {
    "HOME": TMP_MOUNT,
    "HF_HOME": f"{ARTIFACTS_MOUNT}/.cache/huggingface",
    "XDG_CACHE_HOME": f"{ARTIFACTS_MOUNT}/.cache",
    "TRITON_CACHE_DIR": f"{ARTIFACTS_MOUNT}/.cache/triton",
    "MPLCONFIGDIR": f"{TMP_MOUNT}/matplotlib",
}
# What a run hands its user: surfaced by Kubeflow as the pipeline's Output[Model] and Output[Metrics].
DELIVERABLES = {"student": "models/student", "metrics": "reports/metrics.json"}
PIPELINE_RUN_ENV = "SD_DISTILL_PIPELINE_RUN"
# what a Kubeflow component needs to start a TrainJob like itself (set on its pod)
NAMESPACE_ENV, IMAGE_ENV = "SD_DISTILL_NAMESPACE", "SD_DISTILL_IMAGE"
NODE_SELECTOR_ENV, TOLERATIONS_ENV = "SD_DISTILL_NODE_SELECTOR", "SD_DISTILL_TOLERATIONS"
ARGO_WORKFLOW_FIELD = "metadata.labels['workflows.argoproj.io/workflow']"  # a Kubeflow run's pods carry it


def task_name(stage: str) -> str:
    """The stage's name where ``@`` is not allowed (Airflow task ids, Kubeflow tasks): ``halve@32`` -> ``halve-32``."""
    return stage.replace("@", "-")


def uses_gpu(stage: registry.Stage) -> bool:
    """Stages that train or sample a model get the run's GPUs (assemble samples its two one-step candidates); prepare
    never needs one."""
    return stage.resources.gpus_sd15 > 0


def gpus_for(stage: registry.Stage, gpus: int) -> int:
    """GPUs a stage's pod gets from a run with ``gpus``: training stages all of them, sampling stages one."""
    if not uses_gpu(stage):
        return 0
    return gpus if stage.resources.data_parallel else min(gpus, 1)


def launcher(stage: registry.Stage, gpus: int) -> list[str]:
    """The program that runs ``sd-distill`` args: itself, or torchrun with a process per GPU.

    A training stage given several GPUs runs data-parallel on one node (``train.grad_accum`` must be a
    multiple of the GPU count); for several nodes, hand the stage to the TrainJob in ``k8s/trainjob``.
    """
    n = gpus_for(stage, gpus)
    if n > 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={n}", "-m", "sd_distill"]
    return ["sd-distill"]


def stage_args(stage: str, *, profile: str, overrides: dict[str, Any], workdir: str,
               pipeline_run: str | None) -> list[str]:
    """Arguments of ``sd-distill`` that run ``stage`` for an orchestrator (the project is ``workdir``)."""
    args = ["run", stage, "--params", f"{workdir.rstrip('/')}/params.yaml", "--profile", profile,
            "--overrides", json.dumps(overrides, sort_keys=True)]
    return [*args, "--pipeline-run", pipeline_run] if pipeline_run else args


OVERRIDE_KEY_PATTERN = rf"^({'|'.join(SECTIONS)})\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$"

# JSON schemas of the run parameters (Airflow validates its Params with them; the CLI checks again).
PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "profile": {"type": "string", "enum": list(PROFILE_NAMES),
                "description": "params preset: tiny (CPU, minutes), smoke (tests), sd15 (Stable Diffusion v1.5, GPUs)"},
    "overrides": {"type": "object", "propertyNames": {"pattern": OVERRIDE_KEY_PATTERN},
                  "description": 'section.key -> value on top of params.yaml, e.g. {"teacher.unet_train.steps": 50}'},
    "mode": {"type": "string", "enum": ["local", "kubernetes"],
             "description": "local: run `sd-distill run` on the worker; kubernetes: one pod per stage"},
    "image": {"type": "string", "minLength": 1, "description": "trainer image (kubernetes mode)"},
    "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                  "description": "Kubernetes namespace of the stage pods (kubernetes mode)"},
    "gpus": {"type": "integer", "minimum": 0, "maximum": 8,
             "description": "GPUs per node for training stages, one for sampling stages (kubernetes mode); "
                            "0 runs on CPU nodes"},
    "nodes": {"type": "integer", "minimum": 1, "maximum": 64,
              "description": "nodes per training stage (kubernetes mode): above 1 each training stage runs as "
                             "a Kubeflow Trainer TrainJob of nodes x gpus processes"},
    "workdir": {"type": ["null", "string"],
                "description": "project folder; default: the artifacts volume's sd-distill/ (kubernetes) or "
                               "$SD_DISTILL_PROJECT, else the checkout holding dags/ (local)"},
    "node_selector": {"type": "object", "additionalProperties": {"type": "string"},
                      "description": "node labels for stages that get GPUs"},
    "tolerations": {"type": "array", "items": {"type": "object"},
                    "description": "tolerations for stages that get GPUs"},
}
PARAM_DEFAULTS: dict[str, Any] = {
    "profile": "tiny", "overrides": {}, "mode": "local", "image": IMAGE, "namespace": "sd-distill", "gpus": 1,
    "nodes": 1,
    "workdir": None, "node_selector": GPU_NODE_SELECTOR, "tolerations": GPU_TOLERATIONS,
}


def fingerprint(stage: registry.Stage, workdir: Path, upstream: list[str]) -> str:
    """sha256 over what ``stage`` produced (every file's path and bytes) and its upstream fingerprints.

    Kubeflow passes it downstream, so a task's cache key covers the content of its inputs, not just params.
    """
    h = hashlib.sha256()
    for up in sorted(upstream):
        h.update(f"upstream {up}\n".encode())
    for role, rel in sorted(stage.produced.items()):
        path = workdir / rel
        if path.is_dir():
            files = [((path / name).relative_to(workdir), digest) for name, digest in file_hashes(path)]
        else:
            files = [(path.relative_to(workdir), sha256_file(path))]
        for name, digest in files:
            h.update(f"{role} {name} {digest}\n".encode())
    return h.hexdigest()


def run_component(stage: str, profile: str, overrides: dict[str, Any], workdir: str, upstream: list[str],
                  gpus: int = 0, nodes: int = 1) -> str:
    """Run one stage as a Kubeflow component does (the trainer image's Python); returns its fingerprint.

    In this process, under torchrun when a training stage gets several GPUs, or as a TrainJob on several
    nodes (the component's service account needs RBAC for trainjobs.trainer.kubeflow.org).
    """
    import subprocess  # nosec B404: runs torchrun from this environment, an argument list, no shell
    import sys

    from sd_distill.cli import main

    s = registry.get(stage)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    run = os.environ.get(PIPELINE_RUN_ENV)
    pipeline_run = f"kubeflow:{run}" if run else None
    args = stage_args(stage, profile=profile, overrides=overrides, workdir=workdir, pipeline_run=pipeline_run)
    program = launcher(s, gpus)
    if hands_off(s, nodes):
        from kubernetes import client, config

        config.load_incluster_config()
        body = trainjob_manifest(
            s, name=trainjob_name(stage, pipeline_run or "kubeflow"), namespace=os.environ[NAMESPACE_ENV],
            image=os.environ[IMAGE_ENV], profile=profile, overrides=overrides, workdir=workdir,
            pipeline_run=pipeline_run, nodes=nodes, gpus_per_node=gpus,
            node_selector=json.loads(os.environ.get(NODE_SELECTOR_ENV, "{}")),
            tolerations=json.loads(os.environ.get(TOLERATIONS_ENV, "[]")))
        run_trainjob(client.CustomObjectsApi(), body)
        rc = 0
    elif program == ["sd-distill"]:
        rc = main(args)
    else:
        command = [str(Path(sys.executable).parent / program[0]), *program[1:], *args]
        rc = subprocess.call(command)  # nosec B603: launcher()'s torchrun, from this environment, no shell
    if rc:
        raise SystemExit(rc)
    return fingerprint(s, Path(workdir), upstream)


def export_model(stage: str, workdir: str, dest: str) -> dict[str, Any]:
    """Copy the stage's deliverable model folder to ``dest`` (a Kubeflow Output[Model] path); its metadata."""
    s = registry.get(stage)
    rel = next(p for p in s.outputs.values() if p == DELIVERABLES["student"])
    shutil.copytree(Path(workdir) / rel, dest, dirs_exist_ok=True)
    return {"stage": stage, "path": rel, "format": "diffusers StableDiffusionPipeline"}


def metric_values(stage: str, workdir: str) -> dict[str, float]:
    """Every number in the stage's metrics files, flattened to ``a.b.c`` keys (for Output[Metrics])."""
    out: dict[str, float] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[prefix[:-1]] = float(node)

    for rel in registry.get(stage).metrics.values():
        walk(json.loads((Path(workdir) / rel).read_text()), "")
    return out


# -- several nodes: hand a training stage to a Kubeflow Trainer TrainJob (k8s/trainjob) ---------------------

TRAINJOB_API = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
TRAINJOB_RUNTIME = "torch-distributed"
TRAINJOB_POLL_S = 30


def hands_off(stage: registry.Stage, nodes: int) -> bool:
    """A training stage of a run across several nodes goes to a TrainJob; everything else runs in one pod."""
    return nodes > 1 and stage.resources.data_parallel


def trainjob_manifest(stage: registry.Stage, *, name: str, namespace: str, image: str, profile: str,
                      overrides: dict[str, Any], workdir: str, pipeline_run: str | None, nodes: int,
                      gpus_per_node: int, node_selector: dict[str, str],
                      tolerations: list[dict[str, Any]]) -> dict[str, Any]:
    """The TrainJob that runs ``stage`` on ``nodes`` x ``gpus_per_node`` processes: k8s/trainjob's shape.

    Each node runs ``torchrun --no-python sd-distill run ...`` (torchrun reads the rendezvous the Trainer
    sets in ``PET_*``); the pods get what a stage pod gets: the volumes, the MLflow Secret, the restricted
    security context, the GPU node selector and tolerations.
    """
    if not hands_off(stage, nodes):
        raise ValueError(f"stage {stage.name} does not run as a TrainJob with {nodes} node(s)")
    r = stage.resources
    per_node = {"cpu": r.cpu, "memory": r.memory, **({GPU_RESOURCE: str(gpus_per_node)} if gpus_per_node else {})}
    env = [{"name": k, "value": v} for k, v in CACHE_ENV.items()]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": MLFLOW_SECRET, "key": k, "optional": optional}}}
            for keys, optional in ((MLFLOW_SECRET_REQUIRED, False), (MLFLOW_SECRET_OPTIONAL, True)) for k in keys]
    labels = {"app.kubernetes.io/name": "sd-distill", "app.kubernetes.io/component": "trainjob",
              "sd-distill/stage": task_name(stage.name)}
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                                "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
            **({"nodeSelector": dict(node_selector), "tolerations": list(tolerations)} if gpus_per_node else {}),
            "volumes": [
                {"name": "artifacts", "persistentVolumeClaim": {"claimName": ARTIFACTS_PVC}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_LIMIT}},
                {"name": "tmp", "emptyDir": {}},
            ],
            "containers": [{
                "name": "node",
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS_MOUNT},
                                 {"name": "dshm", "mountPath": SHM_MOUNT}, {"name": "tmp", "mountPath": TMP_MOUNT}],
            }],
        },
    }
    args = stage_args(stage.name, profile=profile, overrides=overrides, workdir=workdir, pipeline_run=pipeline_run)
    return {
        "apiVersion": f"{TRAINJOB_API[0]}/{TRAINJOB_API[1]}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"apiGroup": TRAINJOB_API[0], "kind": "ClusterTrainingRuntime", "name": TRAINJOB_RUNTIME},
            "trainer": {"image": image, "numNodes": nodes, "numProcPerNode": max(gpus_per_node, 1),
                        "resourcesPerNode": {"requests": per_node, "limits": per_node},
                        "command": ["torchrun", "--no-python", "sd-distill", *args], "env": env},
            "runtimePatches": [{"manager": "sd-distill", "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": "node", "template": {"spec": {"template": pod}}}]}}}}],
        },
    }


def trainjob_name(stage: str, run: str) -> str:
    """A DNS-1123 name, unique per stage and run (a retry of the run reuses it)."""
    digest = hashlib.sha256(f"{stage} {run}".encode()).hexdigest()[:10]
    return f"sd-distill-{task_name(stage)}-{digest}"[:63]


def run_trainjob(api, body: dict[str, Any], *, poll_s: float = TRAINJOB_POLL_S, say=log.info) -> None:
    """Create the TrainJob (or adopt it, on a retry), wait for Complete or Failed, then delete it.

    ``api`` is a ``kubernetes.client.CustomObjectsApi``. Raises ``RuntimeError`` naming the TrainJob and
    the Trainer's message when it fails.
    """
    import time

    from kubernetes.client.exceptions import ApiException

    group, version, plural = TRAINJOB_API
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    try:
        api.create_namespaced_custom_object(group, version, namespace, plural, body)
        say("created TrainJob %s/%s (%d nodes)", namespace, name, body["spec"]["trainer"]["numNodes"])
    except ApiException as exc:
        if exc.status != 409:
            raise
        say("TrainJob %s/%s exists (a retry of this run): waiting for it", namespace, name)
    try:
        while True:
            job = api.get_namespaced_custom_object(group, version, namespace, plural, name)
            conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []}
            if conditions.get("Complete", {}).get("status") == "True":
                say("TrainJob %s/%s complete", namespace, name)
                return
            if conditions.get("Failed", {}).get("status") == "True":
                raise RuntimeError(f"TrainJob {namespace}/{name} failed: "
                                   f"{conditions['Failed'].get('message') or conditions['Failed'].get('reason')}")
            time.sleep(poll_s)
    finally:
        try:
            api.delete_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
