"""The params schema: one frozen pydantic section per stage plus ``base``, and ``Params``, all of them together.

The defaults of every field are the ``tiny`` profile; ``presets.PROFILES`` holds what the other profiles change and
``loading.resolve`` layers them. Imports no torch.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd_distill.errors import UserError

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
                                                      "uses 1 (the sd15 preset does); 0 on tiny (the README says "
                                                      "why)")
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


FIRST_TEACHER_STEPS = 2 * HALVING_STEPS[0]  # the first round's teacher (the pruned or guided model) samples in 64


class HalveParams(GuidanceRange):
    mode: Literal["progressive", "direct"] = Field(
        "progressive", description="progressive: N -> N/2 each round; direct: the first teacher's 64 sampling steps "
                                   "-> each N in one stage")
    train: TrainParams = TrainParams(steps=200, batch_size=64, learning_rate=1e-4, warmup_steps=10,
                                     ema_decay=0.99, checkpoint_every=100)
    round_train_steps: dict[int, int] = Field(
        default_factory=lambda: {32: 150, 16: 150, 8: 150, 4: 200, 2: 200, 1: 200},
        description="optimizer steps per round, keyed by the round's student sampling steps (overrides train.steps)")
    loss: Literal["plain", "cfg_aware"] = Field(
        "plain", description="plain: the student regresses its teacher's two-step target (Salimans & Ho 2022), the "
                             "w-input chain of dvc.yaml; cfg_aware: SnapFusion's loss (Li et al. 2023, eq. 10-11) for "
                             "a student WITHOUT a w input, sampled with classifier-free guidance: only for the chain "
                             "from models/vpred that `python -m sd_distill.bench.one_step --parts snapfusion` runs")
    cfg_prob: float = Field(0.5, ge=0, le=1, description="cfg_aware: probability that a batch's teacher steps and "
                                                         "student prediction both use CFG at w ~ U[w_min, w_max] "
                                                         "(else both are conditional only); SnapFusion sweeps "
                                                         "0.1-1 and publishes no single default")
    ori_weight: float = Field(1.0, ge=0, description="cfg_aware: weight of SnapFusion's L_ori (the student's plain "
                                                     "denoising loss on the data), scaled each batch to the "
                                                     "distillation loss' size as the paper's 'dynamic' gamma; 0: off")

    @model_validator(mode="after")
    def _check(self) -> "HalveParams":
        unknown = sorted(set(self.round_train_steps) - set(HALVING_STEPS))
        if unknown:
            raise ValueError(f"round_train_steps has keys {unknown}; allowed (the rounds' student sampling steps): "
                             f"{list(HALVING_STEPS)}")
        return self

    def train_for(self, student_steps: int) -> TrainParams:
        """The training params of the round whose student samples in ``student_steps``."""
        return self.train.model_copy(update={"steps": self.round_train_steps.get(student_steps, self.train.steps)})


class DMDParams(GuidanceRange):
    """One-step refinement of ``models/steps-1`` by distribution matching and a diffusion GAN (DMD2, Yin et al. 2024,
    as coded in tianweiy/DMD2). One loop step is one update of the fake score and its critic head; the generator
    updates on every ``update_ratio``-th step after ``fake_warmup`` (DMD2's two time-scale rule)."""

    objective: Literal["both", "dm", "gan"] = Field(
        "both", description="both: distribution matching + GAN (DMD2); dm: distribution matching only (DMD2's "
                            "'without GAN' row); gan: the GAN term only (the fake score still learns, as in DMD2)")
    real_score: Literal["cfg", "guided"] = Field(
        "cfg", description="cfg: the guidance-free v model (models/vpred) with classifier-free guidance at the "
                           "generator's w, two calls; guided: the w-input model (models/guided), one call")
    fake_init: Literal["pruned", "guided"] = Field(
        "pruned", description="the w-conditioned model the fake score starts from (it also carries the critic)")
    update_ratio: int = Field(5, ge=1, description="fake-score updates per generator update (DMD2: 10 on SD v1.5, "
                                                   "5 on SDXL and ImageNet)")
    fake_warmup: int = Field(50, ge=0, description="fake-score-only steps before the first generator update, so "
                                                   "the fake tracks the already-guided generator first")
    generator_learning_rate: float | None = Field(
        None, gt=0, le=1, description="the generator's AdamW rate; null: train.learning_rate, which the fake score "
                                      "and critic head always use (DMD2 has one rate for both, and a separate one "
                                      "in its code: generator_lr, guidance_lr)")
    dm_weight: float = Field(1.0, ge=0, description="weight of the distribution-matching loss")
    gen_gan_weight: float = Field(1e-2, ge=0, description="weight of the generator's GAN loss")
    disc_gan_weight: float = Field(1e-2, ge=0, description="weight of the critic's GAN loss in the fake's update")
    dm_t_min: int = Field(20, ge=0, description="smallest timestep of the distribution-matching noise (DMD2: 20)")
    dm_t_max: int = Field(980, ge=0, description="largest timestep of the distribution-matching noise (DMD2: 980)")
    gan_t_max: int = Field(1000, ge=1, description="GAN noise timesteps are drawn from [0, gan_t_max) for real and "
                                                   "generated latents alike (DMD2: 1000)")
    train: TrainParams = TrainParams(steps=300, batch_size=32, learning_rate=1e-4, lr_schedule="constant",
                                     warmup_steps=0, weight_decay=0.01, max_grad_norm=10.0, ema_decay=0.0,
                                     checkpoint_every=100)

    @model_validator(mode="after")
    def _check(self) -> "DMDParams":
        if self.dm_t_max < self.dm_t_min:
            raise ValueError(f"dm_t_max ({self.dm_t_max}) must be >= dm_t_min ({self.dm_t_min})")
        if self.fake_warmup >= self.train.steps:
            raise ValueError(f"fake_warmup ({self.fake_warmup}) leaves no generator update in train.steps "
                             f"({self.train.steps}); lower fake_warmup or raise train.steps")
        return self

    def generator_updates(self) -> int:
        """How many of ``train.steps`` also update the generator."""
        return len(range(self.fake_warmup, self.train.steps, self.update_ratio))


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
    source: str = Field(
        "auto", description="which model becomes models/student: dmd, steps-N (N a halving round: its N steps), or "
                            "auto: of the one-step models (dmd, steps-1) the one with the lower FID on the "
                            "validation split's captions (reports/report.md says which and why)")
    select_images: int = Field(500, ge=2, description="auto: images per candidate, one per validation caption in "
                                                      "split order (cycled when the split has fewer)")
    batch_size: int = Field(125, ge=1, description="auto: images sampled at once")
    inception: str | None = Field(None, description="auto on data other than digits: the TorchScript FID Inception "
                                                    "file (inception-2015-12-05.pt); digits use their classifier")
    guidance: float = Field(7.5, ge=1, description="default guidance_scale written to the model card (and auto's "
                                                   "sampling guidance)")
    decoder: Literal["tiny", "full"] = Field("tiny", description="tiny: the distilled AutoencoderTiny; full: the VAE")

    @model_validator(mode="after")
    def _check(self) -> "AssembleParams":
        rounds = [f"steps-{n}" for n in HALVING_STEPS]
        if self.source not in ("auto", "dmd", *rounds):
            raise ValueError(f"source must be auto, dmd or one of {rounds}, found {self.source!r}")
        return self


class EvaluateParams(Section):
    suite: Literal["digits", "text-image"] = Field(
        "digits", description="digits: classifier accuracy and FID in its feature space on digit prompts (tiny, "
                              "smoke); text-image: the prompt_sets with FID, IS, CLIP score, HPSv2 (sd15)")
    sampling_steps: int = Field(64, ge=1, description="the teacher's sampling steps (DDIM)")
    guidance: float = Field(7.5, ge=1, description="classifier-free guidance scale, diffusers convention")
    samples_per_prompt: int = Field(50, ge=1)
    batch_size: int = Field(125, ge=1)
    prompt_template: str = "a handwritten digit {word}"
    grid_columns: int = Field(10, ge=1)
    baseline_sampling_steps: tuple[int, ...] = Field((8, 4, 2, 1), description="teacher with each solver at these step counts")
    baseline_solvers: tuple[Literal["dpmpp", "ddim"], ...] = ("dpmpp", "ddim")
    grid_sampling_steps: tuple[int, ...] = Field((8, 4, 2, 1), description="rows of reports/grid.png under the teacher: the "
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
        if self.suite == "digits" and self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt is {self.samples_per_prompt}; the digits suite needs at least 2: its "
                             "diversity is the distance between samples of the same prompt")
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
    "dmd": DMDParams,
    "decoder": DecoderParams,
    "assemble": AssembleParams,
    "reference": ReferenceParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
}


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
    dmd: DMDParams
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
