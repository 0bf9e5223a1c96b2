"""The one stage registry: a plain tuple of records that ``dvc.yaml``, the CLI and the orchestrators read.

Imports no torch, so DAG files and ``sd-distill stages`` stay fast. Paths live here and nowhere else:
a stage's entry receives them from its record (``ctx.inputs[...]`` / ``ctx.outputs[...]``).
The DAG of the whole product (later stages join this table as their issues land)::

    prepare -> teacher -> encode -> vpred -> guidance -> prune -> halve@32 -> ... -> halve@1 -> assemble -> evaluate -> register
                                                                                   \\-> dmd -> assemble, evaluate
                      \\-> decoder -------------------------------------------------/
                      \\-> reference -----------------------------------------------------------------------/
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd_distill.errors import UserError
from sd_distill.params import HALVING_STEPS, SECTIONS



@dataclass(frozen=True)
class Resources:
    """What one run of the stage needs on a cluster node (Kubernetes quantities)."""

    gpus: int = 0
    cpu: str = "2"
    memory: str = "8Gi"
    gpus_sd15: int = 1  # the sd15 profile runs every model-touching stage on a GPU
    data_parallel: bool = False  # trains with the training loop: runs on all the run's GPUs under torchrun


@dataclass(frozen=True)
class Stage:
    name: str  # = DVC stage = MLflow run name; Airflow task / KFP task: common.task_name (halve@32 -> halve-32)
    entry: str  # "module:function", imported only when the stage runs
    doc: str
    inputs: dict[str, str] = field(default_factory=dict)  # role -> path (DVC deps)
    outputs: dict[str, str] = field(default_factory=dict)  # role -> path (DVC outs, cached)
    metrics: dict[str, str] = field(default_factory=dict)  # role -> path (DVC metrics, cache: false)
    plots: dict[str, str] = field(default_factory=dict)  # role -> path (DVC plots, cache: false)
    plot_specs: dict[str, dict] = field(default_factory=dict)  # path -> DVC top-level plot definition
    reports: dict[str, str] = field(default_factory=dict)  # role -> path of a document (DVC outs, cache: false)
    resources: Resources = Resources()

    @property
    def params_section(self) -> str:
        """Rounds of one stage (``halve@32``, ``halve@16``...) share their section (``halve``)."""
        return self.name.split("@")[0]

    @property
    def group(self) -> str:
        return self.name.split("@")[0]

    @property
    def produced(self) -> dict[str, str]:
        return {**self.outputs, **self.metrics, **self.plots, **self.reports}


MODEL_STAGE = Resources(cpu="4", memory="16Gi")  # a stage that samples a model (one GPU)
TRAIN_STAGE = Resources(cpu="4", memory="16Gi", data_parallel=True)  # a stage that trains one
LATENTS = "data/latents"


def halving_rounds() -> tuple[Stage, ...]:
    """One stage per round, ``halve@N`` for N in 32, 16, ..., 1; round N's teacher is round 2N's student."""
    rounds = []
    teacher = "models/pruned"
    for n in HALVING_STEPS:
        rounds.append(Stage(
            name=f"halve@{n}",
            entry="sd_distill.stages.halve:main",
            doc=f"progressive distillation round: {2 * n}-step teacher -> {n}-step student (w-conditioned)",
            inputs={"latents": LATENTS, "teacher": teacher},
            outputs={"model": f"models/steps-{n}"},
            resources=TRAIN_STAGE,
        ))
        teacher = f"models/steps-{n}"
    return tuple(rounds)


STAGES: tuple[Stage, ...] = (
    Stage(
        name="prepare",
        entry="sd_distill.stages.prepare:main",
        doc="image-caption pairs -> checked, split tar shards + manifest; tiny: digits and their classifier",
        outputs={"data": "data/prepared"},
        resources=Resources(cpu="2", memory="8Gi", gpus_sd15=0),
    ),
    Stage(
        name="teacher",
        entry="sd_distill.stages.teacher:main",
        doc="tiny/smoke: train an SD-shaped epsilon teacher from scratch; sd15: fetch the public checkpoint",
        inputs={"data": "data/prepared"},
        outputs={"model": "models/teacher"},
        resources=TRAIN_STAGE,
    ),
    Stage(
        name="encode",
        entry="sd_distill.stages.encode:main",
        doc="the teacher VAE's posteriors (fp16) and caption token ids of every prepared sample, once, as "
            "memory-mapped shards that every training stage reads",
        inputs={"data": "data/prepared", "teacher": "models/teacher"},
        outputs={"latents": LATENTS},
        resources=TRAIN_STAGE,  # data-parallel: each process encodes its share of the shards
    ),
    Stage(
        name="vpred",
        entry="sd_distill.stages.vpred:main",
        doc="fine-tune the teacher to v-prediction (optionally on a zero-terminal-SNR schedule)",
        inputs={"latents": LATENTS, "teacher": "models/teacher"},
        outputs={"model": "models/vpred"},
        resources=TRAIN_STAGE,
    ),
    Stage(
        name="guidance",
        entry="sd_distill.stages.guidance:main",
        doc="distill classifier-free guidance into a w-conditioned UNet (one call per step)",
        inputs={"latents": LATENTS, "vpred": "models/vpred"},
        outputs={"model": "models/guided"},
        resources=TRAIN_STAGE,
    ),
    Stage(
        name="prune",
        entry="sd_distill.stages.prune:main",
        doc="BK-SDM block removal (base/small/tiny) distilled from the guided model; none: copy it through",
        inputs={"latents": LATENTS, "guided": "models/guided"},
        outputs={"model": "models/pruned"},
        resources=TRAIN_STAGE,
    ),
    *halving_rounds(),
    Stage(
        name="dmd",
        entry="sd_distill.stages.dmd:main",
        doc="DMD2 one-step refinement of steps-1: distribution matching against the CFG teacher plus a diffusion "
            "GAN on the real latents, with a fake score trained beside it",
        inputs={"latents": LATENTS, "generator": f"models/steps-{HALVING_STEPS[-1]}", "vpred": "models/vpred",
                "guided": "models/guided", "pruned": "models/pruned"},
        outputs={"model": "models/dmd"},
        resources=TRAIN_STAGE,
    ),
    Stage(
        name="decoder",
        entry="sd_distill.stages.decoder:main",
        doc="distill a TAESD-style AutoencoderTiny from the teacher's VAE (beside the UNet branch)",
        inputs={"data": "data/prepared", "latents": LATENTS, "teacher": "models/teacher"},
        outputs={"model": "models/decoder"},
        metrics={"metrics": "reports/decoder.json"},
        resources=TRAIN_STAGE,
    ),
    Stage(
        name="assemble",
        entry="sd_distill.stages.assemble:main",
        doc="models/student: the chosen UNet (assemble.source; auto: dmd or steps-1, the lower validation FID) + "
            "tiny decoder + text encoder + DDIM scheduler",
        inputs={"teacher": "models/teacher", "decoder": "models/decoder", "data": "data/prepared", "dmd": "models/dmd",
                **{f"steps-{n}": f"models/steps-{n}" for n in HALVING_STEPS}},
        outputs={"model": "models/student"},
        resources=MODEL_STAGE,  # auto samples both one-step candidates: a GPU in sd15
    ),
    Stage(
        name="reference",
        entry="sd_distill.stages.reference:main",
        doc="the real images' feature statistics for FID (count, sum, sum of outer products), computed once: the "
            "digits test split (tiny, smoke) or MS-COCO val2017 through Inception (sd15), read in batches",
        inputs={"data": "data/prepared", "teacher": "models/teacher"},  # the teacher: the side of its images
        outputs={"reference": "data/reference"},
        resources=MODEL_STAGE,  # sd15: Inception on the GPU
    ),
    Stage(
        name="evaluate",
        entry="sd_distill.stages.evaluate:main",
        doc="score every model and the teacher's solver baselines (quality, cost, latency); metrics, plots, "
            "grid, Pareto plot and report.md",
        inputs={"data": "data/prepared", "teacher": "models/teacher", "guided": "models/guided",
                "pruned": "models/pruned", **{f"steps-{n}": f"models/steps-{n}" for n in HALVING_STEPS},
                "dmd": "models/dmd", "student": "models/student", "reference": "data/reference"},
        metrics={"metrics": "reports/metrics.json"},
        plots={"quality": "reports/quality_vs_steps.csv", "pareto": "reports/pareto.csv",
               "grid": "reports/grid.png", "pareto_plot": "reports/pareto.png"},
        plot_specs={
            "reports/quality_vs_steps.csv": {
                "x": "steps", "y": ["student_fid", "dpmpp_fid", "ddim_fid"],
                "title": "FID against sampling steps: students vs the teacher's solvers",
                "x_label": "sampling steps", "y_label": "FID"},
            "reports/pareto.csv": {
                "x": "latency_ms", "y": "fid", "template": "scatter",
                "title": "FID against latency per image (one point per model)",
                "x_label": "ms per image (batch 1, median)", "y_label": "FID"}},
        reports={"report": "reports/report.md"},
        resources=MODEL_STAGE,
    ),
    Stage(
        name="register",
        entry="sd_distill.stages.register:main",
        doc="log models/student to MLflow as an image-generating pyfunc, register a version, move "
            "`champion` to it only past the quality gate",
        inputs={"data": "data/prepared", "student": "models/student", "metrics": "reports/metrics.json"},
        metrics={"registration": "reports/registration.json"},
        resources=MODEL_STAGE,  # logging the pyfunc samples its input example once (sd15: on the GPU)
    ),
)


def get(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise UserError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def producer(path: str) -> str | None:
    """The name of the stage that produces ``path`` (a project-relative path as the records give it); None if none."""
    return next((s.name for s in STAGES if path in s.produced.values()), None)


def upstream(stage: Stage) -> list[str]:
    """Names of the stages whose produced paths this stage reads (the DAG's edges)."""
    return sorted({up for p in stage.inputs.values() if (up := producer(p)) is not None})


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
