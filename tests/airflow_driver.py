"""Runs inside .venv-airflow (Airflow 3 and its Kubernetes provider); tests/test_airflow.py drives it.

    python tests/airflow_driver.py parse [OPTS]   DagBag import: errors, tasks, edges, modules loaded
                                                  (OPTS {"extra_stage": true}: with a stage added to the registry)
    python tests/airflow_driver.py run CONF       dag.test(run_conf=CONF): every task's final state
    python tests/airflow_driver.py pods CONF      the pod of every task for CONF, rendered with no cluster
    python tests/airflow_driver.py runs           the DAG's runs in the metadata database, with their conf

Each prints one JSON document on its last line of stdout.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import types
from pathlib import Path

DAGS = Path(__file__).resolve().parents[1] / "dags"
HEAVY = ("torch", "diffusers", "transformers", "mlflow", "dvc", "kfp")


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    started = time.time()
    bag = DagBag(dag_folder=str(DAGS))
    return bag, time.time() - started


def parse(extra_stage: bool = False) -> dict:
    if extra_stage:  # what adding a stage to the registry does to the DAG, with no other change
        import dataclasses

        from sd_distill import registry

        evaluate = registry.get("evaluate")
        audit = dataclasses.replace(evaluate, name="audit", doc="an added stage",
                                    inputs={"metrics": "reports/metrics.json"}, outputs={}, metrics={},
                                    plots={}, plot_specs={}, reports={"audit": "reports/audit.md"})
        registry.STAGES = (*registry.STAGES, audit)
    bag, seconds = load_dag()
    dag = bag.dags.get("sd_distill")
    out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dags),
           "seconds": seconds, "heavy_modules": [m for m in HEAVY if m in sys.modules]}
    if dag is not None:
        out.update(
            tasks=sorted(t.task_id for t in dag.tasks),
            edges=sorted([u, t.task_id] for t in dag.tasks for u in t.upstream_task_ids),
            schedule=str(dag.schedule) if hasattr(dag, "schedule") else None,
            catchup=dag.catchup, max_active_runs=dag.max_active_runs,
            params={k: dag.params.get_param(k).schema for k in dag.params},
            retries=sorted({t.retries for t in dag.tasks}),
            on_finish_action=sorted({str(t.on_finish_action.value) for t in dag.tasks}),
        )
    return out


def run(conf: dict) -> dict:
    from airflow.sdk.definitions.param import ParamValidationError  # noqa: F401  (import check)

    bag, _ = load_dag()
    dag = bag.dags["sd_distill"]
    started = time.time()
    try:
        dag_run = dag.test(run_conf=conf)
    except Exception as exc:  # a rejected conf: report the error the user would see
        return {"error": type(exc).__name__, "message": str(exc)}
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                                 TaskInstance.run_id == dag_run.run_id).all()
        states = {ti.task_id: str(ti.state) for ti in tis}
        tries = {ti.task_id: ti.try_number for ti in tis}
    return {"run_id": dag_run.run_id, "state": str(dag_run.state), "states": states, "tries": tries,
            "seconds": time.time() - started}


def runs() -> dict:
    """The DAG's runs in the metadata database: run id, state and conf."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(DagRun).filter(DagRun.dag_id == "sd_distill").all()
        return {"runs": [{"run_id": r.run_id, "state": str(r.state), "conf": r.conf} for r in rows]}


def pods(conf: dict) -> dict:
    """Every task's pod as the operator builds it for a run with ``conf``, checked by kubernetes-validate."""
    import kubernetes_validate
    from kubernetes.client import ApiClient

    from sd_distill.orchestrators import common

    bag, _ = load_dag()
    dag = bag.dags["sd_distill"]
    params = copy.deepcopy(dag.params)
    params.update(conf)
    params.validate()  # the same JSON-schema check a triggered run gets
    values = {k: params[k] for k in params}
    version = kubernetes_validate.latest_version()
    out, errors = {}, {}
    for task in dag.tasks:
        ti = types.SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, map_index=-1, try_number=1)
        context = {"params": values, "run_id": "manual__2026-11-24T00:00:00+00:00", "ti": ti, "dag": dag}
        pod = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(context, dry_run=True))
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors[task.task_id] = str(exc)
        out[task.task_id] = pod
    trainjobs = {}
    if values["nodes"] > 1:  # what the training tasks hand to the Kubeflow Trainer instead of a pod
        for task in dag.tasks:
            if common.hands_off(task.stage, values["nodes"]):
                trainjobs[task.task_id] = task.build_trainjob_obj(
                    {"params": values, "run_id": "manual__2026-11-24T00:00:00+00:00"})
    return {"pods": out, "errors": errors, "kubernetes_version": version, "trainjobs": trainjobs}


if __name__ == "__main__":
    command = sys.argv[1]
    conf = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    result = {"parse": lambda: parse(conf.get("extra_stage", False)), "run": lambda: run(conf),
              "pods": lambda: pods(conf), "runs": runs}[command]()
    print(json.dumps(result, default=str))
