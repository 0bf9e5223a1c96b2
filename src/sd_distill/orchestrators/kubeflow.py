"""Kubeflow Pipelines v2: one lightweight Python component per registry stage and pipeline ``sd-distill``.

Every component runs ``sd-distill run <stage>`` (in the trainer image's Python, through the CLI's ``main``;
under torchrun, a process per GPU, when a training stage gets ``gpus`` > 1) in the project folder
``workdir`` on the shared artifacts PVC, then returns a fingerprint: the sha256 of
what the stage produced and of its upstream fingerprints. Downstream components take their upstream
fingerprints as an input, which gives the pipeline the registry's edges and keys Kubeflow's cache on the
content of a stage's inputs as well as on the run's ``profile`` and ``overrides``.

The stage that makes ``models/student`` also hands it out as an ``Output[Model]`` (a stock diffusers
folder) and every stage with metrics files logs their numbers to an ``Output[Metrics]``; the pipeline
returns the student and the evaluation's metrics.

``sd-distill kfp compile`` writes ``components/sd_distill_pipeline.yaml`` (committed; a test fails when stale).
"""

# no `from __future__ import annotations`: kfp reads the components' annotations as types
import copy
import json
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Metrics, Model, Output

from sd_distill import registry
from sd_distill.orchestrators import common

PIPELINE_NAME = "sd-distill"
PIPELINE_YAML = Path("components/sd_distill_pipeline.yaml")


# The three shapes of a stage component. Their bodies run in the component's pod: they import sd-distill
# from the image and nothing from this module (Kubeflow ships only the function's source).
def sd_distill_stage(stage: str, profile: str, overrides: dict, workdir: str, upstream: list, gpus: int,
                     nodes: int) -> str:
    """Run one sd-distill stage in ``workdir``; returns the fingerprint of what it produced."""
    from sd_distill.orchestrators.common import run_component

    return run_component(stage, profile, overrides, workdir, upstream, gpus, nodes)


def sd_distill_model_stage(stage: str, profile: str, overrides: dict, workdir: str, upstream: list, gpus: int,
                           nodes: int, model: Output[Model]) -> str:
    """Run the stage that makes the deliverable model and hand the folder out as a Model artifact."""
    from sd_distill.orchestrators.common import export_model, run_component

    fingerprint = run_component(stage, profile, overrides, workdir, upstream, gpus, nodes)
    model.metadata.update(export_model(stage, workdir, model.path))
    model.metadata["fingerprint"] = fingerprint
    return fingerprint


def sd_distill_metrics_stage(stage: str, profile: str, overrides: dict, workdir: str, upstream: list, gpus: int,
                             nodes: int, metrics: Output[Metrics]) -> str:
    """Run a stage with metrics files and log every number in them to a Metrics artifact."""
    from sd_distill.orchestrators.common import metric_values, run_component

    fingerprint = run_component(stage, profile, overrides, workdir, upstream, gpus, nodes)
    for name, value in sorted(metric_values(stage, workdir).items()):
        metrics.log_metric(name, value)
    return fingerprint


def component_for(stage: registry.Stage, image: str = common.IMAGE):
    """The stage's own component (named after it), from the shape that fits what the stage produces."""
    if common.DELIVERABLES["student"] in stage.outputs.values():
        func = sd_distill_model_stage
    elif stage.metrics:
        func = sd_distill_metrics_stage
    else:
        func = sd_distill_stage
    # install_kfp_package=False: the trainer image has kfp; pods need no package index at run time
    base = dsl.component(func, base_image=image, install_kfp_package=False)
    comp = copy.deepcopy(base)
    comp.component_spec.name = common.task_name(stage.name)
    comp.name = comp.component_spec.name
    comp.description = stage.doc
    comp.component_spec.description = stage.doc
    return comp


def configure(task, stage: registry.Stage, *, gpus, node_selector, tolerations, image: str) -> None:
    """The pod a stage runs in: resources, GPUs, volumes, MLflow Secret, security context, retries, cache."""
    r = stage.resources
    task.set_display_name(stage.name)
    task.set_cpu_request(r.cpu).set_memory_request(r.memory).set_memory_limit(r.memory)
    if common.uses_gpu(stage):
        task.set_accelerator_type(common.GPU_RESOURCE).set_accelerator_limit(gpus)
        kubernetes.add_node_selector_json(task, node_selector)
        kubernetes.add_toleration_json(task, tolerations)
    kubernetes.mount_pvc(task, pvc_name=common.ARTIFACTS_PVC, mount_path=common.ARTIFACTS_MOUNT)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path=common.SHM_MOUNT, medium="Memory",
                               size_limit=common.SHM_LIMIT)
    kubernetes.empty_dir_mount(task, volume_name="tmp", mount_path=common.TMP_MOUNT)
    kubernetes.use_secret_as_env(task, common.MLFLOW_SECRET, {k: k for k in common.MLFLOW_SECRET_REQUIRED})
    kubernetes.use_secret_as_env(task, common.MLFLOW_SECRET, {k: k for k in common.MLFLOW_SECRET_OPTIONAL},
                                 optional=True)
    kubernetes.set_security_context(task, run_as_user=common.RUN_AS_USER, run_as_group=common.RUN_AS_USER,
                                    run_as_non_root=True)
    kubernetes.add_pod_label(task, "app.kubernetes.io/name", "sd-distill")
    kubernetes.add_pod_label(task, "sd-distill/stage", common.task_name(stage.name))
    for key, value in common.CACHE_ENV.items():
        task.set_env_variable(key, value)
    # The run's identity reaches the stage through the environment, not an input, so that it stays out of
    # the cache key: the Argo workflow behind a Kubeflow run labels all its pods, retries included, with its
    # name. A retry of the same run resumes from the stage's checkpoint. (kfp.local sets no such label.)
    kubernetes.use_field_path_as_env(task, env_name=common.PIPELINE_RUN_ENV, field_path=common.ARGO_WORKFLOW_FIELD)
    if stage.resources.data_parallel:  # what it takes to start a TrainJob like itself when nodes > 1
        kubernetes.use_field_path_as_env(task, env_name=common.NAMESPACE_ENV, field_path="metadata.namespace")
        task.set_env_variable(common.IMAGE_ENV, image)
        task.set_env_variable(common.NODE_SELECTOR_ENV, json.dumps(common.GPU_NODE_SELECTOR))
        task.set_env_variable(common.TOLERATIONS_ENV, json.dumps(common.GPU_TOLERATIONS))
    task.set_retry(num_retries=common.RETRIES, backoff_duration=f"{common.RETRY_DELAY_S}s", backoff_factor=2.0)
    task.set_caching_options(enable_caching=True)


def build(image: str = common.IMAGE):
    """Pipeline ``sd-distill`` from the registry: a task per stage, an edge per registry edge."""
    components = {s.name: component_for(s, image) for s in registry.STAGES}
    Outputs = NamedTuple("Outputs", [("student", Model), ("metrics", Metrics)])

    @dsl.pipeline(name=PIPELINE_NAME, description="Distill a Stable Diffusion teacher into a fast, small "
                                                  "student: every stage of the sd-distill registry")
    def sd_distill(
        profile: str = common.PARAM_DEFAULTS["profile"],
        overrides: dict = {},  # noqa: B006  (kfp reads the default; it is never mutated)
        workdir: str = common.WORKDIR,
        gpus: int = common.PARAM_DEFAULTS["gpus"],
        nodes: int = common.PARAM_DEFAULTS["nodes"],
        node_selector: dict = common.GPU_NODE_SELECTOR,
        tolerations: list = common.GPU_TOLERATIONS,
    ) -> Outputs:
        tasks = {}
        for stage in registry.STAGES:
            upstream = [tasks[name].outputs["Output"] for name in registry.upstream(stage)]
            task = components[stage.name](stage=stage.name, profile=profile, overrides=overrides,
                                          workdir=workdir, upstream=upstream, gpus=gpus, nodes=nodes)
            configure(task, stage, gpus=gpus, node_selector=node_selector, tolerations=tolerations, image=image)
            tasks[stage.name] = task
        student = next(t for n, t in tasks.items()
                       if common.DELIVERABLES["student"] in registry.get(n).outputs.values())
        evaluation = next(t for n, t in tasks.items()
                          if common.DELIVERABLES["metrics"] in registry.get(n).metrics.values())
        return Outputs(student=student.outputs["model"], metrics=evaluation.outputs["metrics"])

    return sd_distill


def _sorted_header(text: str) -> str:
    """kfp's header comment prints dict defaults in protobuf map order, which changes between processes."""
    import ast
    import re

    def fix(m: re.Match) -> str:
        def ordered(v):
            if isinstance(v, dict):
                return {k: ordered(v[k]) for k in sorted(v)}
            return [ordered(x) for x in v] if isinstance(v, list) else v
        return f"[Default: {ordered(ast.literal_eval(m.group(1)))!r}]"

    head, sep, body = text.partition("\ncomponents:")
    return re.sub(r"\[Default: (.*)\]$", fix, head, flags=re.M) + sep + body


def render(image: str = common.IMAGE) -> str:
    """The compiled pipeline YAML (deterministic: same registry, same text)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(build(image), str(path))
        return _sorted_header(path.read_text())


def write(path: Path = PIPELINE_YAML, image: str = common.IMAGE) -> bool:
    """Write the compiled pipeline; returns True when it changed."""
    text = render(image)
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True
