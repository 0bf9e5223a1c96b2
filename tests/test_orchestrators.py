"""dvc.yaml, the Airflow DAG and the Kubeflow pipeline: the registry's stages and edges, the same run parameters."""

import dataclasses
import json
import logging
import shutil

import pytest
import yaml

from sd_distill import dvcgen, registry
from sd_distill.cli import build_parser, main
from sd_distill.orchestrators import common, kubeflow
from sd_distill.params import resolve
from sd_distill.runner import run_stage
from tests.conftest import ROOT

REGISTRY_EDGES = sorted(registry.edges())


def dvc_edges(text: str) -> list[tuple[str, str]]:
    """Stages and edges as DVC sees them: foreach expanded, a dep on another stage's out is an edge."""
    stages = {}
    for name, body in yaml.safe_load(text)["stages"].items():
        if "foreach" in body:
            for key, item in body["foreach"].items():
                sub = lambda s: s.replace("${key}", key).replace("${item.", "{").format(**item)  # noqa: E731
                stages[f"{name}@{key}"] = {"deps": [sub(d) for d in body["do"]["deps"]],
                                           "outs": [sub(o) if isinstance(o, str) else next(iter(o))
                                                    for o in body["do"].get("outs", [])]}
        else:
            outs = [o if isinstance(o, str) else next(iter(o))
                    for kind in ("outs", "metrics", "plots") for o in body.get(kind, [])]
            stages[name] = {"deps": body["deps"], "outs": outs}
    producer = {out: name for name, s in stages.items() for out in s["outs"]}
    return sorted({(producer[d], name) for name, s in stages.items() for d in s["deps"] if d in producer})


def kfp_edges(text: str) -> list[tuple[str, str]]:
    tasks = next(yaml.safe_load_all(text))["root"]["dag"]["tasks"]
    by_task = {common.task_name(s.name): s.name for s in registry.STAGES}
    by_task.update({t: t for t in tasks if t not in by_task})
    return sorted((by_task[up], by_task[name]) for name, t in tasks.items() for up in t.get("dependentTasks", []))


def test_dvc_yaml_has_the_registrys_edges():
    assert dvc_edges((ROOT / "dvc.yaml").read_text()) == REGISTRY_EDGES


def test_compiled_kfp_pipeline_has_the_registrys_edges():
    assert kfp_edges((ROOT / kubeflow.PIPELINE_YAML).read_text()) == REGISTRY_EDGES


def test_airflow_dag_has_the_registrys_edges(airflow):
    parsed = airflow("parse")
    expected = sorted([common.task_name(a), common.task_name(b)] for a, b in REGISTRY_EDGES)
    assert parsed["edges"] == expected


def test_task_names_are_unique_and_valid_everywhere():
    names = [common.task_name(s.name) for s in registry.STAGES]
    assert len(set(names)) == len(names)
    assert all(n.replace("-", "").replace("_", "").isalnum() for n in names)


@pytest.fixture
def with_added_stage(monkeypatch):
    evaluate = registry.get("evaluate")
    audit = dataclasses.replace(evaluate, name="audit", doc="an added stage",
                                inputs={"metrics": "reports/metrics.json"}, outputs={}, metrics={},
                                plots={}, plot_specs={}, reports={"audit": "reports/audit.md"})
    monkeypatch.setattr(registry, "STAGES", (*registry.STAGES, audit))
    return ("evaluate", "audit")


def test_adding_a_stage_to_the_registry_adds_it_everywhere(with_added_stage, airflow):
    assert with_added_stage in dvc_edges(dvcgen.render())
    assert with_added_stage in kfp_edges(kubeflow.render())
    assert list(with_added_stage) in airflow("parse", {"extra_stage": True})["edges"]


def test_orchestrator_arguments_parse_back_into_the_same_run(tmp_path, capsys):
    args = common.stage_args("halve@8", profile="smoke", overrides={"halve.train.batch_size": 3},
                             workdir=str(tmp_path), pipeline_run="airflow:r1")
    parsed = build_parser().parse_args(args)
    assert (parsed.stage, parsed.profile, parsed.pipeline_run) == ("halve@8", "smoke", "airflow:r1")
    assert parsed.params == tmp_path / "params.yaml" and not parsed.params.exists()
    assert main([*args, "--dry-run"]) == 0  # no params.yaml in the workdir: the profile's preset
    section = json.loads(capsys.readouterr().out)
    assert section["profile"] == "smoke" and section["halve"]["train"]["batch_size"] == 3


def test_run_profile_replaces_the_files_profile_and_overrides_layer_on_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: tiny\nteacher:\n  unet_train:\n    steps: 7\n")
    params = resolve(path, ["teacher.unet_train.batch_size=3"], profile="smoke")
    assert params.profile == "smoke"
    assert params.teacher.unet_train.steps == 7 and params.teacher.unet_train.batch_size == 3


@pytest.mark.parametrize("overrides, message", [
    ('{"teacher.unet_train.step": 3}', "overrides: teacher.unet_train.step: unknown key"),
    ('["teacher.unet_train.steps"]', "expected a mapping of section.key to value, found list"),
    ('{"teacher.unet_train.steps": 3', "--overrides: not valid JSON"),
    ('{"nosection.x": 1}', "unknown section 'nosection'"),
])
def test_bad_overrides_name_the_key_and_run_nothing(tmp_path, capsys, overrides, message):
    rc = main(["run", "teacher", "--params", str(tmp_path / "params.yaml"), "--profile", "smoke",
               "--overrides", overrides])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_override_key_schema_accepts_every_section_and_nothing_else():
    import re

    pattern = re.compile(common.OVERRIDE_KEY_PATTERN)
    assert all(pattern.match(f"{s}.x") for s in common.SECTIONS)
    assert not pattern.match("profile") and not pattern.match("teacher") and not pattern.match("nosection.x")


def test_a_retry_of_the_same_pipeline_run_resumes_and_a_new_run_starts_over(smoke_project, tmp_path, caplog):
    root = tmp_path / "project"
    shutil.copytree(smoke_project, root)
    params = resolve(root / "params.yaml")
    caplog.set_level(logging.INFO, logger="sd_distill")
    # force: the copied stage is up to date, and would otherwise do nothing (a retry after success)
    run_stage("guidance", params, root, pipeline_run="airflow:run-1", force=True)
    assert "resumed from" not in caplog.text
    caplog.clear()
    run_stage("guidance", params, root, pipeline_run="airflow:run-1", force=True)  # the orchestrator's retry
    assert "retry of pipeline run airflow:run-1" in caplog.text and "resumed from" in caplog.text
    caplog.clear()
    run_stage("guidance", params, root, pipeline_run="airflow:run-2", force=True)  # another run: from scratch
    assert "resumed from" not in caplog.text
    caplog.clear()
    assert run_stage("guidance", params, root, pipeline_run="airflow:run-2")["up_to_date"] == 1  # after success


def test_the_exit_status_of_a_finished_pod_is_read_from_its_container():
    from kubernetes.client import models as k8s

    def pod(**codes):
        return k8s.V1Pod(status=k8s.V1PodStatus(container_statuses=[
            k8s.V1ContainerStatus(name=name, image="i", image_id="", ready=False, restart_count=0,
                                  state=k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=c)))
            for name, c in codes.items()]))

    assert common.terminated_exit_code(pod(istio=0, base=3), "base") == 3
    assert common.terminated_exit_code(pod(other=1), "base") is None
    assert common.terminated_exit_code(None, "base") is None
    from sd_distill.errors import EXIT_MEANINGS, NOT_RETRYABLE

    assert set(NOT_RETRYABLE) == {2, 3} and set(NOT_RETRYABLE) <= set(EXIT_MEANINGS)


@pytest.mark.slow
def test_the_three_orchestrators_run_the_same_dag(rehearsal_run, airflow_run, kfp_run):
    """Airflow and Kubeflow run the smoke profile: the same metrics keys and, with the same params and deterministic
    training, the same teacher FID. DVC runs the sd15 rehearsal (another suite, so other quality keys) through the
    same registry: the same models evaluated, each with the same cost and latency figures."""
    def keys(tree, prefix=""):
        out = set()
        for k, v in tree.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return out

    airflow_metrics = json.loads((airflow_run["root"] / "reports" / "metrics.json").read_text())
    reference = keys(airflow_metrics)
    assert len(reference) > 20
    assert keys(kfp_run["metrics"]) == reference
    assert kfp_run["metrics"]["teacher"]["fid"] == pytest.approx(airflow_metrics["teacher"]["fid"])
    dvc = rehearsal_run["metrics"]
    assert set(dvc["models"]) == set(airflow_metrics["models"]) and len(dvc["models"]) > 10
    costs = {"unet_parameters", "unet_macs_per_call", "decoder_macs", "unet_calls_per_image", "latency_ms", "steps",
             "solver", "model", "samples", "fid"}
    for name, row in dvc["models"].items():
        assert costs <= set(row) and costs <= set(airflow_metrics["models"][name]), name


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_gpus_go_to_training_stages_one_to_sampling_stages_none_to_the_rest(gpus):
    for stage in registry.STAGES:
        n, program = common.gpus_for(stage, gpus), common.launcher(stage, gpus)
        if not common.uses_gpu(stage):
            assert n == 0 and program == ["sd-distill"]
        elif stage.resources.data_parallel:
            assert n == gpus
            assert program == (["torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m", "sd_distill"]
                               if gpus > 1 else ["sd-distill"])
        else:
            assert n == min(gpus, 1) and program == ["sd-distill"]
    trainers = {s.name for s in registry.STAGES if s.resources.data_parallel}
    assert trainers == {"teacher", "encode", "vpred", "guidance", "prune", "dmd", "decoder",
                        *(s.name for s in registry.STAGES if s.group == "halve")}


class FakeTrainJobs:
    """Stands in for the Kubernetes API server's TrainJob endpoint (no cluster here): records calls."""

    def __init__(self, states, exists=False):
        self.states, self.exists, self.calls = list(states), exists, []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        from kubernetes.client.exceptions import ApiException

        self.calls.append(("create", namespace, body["metadata"]["name"]))
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", namespace, name))
        state = self.states.pop(0)
        return {"status": {"conditions": [{"type": state, "status": "True", "message": f"{state} message"}]}
                if state else {}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", namespace, name))


def trainjob(nodes=2):
    return common.trainjob_manifest(
        registry.get("halve@8"), name=common.trainjob_name("halve@8", "airflow:r1"), namespace="ml",
        image="img:1", profile="sd15", overrides={}, workdir=common.WORKDIR, pipeline_run="airflow:r1",
        nodes=nodes, gpus_per_node=4, node_selector=common.GPU_NODE_SELECTOR, tolerations=common.GPU_TOLERATIONS)


def test_trainjob_hand_off_waits_for_completion_then_deletes_it():
    api = FakeTrainJobs([None, "Created", "Complete"])
    common.run_trainjob(api, trainjob(), poll_s=0)
    name = trainjob()["metadata"]["name"]
    assert api.calls[0] == ("create", "ml", name) and api.calls[-1] == ("delete", "ml", name)
    assert [c[0] for c in api.calls].count("get") == 3


def test_a_failed_trainjob_fails_the_task_with_the_trainers_message_and_is_deleted():
    api = FakeTrainJobs(["Failed"])
    with pytest.raises(RuntimeError, match="TrainJob ml/sd-distill-halve-8-.* failed: Failed message"):
        common.run_trainjob(api, trainjob(), poll_s=0)
    assert api.calls[-1][0] == "delete"


def test_a_retry_adopts_the_trainjob_its_first_try_started():
    api = FakeTrainJobs(["Complete"], exists=True)
    common.run_trainjob(api, trainjob(), poll_s=0)
    assert [c[0] for c in api.calls] == ["create", "get", "delete"]


def test_only_training_stages_of_multi_node_runs_are_handed_off():
    assert common.trainjob_name("halve@8", "airflow:r1") == common.trainjob_name("halve@8", "airflow:r1")
    assert common.trainjob_name("halve@8", "airflow:r1") != common.trainjob_name("halve@8", "airflow:r2")
    assert len(common.trainjob_name("halve@32", "x" * 300)) <= 63
    for stage in registry.STAGES:
        assert common.hands_off(stage, 1) is False
        assert common.hands_off(stage, 2) is stage.resources.data_parallel
    with pytest.raises(ValueError, match="does not run as a TrainJob"):
        common.trainjob_manifest(registry.get("evaluate"), name="x", namespace="ml", image="i", profile="tiny",
                                 overrides={}, workdir="/w", pipeline_run=None, nodes=2, gpus_per_node=1,
                                 node_selector={}, tolerations=[])
