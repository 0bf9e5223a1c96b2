"""Stage ``decoder``: the TAESD-style tiny autoencoder distilled from the teacher's VAE."""

import json
import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline
from safetensors.torch import load_file

from sd_distill.data.latents import to_model_range
from sd_distill.data.shards import read_split
from sd_distill.losses import HingeGAN
from sd_distill.params import resolve
from sd_distill.runner import run_stage
from sd_distill.stages.decoder import evaluate_decoder
from tests.conftest import write_params

REPORT_KEYS = {
    "psnr_tiny_vs_full", "psnr_full_vs_real", "psnr_tiny_vs_real", "psnr_tiny_roundtrip_vs_real",
    "psnr_tiny_vs_full_untrained", "tiny_decoder_parameters", "full_decoder_parameters", "tiny_encoder_parameters",
    "full_encoder_parameters", "full_decode_seconds", "tiny_decode_seconds", "decode_speedup", "eval_images",
    "timing_batch",
}
DECODER_STARTED: dict[str, int] = {}  # ms; finds the fixture's MLflow run in the session's shared store


@pytest.fixture(scope="module")
def project(smoke_project, tmp_path_factory):
    """The shared smoke project's data and teacher, and a decoder run of its own (the smoke preset: 4 steps, timed
    to find its MLflow run); read-only."""
    root = upstream_copy(smoke_project, tmp_path_factory.mktemp("decoder"))
    params = resolve(write_params(root, "smoke"))
    DECODER_STARTED["ms"] = int(time.time() * 1000)
    run_stage("decoder", params, root)
    return root


def upstream_copy(project, dest):
    """A fresh project folder holding only the decoder stage's inputs."""
    shutil.copytree(project / "data", dest / "data")
    shutil.copytree(project / "models" / "teacher", dest / "models" / "teacher")
    return dest


def teacher_vae(root) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(root / "models" / "teacher" / "vae", local_files_only=True).eval()


def test_saved_folder_is_an_autoencoder_tiny_that_decodes_teacher_latents_to_training_resolution(project):
    tiny = AutoencoderTiny.from_pretrained(project / "models" / "decoder", local_files_only=True).eval()
    vae = teacher_vae(project)
    assert tiny.config.scaling_factor == 1.0  # it takes the UNet's scaled latents as they are
    assert tiny.config.latent_channels == vae.config.latent_channels
    x = to_model_range(read_split(project / "data" / "prepared", "train").images[:5])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        images = tiny.decode(z).sample
        latents = tiny.encode(x).latents
    assert images.shape == x.shape == (5, 3, 16, 16) and torch.isfinite(images).all()
    assert latents.shape == z.shape


def test_report_has_documented_keys_with_sane_values(project):
    report = json.loads((project / "reports" / "decoder.json").read_text())
    assert set(report) == REPORT_KEYS
    assert report["eval_images"] == 16 and report["timing_batch"] == 16  # smoke: eval_images 16, batch 16
    assert 0 < report["tiny_decoder_parameters"] < report["full_decoder_parameters"]
    assert 0 < report["tiny_encoder_parameters"]
    assert all(np.isfinite(report[k]) for k in REPORT_KEYS if k.startswith("psnr"))
    assert report["psnr_tiny_vs_full"] > report["psnr_tiny_vs_full_untrained"]  # 4 steps already help (bit-exact)
    assert report["psnr_full_vs_real"] > report["psnr_tiny_vs_real"]  # the student decodes worse than its teacher
    assert report["full_decode_seconds"] > 0 and report["tiny_decode_seconds"] > 0
    assert report["decode_speedup"] == pytest.approx(report["full_decode_seconds"] / report["tiny_decode_seconds"])
    tiny = AutoencoderTiny.from_pretrained(project / "models" / "decoder")
    assert report["tiny_decoder_parameters"] == sum(t.numel() for t in tiny.decoder.parameters())


def test_training_losses_and_summary_are_logged_to_mlflow(project, mlflow_store):
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    run = client.search_runs(client.get_experiment_by_name("sd-distill").experiment_id,
                             f"tags.`sd_distill.stage` = 'decoder' and attributes.start_time >= {DECODER_STARTED['ms']}",
                             order_by=["attributes.start_time ASC"])[0]
    for key in ("decoder/loss", "decoder/decoder_mse", "decoder/encoder_mse"):
        history = [m.value for m in client.get_metric_history(run.info.run_id, key)]
        assert len(history) == 4 and all(np.isfinite(history)), key  # smoke: 4 steps, log_every 1
    assert "decoder/critic_hinge" not in run.data.metrics  # adversarial_weight is 0 by default
    report = json.loads((project / "reports" / "decoder.json").read_text())
    for key in REPORT_KEYS:  # the run's summary metrics are the written report
        assert run.data.metrics[key] == pytest.approx(report[key], rel=1e-6), key


def test_short_training_beats_the_untrained_student_and_the_report_matches_the_saved_folder(project, tmp_path):
    root = upstream_copy(project, tmp_path)
    params = resolve(write_params(root, "smoke"), ["decoder.train.steps=40", "decoder.train.checkpoint_every=40"])
    summary = run_stage("decoder", params, root)
    assert summary["psnr_tiny_vs_full"] > summary["psnr_tiny_vs_full_untrained"] + 3.0

    # the published folder, decoded independently, gives the reported quality
    tiny = AutoencoderTiny.from_pretrained(root / "models" / "decoder", local_files_only=True).eval()
    images = to_model_range(read_split(root / "data" / "prepared", "test").images[:16])
    again = evaluate_decoder(teacher_vae(root), tiny, images, batch=16, timing=False)
    assert again["psnr_tiny_vs_full"] == pytest.approx(summary["psnr_tiny_vs_full"], abs=1e-3)


def test_adversarial_run_checkpoints_its_discriminator_resumes_exactly_and_publishes_only_the_tiny_vae(
        project, tmp_path):
    root = upstream_copy(project, tmp_path)
    params = resolve(write_params(root, "smoke"), ["decoder.adversarial_weight=0.1"])
    summary = run_stage("decoder", params, root)
    assert np.isfinite(summary["psnr_tiny_vs_full"])
    weights = root / "models" / "decoder" / "diffusion_pytorch_model.safetensors"
    published = load_file(weights)
    fresh = AutoencoderTiny.from_config(AutoencoderTiny.load_config(root / "models" / "decoder"))
    assert set(published) == set(fresh.state_dict())  # no discriminator weights
    checkpoints = sorted((root / "checkpoints" / "decoder").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-0000002", "step-0000004"]
    assert any(k.startswith("model.critic.") for k in load_file(checkpoints[-1] / "model.safetensors"))

    # resuming from step 2 replays the same batches, noise and discriminator: the same weights
    shutil.rmtree(checkpoints[-1])
    run_stage("decoder", params, root, resume=True)
    resumed = load_file(weights)
    assert all(torch.equal(published[k], resumed[k]) for k in published)


def test_stock_pipeline_samples_at_training_resolution_with_the_tiny_vae_swapped_in(project):
    pipe = StableDiffusionPipeline.from_pretrained(project / "models" / "teacher", local_files_only=True)
    pipe.vae = AutoencoderTiny.from_pretrained(project / "models" / "decoder", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a handwritten digit seven", num_inference_steps=2, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_hinge_losses_reference_values_and_each_half_trains_only_its_side():
    critic = torch.nn.Conv2d(3, 1, 1)
    torch.nn.init.constant_(critic.weight, 0.1)
    torch.nn.init.constant_(critic.bias, 0.5)  # D(image of ones) = 0.8, D(zeros) = 0.5 at every pixel
    generator = torch.nn.Parameter(torch.zeros(2, 3, 4, 4))
    real, fake = torch.ones(2, 3, 4, 4), generator * 2
    d_loss, g_loss = HingeGAN()(critic, real, fake)
    assert d_loss.item() == pytest.approx(0.2 + 1.5)  # relu(1 - 0.8) + relu(1 + 0.5)
    assert g_loss.item() == pytest.approx(-0.5)  # -D(fake)
    d_loss.backward()
    assert generator.grad is None and critic.bias.grad is not None
    critic.zero_grad(set_to_none=True)
    g_loss.backward()
    assert critic.weight.grad is None and critic.bias.grad is None
    assert torch.allclose(generator.grad, torch.full_like(generator, -0.1 * 2 / 32))  # -dD/dfake * dfake/dg / B*H*W


def test_missing_teacher_vae_names_the_folder_and_the_stage_to_run(project, tmp_path):
    root = upstream_copy(project, tmp_path)
    shutil.rmtree(root / "models" / "teacher" / "vae")
    params = resolve(write_params(root, "smoke"))
    with pytest.raises(FileNotFoundError, match=r"teacher/vae.*sd-distill run teacher"):
        run_stage("decoder", params, root)
    assert not (root / "models" / "decoder").exists()
