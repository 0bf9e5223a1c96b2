"""Part 1 of ``sd-distill bench``: SD v1.5's architecture (random weights from the published configs), its calls
timed and composed into whole pipelines, with FLOPs per image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sd_distill.bench.timing import Measurement, Options, Session, _flops, _ready, _torch_dtype, _unet_config, _vae_factor

UNETS = {  # key: (row title, BK-SDM variant, guidance input)
    "teacher": ("teacher UNet", "none", False),
    "guided": ("guided UNet (+w input)", "none", True),
    "bk-base": ("BK-SDM base UNet (+w)", "base", True),
    "bk-small": ("BK-SDM small UNet (+w)", "small", True),
    "bk-tiny": ("BK-SDM tiny UNet (+w)", "tiny", True),
}
DECODERS = {"full": "full VAE decoder", "tiny": "tiny decoder (TAESD-shaped)"}


@dataclass(frozen=True)
class Composed:
    """A way to make images from the timed calls: ``steps`` UNet calls (at 2B with CFG), one decode and the text
    encoder (with CFG on the prompt and the empty prompt, one call at 2B)."""

    name: str
    unet: str
    steps: int
    cfg: bool


COMPOSED = (
    Composed("teacher@64 CFG", "teacher", 64, True),
    Composed("teacher@25 CFG", "teacher", 25, True),
    Composed("guided@8", "guided", 8, False),
    Composed("student BK small@4", "bk-small", 4, False),
    Composed("student BK small@2", "bk-small", 2, False),
    Composed("student BK small@1", "bk-small", 1, False),
)
REFERENCE = ("teacher@64 CFG", "full")
FINAL = ("student BK small@1", "tiny")
FLOP_TARGET = 100.0


def count_arch(arch, resolution: int, decoder_arch, guidance_dim: int) -> dict[str, int]:
    """FLOPs of one call at batch 1 of every part that ``measure_arch`` times, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_distill.models import costs
    from sd_distill.models.parts import build_tiny_autoencoder

    latent = resolution // _vae_factor(arch.vae)
    seq = arch.text_encoder["max_position_embeddings"]
    flops = {}
    with torch.device("meta"):
        for key, (_, variant, guided) in UNETS.items():
            unet = UNet2DConditionModel.from_config(_unet_config(arch, variant, guidance_dim if guided else None))
            flops[f"unet/{key}"] = 2 * costs.unet_macs(unet, latent, latent, seq)["macs_total"]
        vae = AutoencoderKL.from_config(arch.vae)
        flops["decoder/full"] = 2 * costs.decoder_macs(vae, latent, latent)["macs_total"]
        tiny = build_tiny_autoencoder(arch.vae, decoder_arch)
        flops["decoder/tiny"] = 2 * costs.decoder_macs(tiny, latent, latent)["macs_total"]
        text = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
        ids = torch.zeros(1, seq, dtype=torch.long)
        flops["text"] = _flops(lambda: text(ids))
    return flops


def measure_arch(session: Session, arch, o: Options, decoder_arch, guidance_dim: int) -> dict[str, Measurement]:
    """Time every UNet of ``UNETS`` (the teacher also at 2B), both decoders and the text encoder (B and 2B),
    built from ``arch``'s configs with random weights, one at a time on ``o.device``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_distill.models.parts import build_tiny_autoencoder

    like = {"device": o.device, "dtype": _torch_dtype(o.dtype)}
    latent = o.resolution // _vae_factor(arch.vae)
    seq, width = arch.text_encoder["max_position_embeddings"], arch.text_encoder["hidden_size"]
    fmt = torch.channels_last if o.channels_last else torch.contiguous_format
    b = o.batch
    out: dict[str, Measurement] = {}

    def latents(n: int) -> torch.Tensor:
        return torch.randn(n, arch.unet["in_channels"], latent, latent, **like).to(memory_format=fmt)

    with torch.no_grad():
        for key, (_, variant, guided) in UNETS.items():
            dim = guidance_dim if guided else None
            with torch.device(o.device):
                unet = _ready(UNet2DConditionModel.from_config(_unet_config(arch, variant, dim)), o)
            for n in (b, 2 * b) if key == "teacher" else (b,):
                x, states = latents(n), torch.randn(n, seq, width, **like)
                t = torch.full((n,), 999, device=o.device, dtype=torch.long)
                cond = torch.randn(n, dim, **like) if dim else None
                label = f"unet/{key}/b{n}"
                call = lambda: unet(x, t, states, timestep_cond=cond, return_dict=False)  # noqa: E731
                out[label] = session.measure(label, call, n)
            del unet
        with torch.device(o.device):
            decoders = {"full": AutoencoderKL.from_config(arch.vae),
                        "tiny": build_tiny_autoencoder(arch.vae, decoder_arch)}
        z = latents(b)
        for key, vae in decoders.items():
            vae = _ready(vae, o, compiled="decoder")
            out[f"decoder/{key}/b{b}"] = session.measure(f"decoder/{key}/b{b}", lambda: vae.decode(z), b)
        del decoders, vae
        with torch.device(o.device):
            text = _ready(CLIPTextModel(CLIPTextConfig(**arch.text_encoder)), o)
        for n in (b, 2 * b):
            ids = torch.randint(0, arch.text_encoder["vocab_size"], (n, seq), device=o.device)
            out[f"text/b{n}"] = session.measure(f"text/b{n}", lambda: text(ids), n)
    return out


def call_rows(calls: Mapping[str, Measurement], flops: Mapping[str, int], peak: float | None) -> list[dict]:
    """One row per timed call: median ms, FLOPs of the call, achieved TFLOP/s and the fraction of ``peak``."""
    titles = {**{f"unet/{k}": v[0] for k, v in UNETS.items()}, **{f"decoder/{k}": v for k, v in DECODERS.items()},
              "text": "text encoder"}
    rows = []
    for label, m in calls.items():
        kind = label.rsplit("/", 1)[0]
        f = flops[kind] * m.batch
        rows.append({"name": titles[kind], "batch": m.batch, "from": [label], "ms": m.median * 1e3, "flops": f,
                     "tflops_per_s": f / m.median / 1e12,
                     "peak_fraction": f / m.median / (peak * 1e12) if peak else None})
    return rows


def compose(calls: Mapping[str, Measurement], flops: Mapping[str, int], batch: int, peak: float | None) -> list[dict]:
    """Per-image cost of every ``COMPOSED`` pipeline with each decoder, from the timed calls at ``batch``:
    seconds = (steps x UNet call + decode + text encoder) / batch, CFG's calls at 2 x batch; FLOPs per image the same
    sum of the counted calls; speedup and FLOP ratio against ``REFERENCE``."""
    rows = []
    for c in COMPOSED:
        k = 2 if c.cfg else 1
        for dec in DECODERS:
            unet, decode, text = (calls[f"unet/{c.unet}/b{k * batch}"], calls[f"decoder/{dec}/b{batch}"],
                                  calls[f"text/b{k * batch}"])
            seconds = (c.steps * unet.median + decode.median + text.median) / batch
            f = c.steps * k * flops[f"unet/{c.unet}"] + flops[f"decoder/{dec}"] + k * flops["text"]
            rows.append({"pipeline": c.name, "decoder": dec, "steps": c.steps, "unet_calls_per_image": c.steps * k,
                         "from": [unet.label, decode.label, text.label], "ms_per_image": seconds * 1e3,
                         "images_per_s": 1 / seconds, "flops_per_image": f,
                         "peak_fraction": f / seconds / (peak * 1e12) if peak else None})
    ref = next(r for r in rows if (r["pipeline"], r["decoder"]) == REFERENCE)
    for r in rows:
        r["speedup"] = ref["ms_per_image"] / r["ms_per_image"]
        r["flop_ratio"] = ref["flops_per_image"] / r["flops_per_image"]
    return rows


def run_arch(session: Session, o: Options, arch, decoder_arch, guidance_dim: int, peak: float | None) -> dict:
    flops = count_arch(arch, o.resolution, decoder_arch, guidance_dim)
    calls = measure_arch(session, arch, o, decoder_arch, guidance_dim)
    pipelines = compose(calls, flops, o.batch, peak)
    final = next(r for r in pipelines if (r["pipeline"], r["decoder"]) == FINAL)
    target = {"name": f"{FINAL[0]} + {FINAL[1]} decoder: FLOPs/image at least {FLOP_TARGET:.0f}x fewer than "
                      f"{REFERENCE[0]} + {REFERENCE[1]} VAE",
              "value": final["flop_ratio"], "threshold": FLOP_TARGET, "pass": final["flop_ratio"] >= FLOP_TARGET,
              "measured_latency_ratio": final["speedup"], "from": final["from"] + next(
                  r["from"] for r in pipelines if (r["pipeline"], r["decoder"]) == REFERENCE)}
    return {"title": arch.title, "resolution": o.resolution, "batch": o.batch, "flops_per_call_b1": flops,
            "calls": call_rows(calls, flops, peak), "pipelines": pipelines, "targets": [target]}

