"""``sd-distill``: run the stages of the distillation DAG, one at a time or all through DVC."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess  # nosec B404: runs dvc from this environment, an argument list, no shell
import sys
from pathlib import Path

EXAMPLES = """examples:
  sd-distill stages                         the DAG, in order, with inputs and outputs
  sd-distill params --set teacher.unet_train.steps=50
  sd-distill run prepare                    one stage, reading ./params.yaml
  sd-distill run teacher --resume           continue from the stage's last checkpoint
  sd-distill run teacher --force            rerun a stage that is up to date
  sd-distill repro                          every stage through `dvc repro`, under one MLflow parent run
  sd-distill run halve@8 --profile smoke --overrides '{"halve.train.batch_size": 16}'   as Airflow/Kubeflow do
  sd-distill kfp compile                    components/sd_distill_pipeline.yaml for Kubeflow Pipelines
  sd-distill sample models/teacher --prompt "a handwritten digit seven" --steps 64 --guidance 7.5 --out seven.png
  sd-distill sample models/steps-1 --prompt "a handwritten digit seven" --out seven-1step.png --scale 8
  sd-distill inspect --arch sd15 --bk small --decoder tiny   parameters and MACs per call, nothing downloaded
  sd-distill report                         the evaluation's comparison table in the terminal
  sd-distill bench --resolution 256         teacher against student timed on this machine: reports/bench.md
  sd-distill plan --profile sd15 --gpu a100-80gb   per stage: samples, FLOPs, GPU-hours, memory, fits or not
"""

ENVIRONMENT = """environment:
  MLFLOW_TRACKING_URI       where runs are logged (default: sqlite:///mlflow.db in the project folder)
  MLFLOW_EXPERIMENT_NAME    the MLflow experiment (default: sd-distill)
  SD_DISTILL_PARENT_RUN_ID  the MLflow run a stage's run is logged under (`sd-distill repro` sets it)
  RANK, WORLD_SIZE          set by torchrun / accelerate launch: this process's rank and the process count
"""


def epilog() -> str:
    """``--help``'s closing text: examples, exit statuses (``errors.EXIT_STATUSES``), environment."""
    from sd_distill.errors import exit_status_help

    return "\n".join((EXAMPLES, exit_status_help(), ENVIRONMENT))


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", type=Path, help="params file (default: ./params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one param for this run (YAML value); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd-distill", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog(),
        description="Distill a Stable Diffusion teacher into fast, small students. Every stage reads its "
                    "section of params.yaml; profiles: tiny (CPU, minutes), smoke (tests), sd15 (GPUs).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stages", help="list the stages in DAG order with inputs and outputs")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("params", help="print the resolved params (profile preset + params.yaml + --set)")
    _params_args(p)

    p = sub.add_parser("run", help="run one stage in the current project folder")
    p.add_argument("stage", help="stage name (see `sd-distill stages`)")
    _params_args(p)
    p.add_argument("--resume", action="store_true", help="continue training from the stage's last checkpoint")
    p.add_argument("--force", action="store_true",
                   help="run even if the stage is up to date (same inputs and params as its last finished run)")
    p.add_argument("--dry-run", action="store_true", help="resolve and print the params, run nothing")
    orch = p.add_argument_group("run parameters from an orchestrator (Airflow, Kubeflow)")
    orch.add_argument("--profile", choices=("tiny", "smoke", "sd15"), default=None,
                      help="use this profile instead of the params file's; the params file may then be absent")
    orch.add_argument("--overrides", dest="overrides_json", default=None, metavar="JSON",
                      help='JSON object of section.key to value, e.g. \'{"teacher.unet_train.steps": 50}\'; '
                           "applied like --set")
    orch.add_argument("--pipeline-run", default=None, metavar="ID",
                      help="the orchestrated run this stage belongs to: tags its MLflow run; a retry with the "
                           "same id resumes from the stage's last checkpoint")

    p = sub.add_parser("repro", help="run the DAG with `dvc repro` under one MLflow parent run")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to `dvc repro`")

    p = sub.add_parser("dvc", help="write dvc.yaml from the stage registry")
    p.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is not up to date, write nothing")

    p = sub.add_parser(
        "kfp", help="the Kubeflow Pipelines v2 pipeline built from the stage registry",
        description="compile: write the pipeline `sd-distill` (a component per stage, the registry's edges) to "
                    "components/sd_distill_pipeline.yaml, for `kfp.Client().create_run_from_pipeline_package` or "
                    "the Kubeflow UI's upload.")
    p.add_argument("action", choices=("compile",))
    p.add_argument("--out", type=Path, default=Path("components/sd_distill_pipeline.yaml"),
                   help="pipeline YAML to write (default: components/sd_distill_pipeline.yaml)")
    p.add_argument("--image", default=None, help="trainer image every component runs (default: the release's)")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date, write nothing")

    from sd_distill.names import MODEL_CARD

    p = sub.add_parser("sample", help="sample one image from a diffusers model folder")
    p.add_argument("model_dir", type=Path, help="a StableDiffusionPipeline folder, e.g. models/teacher")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default: the student's own count from {MODEL_CARD}, else 64)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale, 1 disables (default 7.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("sample.png"), help="PNG to write (default sample.png)")
    p.add_argument("--scale", type=int, default=1, help="upscale the PNG by this factor (nearest), for tiny models")

    from sd_distill.models.bk import VARIANTS

    p = sub.add_parser(
        "inspect", help="parameters and MACs per call of SD v1.5 or a model folder, with BK-SDM cuts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Count parameters (UNet, VAE decoder and encoder, text encoder) and multiply-accumulates per\n"
                    "call (one UNet call, one latent decoded) at the model's resolution (512x512 for sd15), batch 1.\n"
                    "--arch builds the model from its published configs on the meta device: random weights,\n"
                    "nothing downloaded, no memory. A PATH is loaded offline; --bk and --decoder tiny add random\n"
                    "parts built from its configs. Counts do not depend on the weights.\n\n"
                    "MACs = FLOPs / 2 of matmuls and convolutions (torch FlopCounterMode; norms, activations and\n"
                    "softmax are not counted), split into the attention matmuls (QK^T and AV inside attention)\n"
                    "and everything else (convolutions and linear layers, q/k/v/out projections included). The\n"
                    "widely quoted 339G MACs of SD v1.5's UNet is the figure without attention matmuls; with\n"
                    "them one call is ~402G MACs (~803 GFLOPs).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("model_dir", nargs="?", type=Path, metavar="PATH",
                     help="a StableDiffusionPipeline folder, e.g. models/teacher or models/student")
    src.add_argument("--arch", help="a published architecture built from its configs; one of: sd15")
    p.add_argument("--bk", default="none", choices=VARIANTS,
                   help="cut the UNet to a BK-SDM variant first and compare with the uncut parent (default none)")
    p.add_argument("--decoder", choices=("full", "tiny"), default=None,
                   help="full: the AutoencoderKL decoder; tiny: a TAESD-shaped AutoencoderTiny (64 channels) in "
                        "its place (default: the model's own decoder)")
    p.add_argument("--json", action="store_true", help="JSON on stdout, nothing else")

    p = sub.add_parser(
        "report", help="print the comparison table of every evaluated model (from reports/metrics.json)",
        description="Every model the evaluate stage scored, side by side: UNet calls per image, FID and its ratio "
                    "to the teacher, accuracy (tiny) or CLIP score (sd15), latency per image and speedup against "
                    "the teacher, peak memory (CUDA), UNet parameters and MACs, decoder. reports/report.md holds "
                    "the same table with the sample grid and the Pareto plot.")
    p.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"),
                   help="metrics file written by the evaluate stage (default: reports/metrics.json)")
    p.add_argument("--sort", choices=("none", "fid", "latency"), default="none",
                   help="row order: evaluation order (default), best FID first, or fastest first")

    from sd_distill import bench

    bench.add_arguments(sub.add_parser("bench", help=bench.HELP, description=bench.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))

    p = sub.add_parser(
        "plan", help="per training stage of a profile: samples, FLOPs, GPU-hours, GPU memory, whether it fits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Before training: for every training stage of the resolved params (profile preset +\n"
                    "params.yaml + --set), optimizer steps, global batch, samples seen, training FLOPs per sample\n"
                    "and in all, projected GPU-hours on --gpu at --mfu, and the GPU memory estimate: fp32 weights,\n"
                    "gradients, optimizer state, EMA, autocast's half-precision weight copies, frozen models, and\n"
                    "activations = micro-batch x the bytes autograd saves per sample, measured on the real\n"
                    "architecture (built from its configs on the meta device: nothing is downloaded, no GPU is\n"
                    "needed). FLOPs are model FLOPs (a trained call counts 3 forwards; recomputation under gradient\n"
                    "checkpointing is what the MFU absorbs). Not a measurement.\n\n"
                    "exit status: 0 every stage fits; 2 a stage does not fit the GPU (each is named), or bad params")
    _params_args(p)
    p.add_argument("--profile", choices=("tiny", "smoke", "sd15"), default=None,
                   help="plan this profile instead of the params file's (its sections still apply; the file "
                        "may then be absent)")
    p.add_argument("--gpu", default="a100-80gb", help="a100-40gb, a100-80gb (default), h100-80gb, h100-pcie, h200 "
                   "or l40s: its dense bf16 (fp32 without mixed precision) peak and memory")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the GPU-hours "
                   "(default 0.4: SD v1.5 inference at batch 16 reaches ~39%% of an A100's peak with torch.compile, "
                   "diffusers docs, optimization/torch2.0)")
    p.add_argument("--json", action="store_true", help="JSON on stdout, nothing else")
    return parser


def cmd_stages(args) -> int:
    from sd_distill import registry

    rows = [{"name": s.name, "doc": s.doc, "after": registry.upstream(s), "params": s.params_section,
             "inputs": s.inputs, "outputs": s.produced, "resources": vars(s.resources)} for s in registry.STAGES]
    if args.json:
        print(json.dumps({"stages": rows, "edges": registry.edges()}, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<10} {r['doc']}")
        print(f"{'':<10} after: {', '.join(r['after']) or '-'}")
        print(f"{'':<10} in:    {', '.join(r['inputs'].values()) or '-'}")
        print(f"{'':<10} out:   {', '.join(r['outputs'].values())}")
    return 0


def cmd_params(args) -> int:
    from sd_distill.params import resolve

    print(resolve(args.params, args.overrides).to_json())
    return 0


def cmd_run(args) -> int:
    from sd_distill import registry
    from sd_distill.errors import UserError
    from sd_distill.params import overrides_to_set, resolve

    stage = registry.get(args.stage)
    overrides = list(args.overrides)
    if args.overrides_json is not None:
        try:
            mapping = json.loads(args.overrides_json)
        except json.JSONDecodeError as exc:
            raise UserError(f"--overrides: not valid JSON ({exc}): {args.overrides_json!r}") from None
        overrides += overrides_to_set(mapping)
    params = resolve(args.params, overrides, profile=args.profile)
    if args.dry_run:
        print(json.dumps(params.for_stage(stage.params_section), indent=2))
        return 0
    from sd_distill.runner import run_stage

    summary = run_stage(stage.name, params, root=args.params.resolve().parent, resume=args.resume,
                        pipeline_run=args.pipeline_run, force=args.force)
    print(json.dumps({"stage": stage.name, **summary}, indent=2))
    return 0


def cmd_repro(args) -> int:
    from sd_distill import tracking
    from sd_distill.errors import UserError
    from sd_distill.params import resolve

    params = resolve(Path("params.yaml"))
    # dvc and the stages' `sd-distill run` come from this interpreter's environment, activated or not
    env = os.environ.copy()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        raise UserError("`dvc` is not installed next to this Python nor on PATH; "
                        "run `make setup` (or `pip install -e .`) first")
    with tracking.pipeline_run(Path("."), params.profile) as run_id:
        logging.getLogger("sd_distill").info("MLflow parent run %s", run_id)
        env[tracking.PARENT_ENV] = run_id  # the stages log child runs under it
        rc = subprocess.call([dvc, "repro", *args.dvc_args], env=env)  # nosec B603: dvc next to this Python, a list
        if rc:
            raise SystemExit(rc)
    return 0


def cmd_dvc(args) -> int:
    from sd_distill import dvcgen

    path = Path("dvc.yaml")
    if args.check:
        if not path.is_file() or path.read_text() != dvcgen.render():
            print("dvc.yaml is out of date with the stage registry; run `sd-distill dvc`", file=sys.stderr)
            return 1
        return 0
    print("dvc.yaml " + ("written" if dvcgen.write(path) else "already up to date"))
    return 0


def cmd_kfp(args) -> int:
    from sd_distill.orchestrators import common, kubeflow

    image = args.image or common.IMAGE
    if args.check:
        if not args.out.is_file() or args.out.read_text() != kubeflow.render(image):
            print(f"{args.out} is out of date with the stage registry; run `sd-distill kfp compile`",
                  file=sys.stderr)
            return 1
        return 0
    print(f"{args.out} " + ("written" if kubeflow.write(args.out, image) else "already up to date"))
    return 0


def cmd_sample(args) -> int:
    import torch
    from PIL import Image

    from sd_distill.models.parts import load_pipeline
    from sd_distill.names import MODEL_CARD

    pipe = load_pipeline(args.model_dir)
    card = args.model_dir / MODEL_CARD
    steps = args.steps or (json.loads(card.read_text())["num_inference_steps"] if card.is_file() else 64)
    image = pipe(args.prompt, num_inference_steps=steps, guidance_scale=args.guidance,
                 generator=torch.Generator().manual_seed(args.seed)).images[0]
    if args.scale > 1:
        image = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height}, {steps} steps, guidance {args.guidance})")
    return 0


def cmd_report(args) -> int:
    from sd_distill import report

    metrics = report.load(args.metrics)
    key = {"fid": "fid", "latency": "latency_ms"}.get(args.sort)
    if key:
        ordered = sorted(metrics["models"].items(), key=lambda kv: (kv[1].get(key) is None, kv[1].get(key)))
        metrics = {**metrics, "models": dict(ordered)}
    report.print_table(metrics)
    return 0


def cmd_inspect(args) -> int:
    from sd_distill.models import costs

    if args.arch is not None:
        report = costs.report_arch(args.arch, args.bk, args.decoder)
    else:
        report = costs.report_folder(args.model_dir, args.bk, args.decoder)
    print(json.dumps(report, indent=2) if args.json else costs.render(report))
    return 0


def cmd_bench(args) -> int:
    from sd_distill import bench

    return bench.main(args)


def cmd_plan(args) -> int:
    from sd_distill import plan

    return plan.main(args)


COMMANDS = {"stages": cmd_stages, "params": cmd_params, "run": cmd_run, "repro": cmd_repro, "dvc": cmd_dvc,
            "kfp": cmd_kfp, "sample": cmd_sample, "inspect": cmd_inspect, "report": cmd_report, "bench": cmd_bench,
            "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers warns at import that torchvision is absent; sd-distill uses no image processors
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # mlflow sets its loggers' level when imported (after the lines below): its INFO lines are not ours to print
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sd_distill.errors import Preempted, UserError

    try:
        return COMMANDS[args.command](args)
    except Preempted as exc:
        print(f"sd-distill {args.command}: {exc}", file=sys.stderr)
        return Preempted.EXIT_CODE
    except UserError as exc:  # anything else (a stage's FileNotFoundError too) is a bug: traceback, status 1
        if args.verbose:
            raise
        print(f"sd-distill {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "EXIT_CODE", UserError.EXIT_CODE)


if __name__ == "__main__":
    sys.exit(main())
