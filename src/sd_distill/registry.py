"""The one stage registry: a plain tuple of records that ``dvc.yaml``, the CLI and the orchestrators read.

Imports no torch, so DAG files and ``sd-distill stages`` stay fast. Paths live here and nowhere else:
a stage's entry receives them from its record (``ctx.inputs[...]`` / ``ctx.outputs[...]``).
The DAG of the whole product (later stages join this table as their issues land)::

    prepare -> teacher -> vpred -> guidance -> prune -> halve@N... -> assemble -> evaluate -> register
                      \\-> decoder ------------------------------------/
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd_distill.errors import UserError
from sd_distill.params import SECTIONS

CODE_COMMON = ("src/sd_distill/params.py",)


@dataclass(frozen=True)
class Resources:
    """What one run of the stage needs on a cluster node (Kubernetes quantities)."""

    gpus: int = 0
    cpu: str = "2"
    memory: str = "8Gi"
    gpus_sd15: int = 1  # the sd15 profile runs every model-touching stage on a GPU


@dataclass(frozen=True)
class Stage:
    name: str  # = params section = DVC stage = Airflow task_id = KFP component = MLflow run name
    entry: str  # "module:function", imported only when the stage runs
    doc: str
    inputs: dict[str, str] = field(default_factory=dict)  # role -> path (DVC deps)
    outputs: dict[str, str] = field(default_factory=dict)  # role -> path (DVC outs, cached)
    metrics: dict[str, str] = field(default_factory=dict)  # role -> path (DVC metrics, cache: false)
    plots: dict[str, str] = field(default_factory=dict)  # role -> path (DVC plots, cache: false)
    code: tuple[str, ...] = ()  # source files whose change reruns the stage
    resources: Resources = Resources()

    @property
    def params_section(self) -> str:
        return self.name

    @property
    def produced(self) -> dict[str, str]:
        return {**self.outputs, **self.metrics, **self.plots}


STAGES: tuple[Stage, ...] = (
    Stage(
        name="prepare",
        entry="sd_distill.stages.prepare:main",
        doc="image-caption pairs -> checked, split tar shards + manifest; tiny: digits and their classifier",
        outputs={"data": "data/prepared"},
        code=("src/sd_distill/stages/prepare.py", "src/sd_distill/data", "src/sd_distill/models/classifier.py"),
        resources=Resources(cpu="2", memory="8Gi", gpus_sd15=0),
    ),
    Stage(
        name="teacher",
        entry="sd_distill.stages.teacher:main",
        doc="tiny/smoke: train an SD-shaped epsilon teacher from scratch; sd15: fetch the public checkpoint",
        inputs={"data": "data/prepared"},
        outputs={"model": "models/teacher"},
        code=("src/sd_distill/stages/teacher.py", "src/sd_distill/models/parts.py",
              "src/sd_distill/models/tokenizer.py", "src/sd_distill/training"),
        resources=Resources(cpu="4", memory="16Gi"),
    ),
    Stage(
        name="evaluate",
        entry="sd_distill.stages.evaluate:main",
        doc="sample the models, score prompt adherence and FID, write reports/metrics.json",
        inputs={"data": "data/prepared", "teacher": "models/teacher"},
        metrics={"metrics": "reports/metrics.json"},
        plots={"samples": "reports/teacher_samples.png"},
        code=("src/sd_distill/stages/evaluate.py", "src/sd_distill/models/classifier.py"),
        resources=Resources(cpu="4", memory="16Gi"),
    ),
)


def get(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise UserError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def upstream(stage: Stage) -> list[str]:
    """Names of the stages whose produced paths this stage reads (the DAG's edges)."""
    producers = {path: s.name for s in STAGES for path in s.produced.values()}
    return sorted({producers[p] for p in stage.inputs.values() if p in producers})


def edges() -> list[tuple[str, str]]:
    return [(up, s.name) for s in STAGES for up in upstream(s)]


def check() -> None:
    """Registry invariants: unique names, one params section each, inputs made upstream, acyclic order."""
    seen: set[str] = set()
    made: set[str] = set()
    for s in STAGES:
        if s.name in seen:
            raise ValueError(f"stage {s.name!r} appears twice in the registry")
        if s.params_section not in SECTIONS:
            raise ValueError(f"stage {s.name!r} has no params section {s.params_section!r}")
        for role, path in s.inputs.items():
            if path not in made:
                raise ValueError(f"stage {s.name!r} input {role}={path} is not produced by an earlier stage")
        seen.add(s.name)
        made.update(s.produced.values())
