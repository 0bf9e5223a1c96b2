"""Airflow 3 DAG ``sd_distill``: every stage of the sd-distill registry as one task, with the registry's edges.

Trigger::

    airflow dags trigger sd_distill --conf '{"profile": "tiny"}'
    airflow dags trigger sd_distill --conf '{"profile": "sd15", "mode": "kubernetes", "gpus": 1,
                                             "overrides": {"halve.train.batch_size": 32}}'

or "Trigger DAG" in the UI, whose form is built from the Params below (validated by their JSON schemas).

Each task runs ``sd-distill run <stage> --params <workdir>/params.yaml --profile P --overrides JSON
--pipeline-run airflow:<run_id>``: the same command ``dvc repro`` runs, with the run's ``profile`` and
``overrides`` layered on the project's ``params.yaml``. A retry (2 by default) has the same run id, so the
stage resumes from its last checkpoint; a stage that already finished does nothing. Exit statuses a retry cannot
change (2: bad params or input, 3: the loss diverged or memory ran out at the smallest micro-batch) fail the task
at once, without retries.

- ``mode: local`` runs that command on the worker (``$SD_DISTILL_BIN``, default ``sd-distill`` on PATH) in
  ``workdir`` (default ``$SD_DISTILL_PROJECT``, else the checkout that holds this dags/ folder).
- ``mode: kubernetes`` runs it in a pod of ``image`` in ``namespace``: the registry's CPU and memory, ``gpus``
  ``nvidia.com/gpu`` on the training stages (under torchrun, a process per GPU, when ``gpus`` > 1; one GPU
  for the sampling stages) with ``node_selector`` and ``tolerations``, the artifacts volume at
  /workspace, a memory-backed /dev/shm, MLflow's URI and credentials from the ``sd-distill-mlflow`` Secret,
  a restricted security context (non-root, read-only root, no capabilities), and the pod deleted when done.
  With ``nodes`` > 1 a training stage goes to a Kubeflow Trainer TrainJob of ``nodes`` x ``gpus`` processes
  instead (created, awaited and deleted by the task; see k8s/trainjob).

Parsing this file imports the registry (no torch, no MLflow) and the Kubernetes provider; no network call.
"""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG, Param
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s

from sd_distill import registry
from sd_distill.errors import EXIT_MEANINGS, NOT_RETRYABLE
from sd_distill.orchestrators import common

DAG_ID = "sd_distill"


def _pod_security() -> tuple[k8s.V1PodSecurityContext, k8s.V1SecurityContext]:
    """Pod Security Standard "restricted": non-root, no privilege escalation, no capabilities, RuntimeDefault."""
    pod = k8s.V1PodSecurityContext(
        run_as_non_root=True, run_as_user=common.RUN_AS_USER, run_as_group=common.RUN_AS_USER,
        fs_group=common.RUN_AS_USER, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))
    container = k8s.V1SecurityContext(
        allow_privilege_escalation=False, read_only_root_filesystem=True, run_as_non_root=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]), seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))
    return pod, container


def _volumes() -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    volumes = [
        k8s.V1Volume(name="artifacts", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=common.ARTIFACTS_PVC)),
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                        size_limit=common.SHM_LIMIT)),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
    ]
    mounts = [
        k8s.V1VolumeMount(name="artifacts", mount_path=common.ARTIFACTS_MOUNT),
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
    ]
    return volumes, mounts


def _mlflow_secret_env() -> list[k8s.V1EnvVar]:
    """MLflow's URI (required) and credentials (optional keys) from the Secret, never from run parameters."""
    def ref(key: str, optional: bool) -> k8s.V1EnvVar:
        return k8s.V1EnvVar(name=key, value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(
            name=common.MLFLOW_SECRET, key=key, optional=optional)))

    return [*(ref(k, False) for k in common.MLFLOW_SECRET_REQUIRED),
            *(ref(k, True) for k in common.MLFLOW_SECRET_OPTIONAL)]


def _local_project() -> str:
    return os.environ.get("SD_DISTILL_PROJECT") or str(Path(__file__).resolve().parents[1])


class StageOperator(KubernetesPodOperator):
    """One registry stage: a pod per try in ``kubernetes`` mode, ``sd-distill run`` on the worker in ``local``.

    The pod is shaped from the run's params when the task runs (``build_pod_request_obj``), so one parsed DAG
    serves every profile, image, namespace and GPU count.
    """

    ui_color = "#d7e8f7"

    def __init__(self, *, stage: registry.Stage, **kwargs) -> None:
        pod_security, container_security = _pod_security()
        volumes, mounts = _volumes()
        super().__init__(
            task_id=common.task_name(stage.name),
            name=f"sd-distill-{common.task_name(stage.name)}",
            cmds=["sd-distill"],
            labels={"app.kubernetes.io/name": "sd-distill", "app.kubernetes.io/component": "stage",
                    "sd-distill/stage": common.task_name(stage.name)},
            volumes=volumes, volume_mounts=mounts,
            env_vars=[*(k8s.V1EnvVar(name=k, value=v) for k, v in common.CACHE_ENV.items()),
                      *_mlflow_secret_env()],
            security_context=pod_security, container_security_context=container_security,
            automount_service_account_token=False,
            on_finish_action="delete_pod",  # success and failure alike
            get_logs=True,
            do_xcom_push=False,
            retries=common.RETRIES, retry_delay=timedelta(seconds=common.RETRY_DELAY_S),
            retry_exponential_backoff=True,
            doc_md=stage.doc,
            **kwargs,
        )
        self.stage = stage
        self._process: subprocess.Popen | None = None

    # -- shaping from the run's params -------------------------------------------------------------------
    def _command(self, params: dict, run_id: str, workdir: str) -> list[str]:
        return common.stage_args(self.stage.name, profile=params["profile"], overrides=params["overrides"],
                                 workdir=workdir, pipeline_run=f"airflow:{run_id}")

    def _shape(self, context) -> None:
        params, r = context["params"], self.stage.resources
        gpus = common.gpus_for(self.stage, params["gpus"])
        self.cmds = common.launcher(self.stage, params["gpus"])
        self.image = params["image"]
        self.namespace = params["namespace"]
        self.arguments = self._command(params, context["run_id"], params["workdir"] or common.WORKDIR)
        extra = {common.GPU_RESOURCE: str(gpus)} if gpus else {}
        self.container_resources = k8s.V1ResourceRequirements(
            requests={"cpu": r.cpu, "memory": r.memory, **extra}, limits={"memory": r.memory, **extra})
        self.node_selector = dict(params["node_selector"]) if gpus else {}
        self.tolerations = [k8s.V1Toleration(**t) for t in params["tolerations"]] if gpus else []

    def build_pod_request_obj(self, context=None, *, dry_run: bool = False) -> k8s.V1Pod:
        if context is not None:
            self._shape(context)
        return super().build_pod_request_obj(context, dry_run=dry_run)

    def build_trainjob_obj(self, context) -> dict:
        """The TrainJob this task hands its stage to when the run has ``nodes`` > 1 (k8s/trainjob's shape)."""
        params = context["params"]
        run = f"airflow:{context['run_id']}"
        return common.trainjob_manifest(
            self.stage, name=common.trainjob_name(self.stage.name, run), namespace=params["namespace"],
            image=params["image"], profile=params["profile"], overrides=params["overrides"],
            workdir=params["workdir"] or common.WORKDIR, pipeline_run=run, nodes=params["nodes"],
            gpus_per_node=params["gpus"], node_selector=params["node_selector"], tolerations=params["tolerations"])

    # -- running ------------------------------------------------------------------------------------------
    def execute(self, context):
        params = context["params"]
        if params["mode"] == "local":
            return self._execute_local(context)
        if common.hands_off(self.stage, params["nodes"]):
            # needs RBAC on trainjobs for the launcher: kubectl apply -k k8s/trainjob-launcher
            return common.run_trainjob(self.hook.custom_object_client, self.build_trainjob_obj(context),
                                       say=self.log.info)
        try:
            return super().execute(context)
        except AirflowException as exc:
            self._fail_for_good(common.terminated_exit_code(self.remote_pod, self.base_container_name), exc)
            raise

    def _fail_for_good(self, rc: int | None, cause: Exception | None = None) -> None:
        """A stage status that a retry cannot change (bad input, a diverged loss) fails the task at once."""
        if rc in NOT_RETRYABLE:
            raise AirflowFailException(f"sd-distill run {self.stage.name} exited with status {rc} "
                                       f"({EXIT_MEANINGS[rc]}): not retried, see the log above") from cause

    def _execute_local(self, context) -> None:
        params = context["params"]
        workdir = params["workdir"] or _local_project()
        cmd = [os.environ.get("SD_DISTILL_BIN", "sd-distill"), *self._command(params, context["run_id"], workdir)]
        self.log.info("running in %s: %s", workdir, " ".join(cmd))
        self._process = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, bufsize=1)
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.log.info("%s", line.rstrip())
        rc = self._process.wait()
        self._fail_for_good(rc)
        if rc:
            raise AirflowException(f"sd-distill run {self.stage.name} exited with status {rc}")

    def on_kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)  # the stage stops at a step boundary (issue #8)
            return
        super().on_kill()


with DAG(
    dag_id=DAG_ID,
    description="Distill a Stable Diffusion teacher into a fast, small student (the sd-distill stage registry)",
    doc_md=__doc__,
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["sd-distill", "diffusion", "distillation"],
    params={name: Param(common.PARAM_DEFAULTS[name], **schema) for name, schema in common.PARAM_SCHEMAS.items()},
) as dag:
    tasks = {stage.name: StageOperator(stage=stage) for stage in registry.STAGES}
    for upstream, downstream in registry.edges():
        tasks[upstream] >> tasks[downstream]
