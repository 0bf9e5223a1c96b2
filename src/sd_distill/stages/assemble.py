"""Stage ``assemble``: the product, ``models/student``, one stock ``StableDiffusionPipeline`` folder.

It joins the step-distilled UNet of ``assemble.steps`` (pruned when ``prune.variant`` is not ``none``, with the
guidance input), the distilled tiny decoder (``AutoencoderTiny``; ``assemble.decoder: full`` keeps the
teacher's VAE), the teacher's text encoder and tokenizer, and the student's DDIM scheduler (v_prediction,
trailing spacing). ``StableDiffusionPipeline.from_pretrained("models/student")`` loads it offline and makes
one UNet call per step; ``distill.json`` says how many steps and which guidance range it was trained for.
"""

from __future__ import annotations

import json

from diffusers import AutoencoderTiny

from sd_distill.errors import UserError
from sd_distill.models.parts import Needs, assemble, check_pipeline, load_model, load_pipeline, name_source
from sd_distill.params import AssembleParams
from sd_distill.stages.halve import MODEL_CARD, check_card, teacher_needs


def build_student(steps_dir, teacher_dir, decoder_dir, p: AssembleParams):
    """The assembled pipeline and its model card."""
    producer, needs = f"halve@{p.steps}", teacher_needs("assemble", f"halve@{p.steps}")
    check_pipeline(steps_dir, needs)
    check_card(steps_dir, p.steps, "assemble", producer)
    steps = load_pipeline(steps_dir, needs=needs)
    if p.decoder == "tiny":
        if not (decoder_dir / "config.json").is_file():
            raise FileNotFoundError(f"{decoder_dir}: no AutoencoderTiny folder (config.json); run `sd-distill run "
                                    "decoder` first, or set assemble.decoder=full")
        vae = load_model(AutoencoderTiny, decoder_dir, producer="decoder")
        name_source(vae, decoder_dir.name)
    else:
        vae = load_pipeline(teacher_dir, needs=Needs(stage="assemble", producer="teacher", vae="AutoencoderKL")).vae
    pipe = assemble(vae, steps.text_encoder, steps.tokenizer, steps.unet, steps.scheduler)
    card = json.loads((steps_dir / MODEL_CARD).read_text())
    card.update({
        "decoder": p.decoder,
        "decoder_class": type(vae).__name__,
        "guidance_scale": p.guidance,
        "unet_parameters": sum(t.numel() for t in pipe.unet.parameters()),
        "decoder_parameters": sum(t.numel() for t in vae.decoder.parameters()),
        "unet": str(steps_dir.name),
    })
    lo, hi = card["guidance_scale_range"]
    if not lo <= p.guidance <= hi:
        raise UserError(f"assemble.guidance={p.guidance} is outside the range the student was trained for "
                         f"[{lo}, {hi}] (halve.w_min/w_max + 1)")
    return pipe, card


def main(ctx) -> None:
    p: AssembleParams = ctx.params.assemble
    pipe, card = build_student(ctx.inputs[f"steps-{p.steps}"], ctx.inputs["teacher"], ctx.inputs["decoder"], p)
    out = ctx.outputs["model"]
    pipe.save_pretrained(out, safe_serialization=True)
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    ctx.summary.update({"steps": card["num_inference_steps"], "unet_parameters": card["unet_parameters"],
                        "decoder_parameters": card["decoder_parameters"]})
