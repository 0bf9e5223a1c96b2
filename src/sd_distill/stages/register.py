"""Stage ``register``: ``models/student`` into the MLflow Model Registry, ``champion`` behind a quality gate.

Each new input (data manifest, student files, the metrics the decision reads, the register params) becomes one
new version of ``register.model_name``: the student logged as an image-generating pyfunc (``sd_distill.serving``)
in the stage's run, tagged with its key, gate result, decision and reasons, and given the ``candidate`` alias.
``champion`` moves to it only when every gate bound holds on the student's row of ``reports/metrics.json`` and it
beats the current champion on ``primary_metric`` (no champion yet: the gate alone decides). The same inputs again
change nothing: the version whose ``sd_distill.key`` tag matches is reported with ``created: false``.
Writes ``reports/registration.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from sd_distill.data.shards import MANIFEST  # the manifest holds every shard's sha256
from sd_distill.errors import UserError
from sd_distill.hashing import file_hashes, sha256_file
from sd_distill.names import MODEL_CARD, PARAMS_RECORD
from sd_distill.params import GateBound, RegisterParams
from sd_distill.serving import log_student, read_card

log = logging.getLogger(__name__)

TAG = "sd_distill."
KEY_TAG = TAG + "key"


class MissingMetric(UserError, KeyError):
    """A gate or primary metric that the student's row of ``reports/metrics.json`` does not have."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Champion:
    version: int
    value: float | None  # its primary metric, from its version tag; None when the tag is absent


@dataclass(frozen=True)
class Decision:
    passed: bool  # every gate bound holds
    promoted: bool  # passed and beats the champion (or there is none)
    reasons: str
    checks: list[dict] = field(default_factory=list)  # per bound: metric, op, value, found, ok
    champion: Champion | None = None

    @property
    def label(self) -> str:
        if self.promoted:
            return "promoted"
        return "gate failed" if not self.passed else f"kept champion v{self.champion.version}"


def _value(row: Mapping, metric: str) -> float:
    if metric not in row:
        numeric = sorted(k for k, v in row.items() if isinstance(v, (int, float)))
        raise MissingMetric(f"register: metric {metric!r} is not in the student's row of reports/metrics.json; "
                            f"the row has {numeric}")
    return float(row[metric])


def _holds(found: float, op: str, bound: float) -> bool:
    return found <= bound if op == "<=" else found >= bound  # NaN holds no bound


def decide(row: Mapping, bounds: Iterable[GateBound], primary_metric: str, mode: str,
           champion: Champion | None = None) -> Decision:
    """The gate and the champion comparison on one metrics row; pure (no MLflow).

    Passed: every bound holds (a NaN value holds none). Promoted: passed and strictly better than
    ``champion.value`` on ``primary_metric`` (lower for ``mode="min"``, higher for ``"max"``); with no champion,
    or one without a recorded value, the gate alone decides. Raises ``MissingMetric`` naming an absent key.
    """
    checks, reasons = [], []
    for b in bounds:
        found = _value(row, b.metric)
        ok = _holds(found, b.op, b.value)
        checks.append({"metric": b.metric, "op": b.op, "value": b.value, "found": found, "ok": ok})
        reasons.append(f"{b.metric} {found:.4g} {b.op} {b.value:g} {'ok' if ok else 'FAILED'}")
    passed = all(c["ok"] for c in checks)
    value = _value(row, primary_metric)
    if champion is None:
        beats = True
        reasons.append("no champion yet")
    elif champion.value is None:
        beats = True
        reasons.append(f"champion v{champion.version} has no {primary_metric} tag; the gate alone decides")
    else:
        op = "<" if mode == "min" else ">"
        beats = value < champion.value if mode == "min" else value > champion.value
        reasons.append(f"{primary_metric} {value:.4g} {op if beats else 'not ' + op} champion v{champion.version} "
                       f"{primary_metric} {champion.value:.4g}")
    return Decision(passed=passed, promoted=passed and beats, reasons="; ".join(reasons), checks=checks,
                    champion=champion)


def student_row(metrics_path: Path, student_dir: Path) -> tuple[str, dict]:
    """The evaluate stage's row for the assembled student: ``student@N``, N from its ``distill.json``."""
    card = read_card(student_dir)
    if "num_inference_steps" not in card:
        raise UserError(f"{student_dir / MODEL_CARD}: no num_inference_steps; run `sd-distill run assemble` first")
    name = f"student@{card['num_inference_steps']}"
    models = json.loads(Path(metrics_path).read_text()).get("models", {})
    if name not in models:
        raise UserError(f"{metrics_path}: no row {name!r} under 'models' (found {sorted(models)}); "
                        "run `sd-distill run evaluate` on this student first")
    return name, models[name]


def registration_key(data_dir: Path, student_dir: Path, row: Mapping, p: RegisterParams) -> str:
    """sha256 over what a registration depends on.

    Data: its manifest (which holds every shard's sha256), else every file. Student: every file's relative path
    and sha256, without the runner's ``params.resolved.json`` (a record of the resolved params, base.device
    included: a new device would otherwise register the same weights again). Metrics: only the values the
    decision reads, so re-timing the same model (``seconds_per_image``) is no new version. And the params.
    """
    manifest = Path(data_dir) / MANIFEST
    data = [(MANIFEST, sha256_file(manifest))] if manifest.is_file() else file_hashes(data_dir, {PARAMS_RECORD})
    metrics = sorted({b.metric for b in p.gate} | {p.primary_metric})
    body = {
        "data": data,
        "student": file_hashes(student_dir, {PARAMS_RECORD}),
        "metrics": {m: row.get(m) for m in metrics},
        "params": p.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _find(client: MlflowClient, name: str, key: str):
    found = client.search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _champion(client: MlflowClient, p: RegisterParams) -> Champion | None:
    try:
        mv = client.get_model_version_by_alias(p.model_name, p.champion_alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model / no alias yet
            return None
        raise
    raw = mv.tags.get(f"{TAG}metric.{p.primary_metric}")
    return Champion(int(mv.version), float(raw) if raw is not None else None)


GATE_TAG, REVOKED_TAG = TAG + "gate", TAG + "revoked"


def _champion_ranking(p: RegisterParams):
    """Sort key over versions: best ``primary_metric`` first, the earlier version on a tie (a newcomer must be
    strictly better to take over)."""
    sign = 1.0 if p.primary_mode == "min" else -1.0
    return lambda v: (sign * float(v.tags[f"{TAG}metric.{p.primary_metric}"]), int(v.version))


def _ensure_registered_model(client: MlflowClient, name: str, attempts: int = 20) -> None:
    """Create the registered model unless it exists. The first registrations of a new name racing each other can
    all find it absent; the losers of the insert read it back instead of failing."""
    for attempt in range(attempts):
        try:
            client.get_registered_model(name)
            return
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            client.create_registered_model(name)
            return
        except MlflowException as exc:  # created meanwhile (RESOURCE_ALREADY_EXISTS or the store's UNIQUE error)
            log.debug("register: creating %s raced another registration (%s); reading it again", name, exc)
            time.sleep(0.01 * (attempt + 1))
    client.get_registered_model(name)


def _move_alias(client: MlflowClient, name: str, alias: str, version, attempts: int = 20) -> bool:
    """Set ``alias``; MLflow's SQL store inserts the alias row after reading it absent, so two registrations at once
    can collide on its UNIQUE constraint: try again (the other writer's row is there by then)."""
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return True
        except MlflowException as exc:
            if "UNIQUE constraint" not in str(exc) and "IntegrityError" not in str(exc) and "Duplicate" not in str(exc):
                raise
            log.debug("register: moving %s raced another registration (%s); again", alias, exc)
            time.sleep(0.01 * (attempt + 1))
    return False


def settle_champion(client: MlflowClient, p: RegisterParams, attempts: int = 50) -> int | None:
    """Point ``champion`` at the best finished version that passed the gate, and check that it stayed there.

    Finished: it has its key tag (set last by ``register``). Best: ``primary_metric``, ties to the earlier version.
    Versions tagged ``sd_distill.revoked`` (a user taking one out of the running) are left out. Registrations running
    at the same time each re-read after writing until the alias they read is the best they see; the last one to
    finish sees every version, so the alias ends on the best of all, whatever the interleaving. Returns its version.
    """
    metric_tag = f"{TAG}metric.{p.primary_metric}"
    for _ in range(attempts):
        versions = client.search_model_versions(f"name = '{p.model_name}'")
        eligible = [v for v in versions if v.tags.get(GATE_TAG) == "pass" and KEY_TAG in v.tags
                    and REVOKED_TAG not in v.tags and metric_tag in v.tags]
        if not eligible:
            return None
        best = min(eligible, key=_champion_ranking(p))
        current = _champion(client, p)
        if current is not None and current.version == int(best.version):
            return current.version
        _move_alias(client, p.model_name, p.champion_alias, best.version, attempts=1)
    raise RuntimeError(f"register: the {p.champion_alias!r} alias of {p.model_name} kept moving under "
                       f"{attempts} re-reads; other registrations are still running, rerun this stage")


def register(client: MlflowClient, model_uri: str, row: Mapping, key: str,
             p: RegisterParams) -> tuple[ModelVersion, Decision]:
    """Register ``model_uri`` as a new version, tag it, move ``candidate`` to it and settle ``champion``.

    The key tag is set after the gate tags, so an interrupted registration is redone on the next run instead of
    being taken for a finished one, and an unfinished version is never made champion."""
    _ensure_registered_model(client, p.model_name)
    decision = decide(row, p.gate, p.primary_metric, p.primary_mode, _champion(client, p))
    mv = mlflow.register_model(model_uri, p.model_name)  # waits until READY (await_registration_for)
    metrics = sorted({b.metric for b in p.gate} | {p.primary_metric})
    tags = {f"{TAG}metric.{m}": repr(float(row[m])) for m in metrics}
    tags[GATE_TAG] = "pass" if decision.passed else "fail"
    for k, v in tags.items():
        client.set_model_version_tag(p.model_name, mv.version, k, v)
    _move_alias(client, p.model_name, p.candidate_alias, mv.version)
    client.set_model_version_tag(p.model_name, mv.version, KEY_TAG, key)
    champion = settle_champion(client, p)
    promoted = champion == int(mv.version)
    reasons = decision.reasons
    if decision.passed and not promoted and (decision.champion is None or decision.champion.version != champion):
        reasons += f"; v{champion}, registered meanwhile, ranks first"
    decision = Decision(passed=decision.passed, promoted=promoted, reasons=reasons, checks=decision.checks,
                        champion=decision.champion if promoted else _champion(client, p))
    client.set_model_version_tag(p.model_name, mv.version, f"{TAG}reasons", reasons)
    client.set_model_version_tag(p.model_name, mv.version, f"{TAG}decision", decision.label)
    return mv, decision


def _finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)


def main(ctx) -> None:
    p: RegisterParams = ctx.params.register
    student, data = ctx.inputs["student"], ctx.inputs["data"]
    row_name, row = student_row(ctx.inputs["metrics"], student)
    key = registration_key(data, student, row, p)
    client = MlflowClient()
    existing = _find(client, p.model_name, key)
    if existing is None:
        mv, decision = register(client, log_student(student, name="student").model_uri, row, key, p)
        version, label, reasons, checks = int(mv.version), decision.label, decision.reasons, decision.checks
    else:
        # same key: same row, bounds and params, so the per-bound checks are the same; the decision is the one
        # taken then (against the champion of that time), read back from the version's tags
        version = int(existing.version)
        label, reasons = existing.tags.get(f"{TAG}decision", ""), existing.tags.get(f"{TAG}reasons", "")
        checks = decide(row, p.gate, p.primary_metric, p.primary_mode).checks
        log.info("register: these inputs are already %s version %d (key %s); nothing new", p.model_name, version,
                 key[:12])
    aliases = sorted(client.get_model_version(p.model_name, str(version)).aliases)
    champion = _champion(client, p)
    record = {
        "model_name": p.model_name, "version": version, "created": existing is None, "key": key,
        "metrics_row": row_name, "gate": [{k: _finite(v) for k, v in c.items()} for c in checks],
        "passed": all(c["ok"] for c in checks), "decision": label, "reasons": reasons, "aliases": aliases,
        "champion_version": champion.version if champion else None,
        "model_uri": f"models:/{p.model_name}/{version}",
    }
    ctx.outputs["registration"].write_text(json.dumps(record, indent=2) + "\n")
    ctx.summary.update({"version": version, "promoted": int(label == "promoted"), "created": int(existing is None)})
    log.info("register: %s v%d %s (%s)", p.model_name, version, label, reasons)
