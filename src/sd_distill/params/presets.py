"""Profile presets: per profile, only what differs from the schema defaults (which are the ``tiny`` profile).

Every training number of ``sd15`` cites its source (paper or released code) in a comment beside it. Data only:
``loading.resolve`` validates a preset with the schema when a run asks for its profile.
"""

from __future__ import annotations

from typing import Any

from sd_distill.params.schema import HALVING_STEPS

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
                  "round_train_steps": {n: 2 for n in HALVING_STEPS}},
        "dmd": {"fake_warmup": 1, "update_ratio": 2,
                "train": {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "log_every": 1}},
        "assemble": {"select_images": 16, "batch_size": 16},
        "evaluate": {"sampling_steps": 4, "samples_per_prompt": 2, "batch_size": 20, "baseline_sampling_steps": [2, 1],
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
            "round_train_steps": {32: 2000, 16: 2000, 8: 5000, 4: 20000, 2: 20000, 1: 20000},
        },
        "dmd": {
            # DMD2's SD v1.5 recipe (tianweiy/DMD2 experiments/sdv1.5/*.sh, main/train_sd.py; paper F.3): AdamW lr
            # 1e-5 for generator and fake score alike, betas (0.9, 0.999), weight decay 0.01, constant_with_warmup
            # over 500 steps, max_grad_norm 10; dfake_gen_update_ratio 10; DM timesteps [20, 980] (min/max_step
            # 0.02/0.98 of 1000); diffusion-GAN noise over [0, 1000); gen_cls_loss_weight 1e-3, guidance_cls_loss_
            # weight 1e-2 (the GAN stage). Real guidance: DMD2 trains at a fixed scale 1.75 for FID (w = 0.75); ours
            # draws w over the w-conditioned student's [2, 14] like the halving rounds. Steps: DMD2 runs 40 k DM
            # iterations then 5 k with the GAN at batch 2048 from the teacher; starting from the progressive
            # student we chose 10 k fake updates (1 k generator updates) at BK-SDM's batch 256, no published number.
            "w_min": 2.0, "w_max": 14.0, "update_ratio": 10, "fake_warmup": 500, "gen_gan_weight": 1e-3,
            "disc_gan_weight": 1e-2,
            "train": {"steps": 10000, "batch_size": 64, "grad_accum": 4, "learning_rate": 1e-5,
                      "lr_schedule": "constant_with_warmup", "warmup_steps": 500, "weight_decay": 1e-2,
                      "max_grad_norm": 10.0, "ema_decay": 0.0, "gradient_checkpointing": True, "allow_tf32": True,
                      "checkpoint_every": 1000, "log_every": 50},
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
        # auto: dmd against steps-1 on 1,000 validation captions (one UNet call each), Inception FID on the val images
        "assemble": {"select_images": 1000, "batch_size": 16, "inception": "data/eval/inception-2015-12-05.pt"},
        "evaluate": {"suite": "text-image", "batch_size": 8, "prompt_sets": ["coco", "parti", "hpsv2"],
                     "images_per_set": 1000,
                     "baseline_sampling_steps": [20, 16, 8, 4, 2, 1], "latency_repeats": 10,
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
