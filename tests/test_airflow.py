"""The Airflow 3 DAG (dags/sd_distill.py) in real Airflow, in its own environment (.venv-airflow)."""

import json

import mlflow
import pytest

from sd_distill import registry
from sd_distill.orchestrators import common

TASKS = sorted(common.task_name(s.name) for s in registry.STAGES)
GPU_TASKS = {common.task_name(s.name) for s in registry.STAGES if common.uses_gpu(s)}


@pytest.fixture(scope="module")
def parsed(airflow):
    return airflow("parse")


def test_dag_folder_imports_cleanly_and_lightly(parsed):
    assert parsed["import_errors"] == {}
    assert parsed["dag_ids"] == ["sd_distill"]
    assert parsed["heavy_modules"] == []  # no torch, diffusers, MLflow, DVC or kfp at parse time
    assert parsed["schedule"] == "None" and parsed["catchup"] is False and parsed["max_active_runs"] == 1


def test_dag_has_the_registrys_tasks_retries_and_params(parsed):
    assert parsed["tasks"] == TASKS
    assert parsed["retries"] == [common.RETRIES]
    assert parsed["on_finish_action"] == ["delete_pod"]
    assert set(parsed["params"]) == set(common.PARAM_SCHEMAS)
    assert parsed["params"]["profile"]["enum"] == ["tiny", "smoke", "sd15"]


@pytest.mark.parametrize("conf, key", [
    ({"profile": "huge"}, "profile"),
    ({"mode": "cluster"}, "mode"),
    ({"gpus": -1}, "gpus"),
    ({"overrides": {"nosection.steps": 1}}, "overrides"),
    ({"namespace": "Not_A_Namespace"}, "namespace"),
])
def test_a_bad_run_conf_is_refused_naming_the_param(airflow, conf, key):
    result = airflow("run", conf)
    assert result.get("error") == "ParamValidationError", result
    assert f"param {key}" in result["message"]


def test_airflow_cli_trigger_queues_a_run_with_its_conf_and_refuses_a_bad_one(airflow):
    assert airflow.cli("dags", "reserialize").returncode == 0
    conf = {"profile": "smoke", "overrides": {"teacher.unet_train.steps": 3}}
    ok = airflow.cli("dags", "trigger", "sd_distill", "--conf", json.dumps(conf))
    assert ok.returncode == 0, ok.stderr[-2000:]
    queued = [r for r in airflow("runs")["runs"] if r["conf"] == conf]
    assert len(queued) == 1 and queued[0]["state"] == "queued"
    bad = airflow.cli("dags", "trigger", "sd_distill", "--conf", json.dumps({"profile": "huge"}))
    assert bad.returncode != 0
    assert "Invalid input for param profile" in bad.stderr


def test_a_stage_failing_for_good_fails_its_task_at_once_without_retries(airflow, tmp_path):
    """`sd-distill run` exit 2 (bad params here) is not retryable: the task fails on its first try, the rest of the
    DAG is upstream_failed, instead of up_for_retry twice more."""
    conf = {"profile": "smoke", "mode": "local", "overrides": {"prepare.val_fraction": 5}}
    result = airflow("run", conf, {"SD_DISTILL_PROJECT": str(tmp_path), "MLFLOW_TRACKING_URI":
                                   f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result["states"]["prepare"] == "failed", result
    assert set(result["states"].values()) == {"failed", "upstream_failed"}
    assert result["tries"]["prepare"] == 1


@pytest.mark.slow
def test_dag_test_runs_the_smoke_profile_locally(airflow_run):
    assert airflow_run["state"] == "success", airflow_run
    assert sorted(airflow_run["states"]) == TASKS
    assert set(airflow_run["states"].values()) == {"success"}
    root = airflow_run["root"]
    for stage in registry.STAGES:
        for path in stage.produced.values():
            assert (root / path).exists(), path
    client = mlflow.MlflowClient(airflow_run["tracking_uri"])
    exp = client.get_experiment_by_name("sd-distill")
    tag = f"airflow:{airflow_run['run_id']}"
    runs = client.search_runs(exp.experiment_id, f"tags.`sd_distill.pipeline_run` = '{tag}'")
    assert sorted(r.info.run_name for r in runs) == sorted(s.name for s in registry.STAGES)
    assert all(r.info.status == "FINISHED" and r.data.tags["sd_distill.profile"] == "smoke" for r in runs)
    teacher = next(r for r in runs if r.info.run_name == "teacher")  # smoke logs its (small) models to MLflow
    assert {"model", "params.json"} <= {a.path for a in client.list_artifacts(teacher.info.run_id)}


@pytest.fixture(scope="module")
def pods(airflow):
    return airflow("pods", {"mode": "kubernetes", "profile": "sd15", "gpus": 2, "namespace": "ml",
                            "image": "registry.example/sd-distill:1.2", "overrides": {"halve.train.batch_size": 8}})


def test_every_kubernetes_pod_validates_strictly(pods):
    assert sorted(pods["pods"]) == TASKS
    assert pods["errors"] == {}


def test_kubernetes_pods_carry_gpus_volumes_secret_and_restricted_security(pods):
    for task_id, pod in pods["pods"].items():
        spec, (container,) = pod["spec"], pod["spec"]["containers"]
        stage = next(s for s in registry.STAGES if common.task_name(s.name) == task_id)
        assert pod["metadata"]["namespace"] == "ml"
        assert container["image"] == "registry.example/sd-distill:1.2"
        if stage.resources.data_parallel:  # training stages: a process per GPU on the pod's node
            assert container["command"] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "sd_distill"]
        else:
            assert container["command"] == ["sd-distill"]
        args = container["args"]
        assert args[:2] == ["run", stage.name]
        assert args[args.index("--profile") + 1] == "sd15"
        assert json.loads(args[args.index("--overrides") + 1]) == {"halve.train.batch_size": 8}
        assert args[args.index("--pipeline-run") + 1] == "airflow:manual__2026-11-24T00:00:00+00:00"
        limits = container["resources"]["limits"]
        if task_id in GPU_TASKS:
            assert limits[common.GPU_RESOURCE] == ("2" if stage.resources.data_parallel else "1")
            assert spec["nodeSelector"] == common.GPU_NODE_SELECTOR
            assert spec["tolerations"] == common.GPU_TOLERATIONS
        else:
            assert common.GPU_RESOURCE not in limits and not spec.get("nodeSelector")
        assert container["resources"]["requests"]["memory"] == stage.resources.memory
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == common.ARTIFACTS_PVC
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts == {"/workspace": "artifacts", "/dev/shm": "dshm", "/tmp": "tmp"}
        env = {e["name"]: e for e in container["env"]}
        uri = env["MLFLOW_TRACKING_URI"]
        assert "value" not in uri and uri["valueFrom"]["secretKeyRef"]["name"] == common.MLFLOW_SECRET
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False


def test_cpu_only_runs_ask_for_no_gpu_and_no_gpu_nodes(airflow):
    result = airflow("pods", {"mode": "kubernetes", "gpus": 0})
    assert result["errors"] == {}
    for pod in result["pods"].values():
        assert common.GPU_RESOURCE not in pod["spec"]["containers"][0]["resources"]["limits"]
        assert pod["spec"]["containers"][0]["command"] == ["sd-distill"]
        assert not pod["spec"].get("nodeSelector") and not pod["spec"].get("tolerations")


def test_a_multi_node_run_hands_each_training_stage_to_a_trainjob(airflow):
    result = airflow("pods", {"mode": "kubernetes", "profile": "sd15", "gpus": 4, "nodes": 2,
                              "namespace": "ml", "image": "registry.example/sd-distill:1.2"})
    trainers = {common.task_name(s.name) for s in registry.STAGES if s.resources.data_parallel}
    assert set(result["trainjobs"]) == trainers
    for task_id, job in result["trainjobs"].items():
        stage = next(s for s in registry.STAGES if common.task_name(s.name) == task_id)
        trainer = job["spec"]["trainer"]
        assert job["kind"] == "TrainJob" and job["metadata"]["namespace"] == "ml"
        assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (
            2, 4, "registry.example/sd-distill:1.2")
        assert trainer["command"][:5] == ["torchrun", "--no-python", "sd-distill", "run", stage.name]
        assert "airflow:manual__2026-11-24T00:00:00+00:00" in trainer["command"]
