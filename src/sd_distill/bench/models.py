"""Part 2 of ``sd-distill bench``: the project's teacher and student through the stock pipeline, and the teacher
with DPM-Solver++ at the fewest steps whose FID matches the student's."""

from __future__ import annotations

import json
from pathlib import Path

from sd_distill.bench.timing import Options, Session, _torch_dtype
from sd_distill.errors import UserError

def equal_quality(metrics: dict) -> dict:
    """From evaluate's ``metrics.json``: the student's row and the fewest-step ``teacher-dpmpp@N`` row whose FID is
    at most the student's (``match`` None when no step count reaches it)."""
    models = metrics.get("models", {})
    student = next((name for name in models if name.startswith("student@")), None)
    if student is None:
        return {"student": None, "match": None, "note": "no student@N row (run the evaluate stage after assemble)"}
    fid = models[student]["fid"]
    found = sorted((m["steps"], name) for name, m in models.items()
                   if name.startswith("teacher-dpmpp@") and m.get("fid") is not None and m["fid"] <= fid)
    out = {"student": student, "student_fid": fid, "match": found[0][1] if found else None}
    if found:
        out.update(match_steps=found[0][0], match_fid=models[found[0][1]]["fid"])
    else:
        out["note"] = f"no teacher-dpmpp@N row reaches the student's FID {fid:.4g}"
    return out


def run_models(session: Session, o: Options, project: Path, params) -> dict:
    """Images/s of models/teacher at ``evaluate.sampling_steps`` guided steps, the teacher with DPM-Solver++ at the steps that
    match the student's FID, and models/student, through the stock pipeline in alternating runs."""
    folders = {role: project / "models" / role for role in ("teacher", "student")}
    missing = [str(f) for f in folders.values() if not (f / "model_index.json").is_file()]
    if missing:
        return {"skipped": f"part 2 skipped: {' and '.join(missing)} not found (no model_index.json); `make run` "
                           "makes the tiny profile's models"}
    import torch

    from sd_distill.data.sources import DIGIT_WORDS
    from sd_distill.models.parts import load_pipeline
    from sd_distill.names import MODEL_CARD
    from sd_distill.stages.evaluate import Candidate, with_solver

    p = params.evaluate
    metrics_file = project / "reports" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    quality = (equal_quality(metrics) if metrics
               else {"match": None, "note": f"{metrics_file} not found: run the evaluate stage for the FID match"})
    card = folders["student"] / MODEL_CARD
    if not card.is_file():
        raise UserError(f"{card}: missing; the assemble stage writes it with the student's num_inference_steps")
    student_steps = json.loads(card.read_text())["num_inference_steps"]
    prompts = [p.prompt_template.format(word=DIGIT_WORDS[i % 10]) for i in range(o.batch)]
    todo = [Candidate(f"teacher@{p.sampling_steps}", "teacher", "own", p.sampling_steps)]
    if quality["match"]:
        todo.append(Candidate(quality["match"], "teacher", "dpmpp", quality["match_steps"]))
    todo.append(Candidate(f"student@{student_steps}", "student", "own", student_steps))
    pipes = {c.name: with_solver(load_pipeline(folders[c.model], o.device, _torch_dtype(o.dtype)), c.solver)
             for c in todo}

    def run(pipe, steps: int):
        def call():
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]  # the same seeds every run
            return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=p.guidance, generator=gens,
                        output_type="np")
        return call

    repeats = max(5, session.repeats)
    timed = session.alternate({f"models/{c.name}": (run(pipes[c.name], c.steps), o.batch) for c in todo}, repeats)
    rows = []
    for c in todo:
        m = timed[f"models/{c.name}"]
        calls = c.unet_calls(pipes[c.name].unet.config.time_cond_proj_dim is not None, p.guidance)
        rows.append({"name": c.name, "folder": str(folders[c.model].relative_to(project)), "solver": c.solver,
                     "steps": c.steps, "unet_calls_per_image": calls, "from": [m.label],
                     "ms_per_image": m.median / m.batch * 1e3, "images_per_s": m.batch / m.median,
                     "fid": metrics.get("models", {}).get(c.name, {}).get("fid")})
    student, teacher = rows[-1], rows[0]
    targets = [{"name": f"student images/s at least 30x {teacher['name']}", "threshold": 30.0,
                "value": student["images_per_s"] / teacher["images_per_s"], "from": student["from"] + teacher["from"]}]
    if quality["match"]:
        dpm = rows[1]
        targets.append({"name": f"student images/s at least 4x {dpm['name']} (its FID matches the student's)",
                        "threshold": 4.0, "value": student["images_per_s"] / dpm["images_per_s"],
                        "from": student["from"] + dpm["from"]})
    else:
        targets.append({"name": "student images/s at least 4x the teacher with DPM-Solver++ at the steps that match "
                                f"its FID: not checkable ({quality['note']})", "threshold": 4.0, "value": None,
                        "from": []})
    for t in targets:
        t["pass"] = None if t["value"] is None else t["value"] >= t["threshold"]
    return {"batch": o.batch, "prompts": prompts, "guidance": p.guidance, "repeats": repeats,
            "equal_quality": quality, "rows": rows, "targets": targets}

