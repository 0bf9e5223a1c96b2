"""The Kubeflow Pipelines v2 pipeline: the committed YAML, its pod settings, and a real kfp.local run."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

from sd_distill import registry
from sd_distill.orchestrators import common, kubeflow
from tests.conftest import BIN, ROOT, sh

COMPILED = ROOT / kubeflow.PIPELINE_YAML


@pytest.fixture(scope="module")
def spec():
    pipeline, platform = yaml.safe_load_all(COMPILED.read_text())
    return pipeline, platform


# `sd-distill kfp compile` runs as its own process here, as a user runs it: in this test process kfp's compiler takes
# ~10 s a pipeline instead of 0.7 s (each task setting calls inspect.stack(), slow under pytest's deep stack and
# the thousands of modules the other tests import).
def compile_pipeline(*args: str):
    return sh([BIN / "sd-distill", "kfp", "compile", *args], ROOT, dict(os.environ), check=False)


def test_committed_pipeline_yaml_is_up_to_date():
    out = compile_pipeline("--check")
    assert out.returncode == 0, f"run `sd-distill kfp compile` (make kfp-yaml):\n{out.stderr}"


def test_kfp_compile_check_fails_on_a_stale_file(tmp_path):
    out = tmp_path / "pipeline.yaml"
    assert compile_pipeline("--out", str(out)).returncode == 0
    assert out.read_text() == COMPILED.read_text()
    out.write_text(out.read_text().replace("halve-32", "halve-31"))
    stale = compile_pipeline("--out", str(out), "--check")
    assert stale.returncode == 1 and "out of date" in stale.stderr


def test_compiled_pipeline_reloads_with_the_registrys_tasks_and_params():
    from kfp import components

    loaded = components.load_component_from_file(str(COMPILED))
    assert loaded.name == "sd-distill"
    assert set(loaded.component_spec.inputs) == {"profile", "overrides", "workdir", "gpus", "nodes",
                                                 "node_selector", "tolerations"}
    assert set(loaded.component_spec.outputs) == {"student", "metrics"}


def test_every_stage_has_its_accelerator_volumes_secret_retries_and_cache(spec):
    pipeline, platform = spec
    tasks = pipeline["root"]["dag"]["tasks"]
    executors = pipeline["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert sorted(tasks) == sorted(common.task_name(s.name) for s in registry.STAGES)
    for stage in registry.STAGES:
        name = common.task_name(stage.name)
        task, container = tasks[name], executors[f"exec-{name}"]["container"]
        assert task["taskInfo"]["name"] == stage.name
        assert task["retryPolicy"]["maxRetryCount"] == common.RETRIES
        assert task["cachingOptions"]["enableCache"] is True
        assert container["image"] == common.IMAGE
        resources = container["resources"]
        assert resources["memoryLimit"] > 0 and resources["cpuRequest"] == float(stage.resources.cpu)
        conf = k8s[f"exec-{name}"]
        if common.uses_gpu(stage):
            assert resources["accelerator"]["resourceType"] == common.GPU_RESOURCE
            assert resources["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
            assert conf["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "node_selector"
            assert conf["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "tolerations"
        else:
            assert "accelerator" not in resources and "nodeSelector" not in conf
        assert [m["mountPath"] for m in conf["pvcMount"]] == [common.ARTIFACTS_MOUNT]
        assert conf["pvcMount"][0]["constant"] == common.ARTIFACTS_PVC
        assert {m["mountPath"]: m.get("medium") for m in conf["emptyDirMounts"]} == {"/dev/shm": "Memory",
                                                                                     "/tmp": None}
        assert conf["secretAsEnv"][0]["secretName"] == common.MLFLOW_SECRET
        assert conf["securityContext"]["runAsNonRoot"] is True
        fields = {f["name"]: f["fieldPath"] for f in conf["fieldPathAsEnv"]}
        assert fields[common.PIPELINE_RUN_ENV] == common.ARGO_WORKFLOW_FIELD
        if stage.resources.data_parallel:  # can start a TrainJob like itself on nodes > 1
            assert fields[common.NAMESPACE_ENV] == "metadata.namespace"
            env_values = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env_values[common.IMAGE_ENV] == common.IMAGE
        env = {e["name"] for e in container.get("env", [])}
        assert "MLFLOW_TRACKING_URI" not in env  # from the Secret only


def test_cache_key_inputs_are_upstream_fingerprints_not_run_ids(spec):
    """A task's inputs: its stage, the run's profile/overrides/workdir/gpus and its upstream fingerprints."""
    tasks = spec[0]["root"]["dag"]["tasks"]
    for stage in registry.STAGES:
        params = tasks[common.task_name(stage.name)]["inputs"]["parameters"]
        named = {k for k in params if not k.startswith("pipelinechannel--") and k != "accelerator_count"}
        assert named == {"stage", "profile", "overrides", "workdir", "upstream", "gpus", "nodes"}
        assert "pipeline_job" not in json.dumps(params)  # nothing that changes from run to run
        ups = params["upstream"]["runtimeValue"]["constant"]
        assert sorted(ups) == sorted(f"{{{{$.inputs.parameters['pipelinechannel--{common.task_name(u)}-Output']}}}}"
                                     for u in registry.upstream(stage))


def test_fingerprint_changes_with_content_and_upstream(tmp_path):
    stage = registry.get("decoder")
    (tmp_path / "models" / "decoder").mkdir(parents=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "models" / "decoder" / "w.bin").write_bytes(b"one")
    (tmp_path / "reports" / "decoder.json").write_text("{}")
    first = common.fingerprint(stage, tmp_path, ["a"])
    assert common.fingerprint(stage, tmp_path, ["a"]) == first
    assert common.fingerprint(stage, tmp_path, ["b"]) != first
    (tmp_path / "models" / "decoder" / "w.bin").write_bytes(b"two")
    assert common.fingerprint(stage, tmp_path, ["a"]) != first


@pytest.mark.slow
def test_kfp_local_runs_the_smoke_pipeline_and_its_model_loads_with_diffusers(kfp_run):
    outputs = kfp_run["outputs"]  # tests/kfp_driver.py: each output artifact's path and metadata
    student = Path(outputs["student"]["path"])
    assert (student / "model_index.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(student, local_files_only=True)
    image = pipe("a handwritten digit three", num_inference_steps=1, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape[-1] == 3 and float(image.std()) > 0
    assert outputs["student"]["metadata"]["path"] == common.DELIVERABLES["student"]
    logged = outputs["metrics"]["metadata"]
    assert logged["teacher.fid"] == pytest.approx(kfp_run["metrics"]["teacher"]["fid"])
    for stage in registry.STAGES:
        for path in stage.produced.values():
            assert (kfp_run["root"] / path).exists(), path
    resolved = json.loads((kfp_run["root"] / "models" / "student" / "params.resolved.json").read_text())
    assert resolved["profile"] == "smoke"
