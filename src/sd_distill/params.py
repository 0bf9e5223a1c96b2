"""Typed parameters: one frozen section per stage plus ``base``, resolved in layers.

Resolution order (later wins): schema defaults (the ``tiny`` profile) <- the profile preset in
``PROFILES`` <- the sections of ``params.yaml`` <- ``--set section.key=value`` overrides.
Every stage receives ``base`` and its own section only. Imports no torch.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from sd_distill.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROFILE_NAMES = ("tiny", "smoke", "sd15")


class ParamsError(UserError, ValueError):
    """A params file or override that cannot be used; the message names the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- shared pieces
class TrainParams(Section):
    """One training loop's knobs (see ``training.loop.train``)."""

    steps: int = Field(1200, ge=1, description="optimizer steps")
    batch_size: int = Field(128, ge=1, description="samples per micro-batch")
    min_micro_batch: int = Field(1, ge=1, description="out of memory cuts micro-batches in halves (gradients "
                                 "accumulated: the global batch stays) down to this many samples, then fails")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (global batch = batch_size x "
                            "grad_accum; N processes take grad_accum / N each, so it must be a multiple of N)")
    learning_rate: float = Field(1e-3, gt=0, le=1)
    lr_schedule: Literal["constant", "constant_with_warmup", "cosine", "linear"] = Field(
        "cosine", description="diffusers.optimization.get_scheduler: constant ignores warmup_steps; linear decays "
                              "to 0 at the last step (after the warmup)")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw: torch.optim.AdamW; adamw8bit: bitsandbytes' AdamW8bit (8-bit optimizer "
                             "states, Dettmers et al. 2022: 2 instead of 8 bytes per parameter; needs `pip install "
                             "bitsandbytes` and CUDA)")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    adam_amsgrad: bool = Field(False, description="AMSGrad (Reddi et al. 2018): one more state, 4 bytes per "
                                                  "parameter; adamw only")
    ema_decay: float = Field(0.995, ge=0, lt=1, description="0 turns EMA off")
    gradient_checkpointing: bool = Field(False, description="recompute each block's activations in backward "
                                         "(diffusers' enable_gradient_checkpointing): much less activation memory "
                                         "for one more forward; does not change the result")
    allow_tf32: bool = Field(False, description="CUDA: TF32 tensor cores for float32 matmuls and convolutions "
                                                "(the ops autocast leaves in float32)")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1, description="steps between logged losses")
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes reading training rows ahead of "
                                "the step (0: read in the training process); does not change the result")
    prefetch_batches: int = Field(2, ge=1, description="micro-batches each loader worker reads ahead")

    @model_validator(mode="after")
    def _check_optimizer(self) -> "TrainParams":
        if self.optimizer == "adamw8bit" and self.adam_amsgrad:
            raise ValueError("adam_amsgrad needs optimizer adamw (bitsandbytes' AdamW8bit has no AMSGrad)")
        return self

    def fingerprint(self) -> str:
        """What a checkpoint must have been made with to be resumed: every knob that changes the result. Knobs added
        after checkpoints existed join it only when set away from their default (the loop's behaviour before they
        existed), so those checkpoints still resume."""
        neutral = {"loader_workers", "prefetch_batches", "gradient_checkpointing"}
        added = ("optimizer", "adam_beta1", "adam_beta2", "adam_epsilon", "adam_amsgrad", "allow_tf32")
        unset = {k for k in added if getattr(self, k) == TrainParams.model_fields[k].default}
        return json.dumps(self.model_dump(mode="json", exclude=neutral | unset), sort_keys=True)


class VaeArch(Section):
    """``diffusers.AutoencoderKL`` shape; the spatial factor is 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(16, ge=1)


class TextArch(Section):
    """``transformers.CLIPTextModel`` shape; the vocabulary comes from the captions."""

    hidden_size: int = Field(32, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=8)
    max_length: int = Field(16, ge=4, description="tokens per prompt incl. BOS/EOS")


class UnetArch(Section):
    """``diffusers.UNet2DConditionModel`` shaped like SD's: cross-attention in all but the innermost stage."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = Field(2, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "UnetArch":
        if len(self.block_out_channels) < 2:
            raise ValueError("block_out_channels needs at least 2 stages")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"every channel count must be divisible by norm_num_groups={self.norm_num_groups}, found {c}")
        return self


# --------------------------------------------------------------------------- sections
class BaseParams(Section):
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_model_artifacts: bool = Field(True, description="copy output model folders into the MLflow run")


class ClassifierParams(Section):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(2e-3, gt=0, le=1)
    width: int = Field(32, ge=4)


DEFAULT_TEMPLATES = (
    "a handwritten digit {word}",
    "a photo of the handwritten number {word}",
    "the digit {word}, written by hand",
    "a scan of a handwritten {word}",
)


class PrepareParams(Section):
    source: Literal["digits", "folder", "parquet", "webdataset"] = "digits"
    path: str | None = Field(None, description="input folder / parquet file or folder / tar shard folder: a local "
                             "path or an fsspec URL (s3://bucket/prefix, gs://..., any fsspec protocol)")
    storage_options: dict[str, Any] = Field(
        {}, description="fsspec options for a remote path (S3: endpoint_url, client_kwargs, anon, ...); credentials "
                        "come from the environment (AWS_ACCESS_KEY_ID, ...), never from params")
    workers: int = Field(1, ge=1, description="processes that decode, check, resize and PNG-encode samples (1: in "
                         "the stage's process); the output is the same for any number")
    resolution: int = Field(16, ge=8, le=2048, description="output side in pixels (square)")
    min_size: int = Field(8, ge=1, description="reject images whose shorter side is below this")
    val_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    max_reject_rate: float = Field(0.05, ge=0, le=1)
    shard_size: int = Field(1000, ge=1, description="samples per tar shard")
    max_images: int | None = Field(None, ge=1)
    captions_file: str = Field("metadata.jsonl", description="folder source: JSON lines with file_name and caption")
    image_column: str = "image"
    caption_column: str = "text"
    score_column: str | None = None
    min_score: float | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    classifier: ClassifierParams = ClassifierParams()

    @staticmethod
    def _secret_option(options: dict, prefix: str = "") -> str | None:
        """The first key of a (nested) fsspec options mapping that carries a credential, as a dotted path (gcsfs's
        ``token: anon`` and the like name no secret)."""
        secrets = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                   "aws_session_token", "session_token", "access_key", "secret_key", "sas_token", "account_key",
                   "connection_string", "client_secret")
        for name, value in options.items():
            if str(name).lower() in secrets and value not in (None, "anon", "google_default", "cloud"):
                return prefix + str(name)
            if isinstance(value, dict) and (found := PrepareParams._secret_option(value, f"{prefix}{name}.")):
                return found
        return None

    @model_validator(mode="after")
    def _check(self) -> "PrepareParams":
        if self.source != "digits" and not self.path:
            raise ValueError(f"source={self.source!r} needs prepare.path (a local folder or file, or a URL)")
        if secret := self._secret_option(self.storage_options):
            raise ValueError(f"storage_options.{secret}: credentials do not belong in params (they are printed, saved "
                             "beside the outputs and logged to MLflow); set them in the environment "
                             "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...)")
        if (self.score_column is None) != (self.min_score is None):
            raise ValueError("score_column and min_score go together: set both or neither")
        for t in self.templates:
            if "{word}" not in t:
                raise ValueError(f"every template needs a {{word}} placeholder, found {t!r}")
        return self


class TeacherParams(Section):
    source: str | None = Field(None, description="sd15: hub id or local diffusers folder; tiny/smoke: train")
    vae: VaeArch = VaeArch()
    text_encoder: TextArch = TextArch()
    unet: UnetArch = UnetArch()
    vae_train: TrainParams = TrainParams(steps=400, learning_rate=1e-3, ema_decay=0.0, warmup_steps=20)
    unet_train: TrainParams = TrainParams()
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = Field(
        "epsilon", description="what the UNet predicts; SD v1 predicts epsilon")
    kl_weight: float = Field(1e-6, ge=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="share of captions replaced by '' (for CFG)")
    snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR loss weighting (Hang et al. 2023); null: plain MSE")
    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.00085, gt=0, lt=1)
    beta_end: float = Field(0.012, gt=0, lt=1)


class EncodeParams(Section):
    """The teacher VAE's posteriors (fp16) and caption token ids of every prepared sample, written once."""

    splits: tuple[Literal["train", "val", "test"], ...] = Field(("train",), min_length=1,
                                                              description="prepared splits to encode")
    batch_size: int = Field(256, ge=1, description="images per VAE call")
    embeddings: Literal["stored", "computed"] = Field(
        "stored", description="stored: the text encoder's output per distinct caption of a shard is written beside "
                              "the token ids (few distinct prompts: tiny); computed: token ids only, the training "
                              "step runs the frozen text encoder (almost every caption unique: sd15, 118 KB each)")


class VpredParams(Section):
    targets: Literal["teacher", "data"] = Field(
        "teacher", description="teacher: the teacher's own predictions converted to v (keeps its behaviour, "
                               "needs its schedule); data: v of the training data (needed after rescaling betas)")
    zero_terminal_snr: bool = Field(False, description="rescale betas to zero terminal SNR (Lin et al. 2024, alg. 1)")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR weighting; null: plain MSE on v")
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    train: TrainParams = TrainParams(steps=300, batch_size=128, learning_rate=3e-4, warmup_steps=20,
                                     ema_decay=0.99, checkpoint_every=100)

    @model_validator(mode="after")
    def _check(self) -> "VpredParams":
        if self.targets == "teacher" and self.zero_terminal_snr:
            raise ValueError("targets=teacher needs the teacher's own schedule; with zero_terminal_snr=true "
                             "set targets=data")
        return self


class GuidanceRange(Section):
    """The guidance weights a w-conditioned stage trains for, drawn uniformly from [w_min, w_max]."""

    w_min: float = Field(0.0, ge=0, description="smallest guidance weight w = guidance_scale - 1")
    w_max: float = Field(8.0, ge=0, description="largest w; the default range holds w = 6.5 (scale 7.5)")

    @model_validator(mode="after")
    def _check_w(self) -> "GuidanceRange":
        if self.w_max < self.w_min:
            raise ValueError(f"w_max ({self.w_max}) must be >= w_min ({self.w_min})")
        return self


class GuidanceParams(GuidanceRange):
    embedding_dim: int = Field(64, ge=2, description="time_cond_proj_dim: Fourier features of w")
    train: TrainParams = TrainParams(steps=400, batch_size=64, learning_rate=1e-3, warmup_steps=20,
                                     ema_decay=0.99, checkpoint_every=100)


class PruneParams(GuidanceRange):
    """BK-SDM block removal + distillation (Kim et al. 2023); the loss weights are BK-SDM's defaults."""

    variant: Literal["none", "base", "small", "tiny"] = Field(
        "small", description="none: the guided model unchanged; base: one resnet(+attention) fewer per stage; "
                             "small: base without the mid block; tiny: small without the innermost stage")
    task_weight: float = Field(0.0, ge=0, description="denoising loss on the data (v), on the w = 0 share; BK-SDM "
                                                      "uses 1 (the sd15 preset does); on the tiny profile it cost "
                                                      "FID (pruned@64 1.12-1.15x the teacher with it, 1.06x without)")
    out_kd_weight: float = Field(1.0, ge=0, description="output KD: MSE to the parent's output at the same w")
    feat_kd_weight: float = Field(1.0, ge=0, description="feature KD: MSE at the end of every kept stage")
    task_share: float = Field(0.0, ge=0, le=1, description="share of each batch drawn at w = 0, where the "
                                                           "data's v is the right task target (sd15: 0.25)")
    train: TrainParams = TrainParams(steps=600, batch_size=64, learning_rate=1e-3, warmup_steps=20,
                                     ema_decay=0.99, checkpoint_every=200)

    @model_validator(mode="after")
    def _check_task(self) -> "PruneParams":
        if self.task_weight > 0 and round(self.task_share * self.train.batch_size) == 0:
            raise ValueError(f"task_weight is {self.task_weight} but task_share {self.task_share} of batch_size "
                             f"{self.train.batch_size} leaves no w = 0 sample for the task loss; raise task_share "
                             f"(BK-SDM setting: task_share 0.25) or set task_weight 0")
        return self


HALVING_STEPS = (32, 16, 8, 4, 2, 1)


class HalveParams(GuidanceRange):
    steps_from: int = Field(64, description="sampling steps of the first teacher (the pruned or guided model)")
    mode: Literal["progressive", "direct"] = Field(
        "progressive", description="progressive: N -> N/2 each round; direct: steps_from -> each N in one stage")
    train: TrainParams = TrainParams(steps=200, batch_size=64, learning_rate=1e-4, warmup_steps=10,
                                     ema_decay=0.99, checkpoint_every=100)
    round_steps: dict[int, int] = Field(
        default_factory=lambda: {32: 150, 16: 150, 8: 150, 4: 200, 2: 200, 1: 200},
        description="optimizer steps per round, by the student's step count (overrides train.steps)")

    @model_validator(mode="after")
    def _check(self) -> "HalveParams":
        if self.steps_from != 2 * HALVING_STEPS[0]:
            raise ValueError(f"steps_from must be {2 * HALVING_STEPS[0]}: the rounds in dvc.yaml are "
                             f"{', '.join(map(str, HALVING_STEPS))}")
        unknown = sorted(set(self.round_steps) - set(HALVING_STEPS))
        if unknown:
            raise ValueError(f"round_steps has keys {unknown}; allowed: {list(HALVING_STEPS)}")
        return self

    def train_for(self, steps: int) -> TrainParams:
        return self.train.model_copy(update={"steps": self.round_steps.get(steps, self.train.steps)})


class DecoderArch(Section):
    """``diffusers.AutoencoderTiny`` (TAESD) shape: one entry per stage, as many stages as the teacher VAE's."""

    channels: int = Field(64, ge=4, description="channels of every stage (TAESD: 64)")
    encoder_blocks: tuple[int, ...] | None = Field(None, description="blocks per encoder stage; null: TAESD's "
                                                   "(1, 3, 3, 3) cut to the VAE's stage count")
    decoder_blocks: tuple[int, ...] | None = Field(None, description="blocks per decoder stage; null: (3, 3, 3, 1) cut")


class DecoderParams(Section):
    """TAESD-style tiny autoencoder distilled from the teacher's ``AutoencoderKL`` (output distillation)."""

    arch: DecoderArch = DecoderArch(channels=32)
    adversarial_weight: float = Field(0.0, ge=0, description="SDXS-style patch-discriminator loss weight; 0: off")
    encoder_weight: float = Field(1.0, ge=0, description="weight of the encoder's latent-matching loss")
    latent_noise: float = Field(0.1, ge=0, description="std of noise added to teacher latents fed to the decoder, "
                                                       "so it also decodes the imperfect latents a sampler makes")
    eval_images: int = Field(256, ge=1, description="held-out images for PSNR and decode timing")
    train: TrainParams = TrainParams(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=20,
                                     ema_decay=0.0, checkpoint_every=200)

    @model_validator(mode="after")
    def _check_checkpointing(self) -> "DecoderParams":
        if self.train.gradient_checkpointing:
            raise ValueError("train.gradient_checkpointing must be false for the decoder: under gradient "
                             "checkpointing diffusers' EncoderTiny skips its [-1, 1] -> [0, 1] input rescale "
                             "(diffusers/models/autoencoders/vae.py, EncoderTiny.forward), so the tiny encoder would "
                             "train on other inputs than it sees at inference; TAESD's 1.2 M-parameter layers need "
                             "no checkpointing (`sd-distill plan` shows the decoder's memory)")
        return self


class AssembleParams(Section):
    steps: int = Field(1, description="which steps-N student becomes models/student (the sampling steps)")
    guidance: float = Field(7.5, ge=1, description="default guidance_scale written to the model card")
    decoder: Literal["tiny", "full"] = Field("tiny", description="tiny: the distilled AutoencoderTiny; full: the VAE")

    @model_validator(mode="after")
    def _check(self) -> "AssembleParams":
        if self.steps not in HALVING_STEPS:
            raise ValueError(f"steps must be one of the halving rounds {list(HALVING_STEPS)}, found {self.steps}")
        return self


class EvaluateParams(Section):
    suite: Literal["digits", "text-image"] = Field(
        "digits", description="digits: classifier accuracy and FID in its feature space on digit prompts (tiny, "
                              "smoke); text-image: the prompt_sets with FID, IS, CLIP score, HPSv2 (sd15)")
    steps: int = Field(64, ge=1, description="teacher sampling steps (DDIM)")
    guidance: float = Field(7.5, ge=1, description="classifier-free guidance scale, diffusers convention")
    samples_per_prompt: int = Field(50, ge=1)
    batch_size: int = Field(125, ge=1)
    prompt_template: str = "a handwritten digit {word}"
    grid_columns: int = Field(10, ge=1)
    baseline_steps: tuple[int, ...] = Field((8, 4, 2, 1), description="teacher with each solver at these step counts")
    baseline_solvers: tuple[Literal["dpmpp", "ddim"], ...] = ("dpmpp", "ddim")
    grid_steps: tuple[int, ...] = Field((8, 4, 2, 1), description="rows of reports/grid.png under the teacher: the "
                                                                 "steps-N students at these N, then models/student")
    latency_warmup: int = Field(1, ge=0, description="untimed runs before the latency repeats")
    latency_repeats: int = Field(5, ge=1, description="timed runs of one image (batch 1); the median is reported")
    # sd15: the seeds' protocol (512 px, guidance 7.5); tiny/smoke score digits and ignore these
    prompt_sets: tuple[Literal["coco", "parti", "hpsv2"], ...] = Field(
        (), description="sd15 prompt sets: coco (FID, IS, CLIP), parti and hpsv2 (CLIP, HPSv2)")
    images_per_set: int = Field(1000, ge=1, description="sd15: images per prompt set (one per prompt)")
    coco_captions: str | None = Field(None, description="MS-COCO annotations/captions_val2017.json")
    parti_prompts: str | None = Field(None, description="PartiPrompts.tsv")
    hpsv2_prompts: str | None = Field(None, description="HPSv2 benchmark prompts: folder of <style>.json lists")
    inception: str | None = Field(None, description="TorchScript FID Inception, inception-2015-12-05.pt (local)")
    clip_model: str = Field("openai/clip-vit-large-patch14", description="CLIP for CLIP score: hub id or folder")
    hpsv2_weights: str | None = Field(None, description="HPS_v2_compressed.pt; null: no HPSv2 (needs `hpsv2`)")

    @model_validator(mode="after")
    def _check_suite(self) -> "EvaluateParams":
        if self.suite == "text-image" and not self.prompt_sets:
            raise ValueError("suite text-image needs prompt_sets (one or more of coco, parti, hpsv2)")
        if self.suite == "digits" and self.prompt_sets:
            raise ValueError(f"prompt_sets {list(self.prompt_sets)} are scored by suite text-image; the digits suite "
                             "has its own prompts (set suite: text-image, or prompt_sets: [])")
        return self


class ReferenceParams(Section):
    """The real images' feature statistics that evaluate's FID compares against, computed once (stage ``reference``).

    The text-image keys describe the same COCO protocol as ``evaluate``'s; evaluate checks that they agree (the
    Inception file's sha256, the images by name, their number, the resolution) and names the key that does not."""

    sets: tuple[Literal["digits", "coco"], ...] = Field(
        ("digits",), description="digits: the prepared test split in the digit classifier's feature space, and the "
                                 "val split's FID against it (tiny, smoke); coco: MS-COCO val2017 images in "
                                 "Inception's (sd15, for evaluate.prompt_sets with coco)")
    batch_size: int = Field(64, ge=1, description="images per feature-extractor call (the statistics do not depend "
                                                  "on it beyond float rounding)")
    images: int = Field(1000, ge=1, description="coco: the first this many images by id (= evaluate.images_per_set; "
                                                "30000 for BK-SDM's COCO-30k)")
    coco_captions: str | None = Field(None, description="coco: MS-COCO annotations/captions_val2017.json (which "
                                                        "images: the same rule as evaluate's prompts)")
    coco_images: str | None = Field(None, description="coco: MS-COCO val2017 image folder")
    inception: str | None = Field(None, description="coco: TorchScript FID Inception, inception-2015-12-05.pt (local; "
                                                    "the same file as evaluate.inception)")


class GateBound(Section):
    """One condition of the registry's quality gate on a row of ``reports/metrics.json``."""

    metric: str = Field(description="a key of the student's row, e.g. fid_ratio, accuracy_ratio, clip_score_ratio")
    op: Literal["<=", ">="]
    value: float


class RegisterParams(Section):
    """MLflow Model Registry: a new version of ``model_name`` per new input; ``champion`` behind the gate."""

    model_name: str = Field("sd-distill-student", min_length=1, description="registered model name")
    gate: tuple[GateBound, ...] = Field(
        (GateBound(metric="fid_ratio", op="<=", value=1.3), GateBound(metric="accuracy_ratio", op=">=", value=0.96)),
        description="every bound must hold on the student's row for `champion` to move to the new version")
    primary_metric: str = Field("fid", description="the new version must beat the current champion on this")
    primary_mode: Literal["min", "max"] = Field("min", description="min: lower is better (FID); max: higher")
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"


SECTIONS: dict[str, type[Section]] = {
    "base": BaseParams,
    "prepare": PrepareParams,
    "teacher": TeacherParams,
    "encode": EncodeParams,
    "vpred": VpredParams,
    "guidance": GuidanceParams,
    "prune": PruneParams,
    "halve": HalveParams,
    "decoder": DecoderParams,
    "assemble": AssembleParams,
    "reference": ReferenceParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
}

# Profile presets: only what differs from the schema defaults (which are the tiny profile).
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "smoke": {
        "prepare": {"max_images": 400, "shard_size": 150, "max_reject_rate": 0.1, "classifier": {"epochs": 10}},
        "teacher": {
            "vae": {"block_out_channels": [8, 16], "norm_num_groups": 8},
            "text_encoder": {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32},
            "unet": {"block_out_channels": [8, 16, 16], "layers_per_block": 2, "attention_head_dim": 4},
            "vae_train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0},
            "unet_train": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 1, "warmup_steps": 0},
        },
        "encode": {"batch_size": 64},
        "vpred": {"train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0}},
        "guidance": {"embedding_dim": 16,
                     "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0}},
        "prune": {"train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0}},
        "decoder": {"arch": {"channels": 8}, "eval_images": 16,
                    "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0}},
        "halve": {"train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0},
                  "round_steps": {n: 2 for n in HALVING_STEPS}},
        "evaluate": {"steps": 4, "samples_per_prompt": 2, "batch_size": 20, "baseline_steps": [2, 1],
                     "latency_repeats": 2},
    },
    "sd15": {
        "base": {"device": "cuda", "mixed_precision": "bf16", "log_model_artifacts": False},
        "prepare": {"source": "folder", "path": "data/raw", "resolution": 512, "min_size": 512,
                    "max_reject_rate": 0.2, "shard_size": 2000},
        "teacher": {"source": "runwayml/stable-diffusion-v1-5"},
        # almost every caption is unique: token ids on disk, the frozen text encoder runs in the training step
        "encode": {"embeddings": "computed", "batch_size": 64},
        # Every training number below cites its source, a paper or released code (the project's research notes,
        # scale.md sec. 2 and 5, seed_features.md and one_step.md, checked them), or says that none is published and
        # why the number was chosen. Memory levers in every UNet stage: bf16 autocast over fp32 master weights
        # (base), frozen teachers in bf16 (parts.frozen, as BK-SDM casts its teacher), SDPA (diffusers' default
        # AttnProcessor2_0), gradient checkpointing (BK-SDM scripts/kd_train.sh --gradient_checkpointing) and TF32
        # (DMD2 experiments/sdv1.5, TF32 on); max_grad_norm 1 (BK-SDM; Salimans & Ho's grad_clip 1). Global batch
        # 256 = 64 x 4 in every UNet stage: BK-SDM's (kd_train.sh), which fits one 80 GB GPU; with N GPUs keep
        # batch_size x grad_accum = 256 with grad_accum a multiple of N. `sd-distill plan --profile sd15` prints
        # each stage's samples, FLOPs, GPU-hours and memory.
        "vpred": {
            # v-finetune: lr 1e-5 constant (diffusers examples/text_to_image/README.md fine-tune; YongfeiYan
            # scripts/progressdstl/finetune_v_prediction.sh), weight decay 1e-2 (diffusers train_text_to_image
            # --adam_weight_decay default, kept by BK-SDM src/kd_train_text_to_image.py), EMA 0.995 and 10 %
            # caption dropout (finetune_v_prediction.sh, --puncond 0.1). Steps: no published number for SD v1.5
            # eps -> v; chose 5,000 x 256 = 1.28 M samples, 5x YongfeiYan's 2,000 x 120 (ImageNet LDM), the low end
            # of scale.md's 5-10 k because targets: teacher is a regression onto the teacher's own prediction.
            "caption_dropout": 0.1,
            "train": {"steps": 5000, "batch_size": 64, "grad_accum": 4, "learning_rate": 1e-5,
                      "lr_schedule": "constant", "warmup_steps": 0, "weight_decay": 1e-2, "max_grad_norm": 1.0,
                      "ema_decay": 0.995, "gradient_checkpointing": True, "allow_tf32": True,
                      "checkpoint_every": 1000, "log_every": 50},
        },
        "guidance": {
            # Meng et al. 2023 (arXiv:2210.03142), stage one: w ~ U[2, 14] for latent text-to-image (w = scale - 1,
            # scale 3-15; as in ruiqixu37/distill_diffusion configs/stage_one.yaml); w embedding width 256 (diffusers
            # LCM time_cond_proj_dim default; ruiqixu37). No official SD code gives lr or steps: lr 1e-5 AdamW
            # (0.9, 0.999, wd 0.01), constant after 500 warmup steps, as DMD2 trains its SD v1.5 UNet
            # (experiments/sdv1.5/*.sh, main/train_sd.py). Steps: no published number; chose 10,000 x 256 = 2.56 M
            # samples, twice vpred's, since the student learns a whole range of w. EMA: none published; 0.999
            # (horizon ~1 k steps, a tenth of the run; YongfeiYan's later stages use 0.999).
            "w_min": 2.0, "w_max": 14.0, "embedding_dim": 256,
            "train": {"steps": 10000, "batch_size": 64, "grad_accum": 4, "learning_rate": 1e-5,
                      "lr_schedule": "constant_with_warmup", "warmup_steps": 500, "weight_decay": 1e-2,
                      "max_grad_norm": 1.0, "ema_decay": 0.999, "gradient_checkpointing": True, "allow_tf32": True,
                      "checkpoint_every": 1000, "log_every": 50},
        },
        "prune": {
            # BK-SDM exactly (Nota-NetsPresso/BK-SDM scripts/kd_train.sh, src/kd_train_text_to_image.py): BK-small,
            # AdamW lr 5e-5 constant, no warmup, batch 64 x 4 accumulation = 256, max_grad_norm 1, weight decay 1e-2
            # and betas (0.9, 0.999) (the script's defaults), --use_ema with diffusers EMAModel's default decay
            # 0.9999, lambda_sd = lambda_kd_output = lambda_kd_feat = 1; 50,000 iterations (the released models; the
            # script's 400 k is not what was released, maintainer in BK-SDM#45). task_share 0.25 is ours: the parent
            # is w-conditioned and the data's v is the task target only at w = 0. w range: the guided model's.
            "variant": "small", "task_weight": 1.0, "out_kd_weight": 1.0, "feat_kd_weight": 1.0, "task_share": 0.25,
            "w_min": 2.0, "w_max": 14.0,
            "train": {"steps": 50000, "batch_size": 64, "grad_accum": 4, "learning_rate": 5e-5,
                      "lr_schedule": "constant", "warmup_steps": 0, "weight_decay": 1e-2, "max_grad_norm": 1.0,
                      "ema_decay": 0.9999, "gradient_checkpointing": True, "allow_tf32": True,
                      "checkpoint_every": 1000, "log_every": 50},
        },
        "halve": {
            # Salimans & Ho 2022, released config (google-research diffusion_distillation/config/
            # imagenet64_distill.py): Adam lr 1e-4 annealed linearly to 0 within each round, no warmup, weight decay
            # 0, grad clip 1, ema_decay 0. Its batch 2048 x 50 k steps per round would cost ~8x this chain; chose
            # BK-SDM's 256 and the per-round steps of YongfeiYan scripts/progressdstl/stage_two.sh (2 k, 2 k, 5 k,
            # 20 k, 20 k, 20 k for 32 ... 1 steps: longer rounds at few steps), whose SD-LDM port runs at batch 120.
            # w range: the same as stage one (Meng et al. 2023, stage two).
            "w_min": 2.0, "w_max": 14.0,
            "train": {"batch_size": 64, "grad_accum": 4, "learning_rate": 1e-4, "lr_schedule": "linear",
                      "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "ema_decay": 0.0,
                      "gradient_checkpointing": True, "allow_tf32": True, "checkpoint_every": 1000, "log_every": 50},
            "round_steps": {32: 2000, 16: 2000, 8: 5000, 4: 20000, 2: 20000, 1: 20000},
        },
        "decoder": {
            # TAESD (madebyollin/taesd#11, the maintainer): Adam(lr 3e-4, betas (0.9, 0.9), amsgrad=True), batch 16,
            # 64 channels (TAESD's width). No schedule, step count, EMA or adversarial weight is published: constant
            # (the quoted optimizer has no scheduler); 50,000 x 16 = 0.8 M images, ~3.6 epochs of BK-SDM's 0.22 M
            # pairs; EMA off; adversarial_weight stays 0 (TAESD's decoder is a conditional GAN, #2, but with no
            # weight given, until measured). No gradient checkpointing: see DecoderParams.
            "arch": {"channels": 64}, "eval_images": 64,
            "train": {"steps": 50000, "batch_size": 16, "learning_rate": 3e-4, "lr_schedule": "constant",
                      "warmup_steps": 0, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.9,
                      "adam_amsgrad": True, "ema_decay": 0.0, "allow_tf32": True, "checkpoint_every": 2000,
                      "log_every": 50},
        },
        "evaluate": {"suite": "text-image", "batch_size": 8, "prompt_sets": ["coco", "parti", "hpsv2"],
                     "images_per_set": 1000,
                     "baseline_steps": [20, 16, 8, 4, 2, 1], "latency_repeats": 10,
                     "coco_captions": "data/eval/coco/annotations/captions_val2017.json",
                     "parti_prompts": "data/eval/PartiPrompts.tsv",
                     "hpsv2_prompts": "data/eval/hpsv2", "inception": "data/eval/inception-2015-12-05.pt"},
        # the FID reference: the same COCO images as evaluate's coco prompts, through the same Inception file
        "reference": {"sets": ["coco"], "images": 1000,
                      "coco_captions": "data/eval/coco/annotations/captions_val2017.json",
                      "coco_images": "data/eval/coco/val2017", "inception": "data/eval/inception-2015-12-05.pt"},
        "register": {"gate": [{"metric": "fid_ratio", "op": "<=", "value": 1.3},
                              {"metric": "clip_score_ratio", "op": ">=", "value": 0.95}]},
    },
}


def _merge(into: dict, patch: dict) -> dict:
    out = copy.deepcopy(into)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so a
    second ``teacher:`` section would drop the first without a word)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = key in first_line
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"found duplicate key {key!r} (first given on line {first_line[key]})", key_node.start_mark)
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_error(where: str, exc: yaml.YAMLError) -> str:
    """One line: ``where:LINE:COLUMN: not valid YAML: problem (context)``; PyYAML's own message spans lines."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc).splitlines()[0]
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and cmark is not None and cmark is not mark:
        problem += f" ({context} at line {cmark.line + 1}, column {cmark.column + 1})"
    elif context:
        problem += f" ({context})"
    return f"{at}: not valid YAML: {problem}"


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely (no Python tags, no duplicate keys); errors are one ``ParamsError`` line naming
    ``where``, the line and the column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # nosec B506: _StrictLoader is a yaml.SafeLoader
    except yaml.MarkedYAMLError as exc:
        raise ParamsError(_yaml_error(where, exc)) from None
    except yaml.reader.ReaderError as exc:  # a control character: position is an offset into the text
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ParamsError(f"{where}:{line}:{column}: not valid YAML: {exc.reason} (character #x{char:02x})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(_yaml_error(where, exc)) from None


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["teacher.unet_train.steps=10"]`` -> ``{"teacher": {"unet_train": {"steps": 10}}}`` (values are YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ParamsError(f"--set {item!r}: expected section.key=value, for example teacher.unet_train.steps=100")
        if parts[0] not in SECTIONS:
            raise ParamsError(f"--set {item!r}: unknown section {parts[0]!r}; allowed: {', '.join(SECTIONS)}")
        node = tree
        for depth, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is already set to a value, "
                                  "so it has no keys to set")
        node[parts[-1]] = load_yaml(raw, f"--set {item!r}") if raw.strip() else None
    return tree


def _given(tree: Any, loc: tuple) -> bool:
    """Whether the nested ``tree`` (a params layer) holds a value at ``loc``."""
    for part in loc:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and isinstance(part, int) and 0 <= part < len(tree):
            tree = tree[part]
        else:
            return False
    return True


def _format_error(origin, section: str, err: ValidationError, model: type[Section]) -> str:
    """One line per error: ``<where the value came from>: section.key: what is wrong (found value)``."""
    lines = []
    for e in err.errors():
        where = origin((section, *e["loc"]))
        loc = ".".join(str(x) for x in (section, *e["loc"]))
        if e["type"] == "extra_forbidden":
            parent = model
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part))
                ann = getattr(field, "annotation", None)
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
            allowed = ", ".join(parent.model_fields)
            lines.append(f"{where}: {loc}: unknown key; allowed keys here: {allowed}")
        else:
            found = e.get("input")
            if isinstance(found, dict):  # a section-level check sees the whole section: its message names the keys
                found_s = "" if e["type"] == "value_error" else " (found a mapping)"
            else:
                found_s = f" (found {found!r})"
            lines.append(f"{where}: {loc}: {e['msg']}{found_s}")
    return "\n".join(lines)


def read_params_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, expected a params YAML file")
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ParamsError(f"{path}:{line}:{column}: not UTF-8 text (byte {data[exc.start]:#04x}); save the params "
                          "file as UTF-8") from None
    raw = load_yaml(text, str(path))
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level (section: {{key: value}}), "
                          f"found {type(raw).__name__} {_short(raw)}")
    allowed = {"profile", *SECTIONS}
    unknown = sorted((k for k in raw if k not in allowed), key=str)
    if unknown:
        raise ParamsError(f"{path}: unknown top-level key(s) {', '.join(map(str, unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    for name in SECTIONS:
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ParamsError(f"{path}: section {name!r} must be a mapping of keys to values, found "
                              f"{type(raw[name]).__name__} {_short(raw[name])}")
    return raw


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def overrides_to_set(overrides: Any, where: str = "--overrides") -> list[str]:
    """``{"teacher.unet_train.steps": 10}`` (an orchestrator's run parameter) -> ``--set`` items.

    Values are JSON, which is YAML, so they parse back exactly as ``--set`` values do.
    """
    if not isinstance(overrides, dict):
        raise ParamsError(f"{where}: expected a mapping of section.key to value, found {type(overrides).__name__}")
    items = []
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ParamsError(f"{where}: key {key!r}: expected a string section.key")
        items.append(f"{key}={json.dumps(value)}")
    return items


def resolve(path: Path | str = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
            profile: str | None = None) -> "Params":
    """Read, layer and validate all sections; raises ``ParamsError`` naming every bad key.

    ``profile`` (an orchestrator's run parameter) replaces the file's ``profile:``; with it a missing
    params file means "no project overrides": the profile's preset and ``overrides`` alone.
    """
    path = Path(path)
    raw = read_params_file(path) if profile is None or path.exists() else {}
    where = str(path)
    if profile is not None:
        raw, where = {**raw, "profile": profile}, "profile"
    profile = raw.get("profile", "tiny")
    if not isinstance(profile, str) or profile not in PROFILES:
        raise ParamsError(f"{where}: profile: expected one of {', '.join(PROFILE_NAMES)}, found {_short(profile)}")
    patch = parse_set(overrides)

    def origin(loc: tuple) -> str:
        """Where the value at ``loc`` came from, for the error line."""
        if _given(patch, loc):
            return "overrides"  # --set or an orchestrator's --overrides
        if _given(raw, loc):
            return str(path)
        return f"profile {profile}" if _given(PROFILES[profile], loc) else (str(path) if path.exists() else "defaults")

    sections, errors = {}, []
    for name, model in SECTIONS.items():
        # start from the full defaults so that setting one nested key keeps its siblings' defaults
        data = _merge(model().model_dump(), PROFILES[profile].get(name, {}))
        data = _merge(data, raw.get(name) or {})
        data = _merge(data, patch.get(name, {}))
        try:
            sections[name] = model.model_validate(data)
        except ValidationError as exc:
            errors.append(_format_error(origin, name, exc, model))
    if errors:
        raise ParamsError("\n".join(errors))
    return Params(profile=profile, **sections)


# ``register`` (stage name = section name) shadows ABCMeta.register on the class only; instances read the field.
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    profile: Literal["tiny", "smoke", "sd15"]
    base: BaseParams
    prepare: PrepareParams
    teacher: TeacherParams
    encode: EncodeParams
    vpred: VpredParams
    guidance: GuidanceParams
    prune: PruneParams
    halve: HalveParams
    decoder: DecoderParams
    assemble: AssembleParams
    reference: ReferenceParams
    evaluate: EvaluateParams
    register: RegisterParams

    def for_stage(self, section: str) -> dict[str, Any]:
        """What a stage sees and records: ``profile``, ``base`` and its own section."""
        return {"profile": self.profile, "base": self.base.model_dump(mode="json"),
                section: getattr(self, section).model_dump(mode="json")}

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)
