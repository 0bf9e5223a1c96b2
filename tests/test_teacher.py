import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sd_distill.models.parts import build_unet
from sd_distill.models.tokenizer import build_tokenizer
from sd_distill.params import resolve
from sd_distill.runner import run_stage
from sd_distill.diffusion import min_snr_weight
from tests.conftest import write_params


def test_teacher_folder_loads_offline_with_stock_diffusers_and_samples(smoke_project):
    folder = smoke_project / "models" / "teacher"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.vae.config.scaling_factor != 1.0  # measured from the latents
    out = pipe("a handwritten digit seven", num_inference_steps=3, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_teacher_training_logged_decreasing_losses(smoke_project, mlflow_store):
    import mlflow

    client = mlflow.MlflowClient(mlflow_store)
    run = client.search_runs(client.get_experiment_by_name("sd-distill").experiment_id,
                             "tags.`sd_distill.stage` = 'teacher' and attributes.status = 'FINISHED'",
                             max_results=1)[0]  # the smoke project's run: tests of bad input log failed ones too
    vae = [m.value for m in client.get_metric_history(run.info.run_id, "vae/loss")]
    assert len(vae) == 4 and all(b < a for a, b in zip(vae, vae[1:]))  # every VAE step lowers it
    history = [m.value for m in client.get_metric_history(run.info.run_id, "unet/loss")]
    assert len(history) == 6 and all(np.isfinite(history))
    assert np.mean(history[3:]) < np.mean(history[:3])  # six noisy UNet steps: the later half is lower
    assert run.data.params["teacher.unet_train.steps"] == "6"
    assert run.info.status == "FINISHED"


def test_tiny_unet_has_sd_block_layout():
    unet = build_unet(resolve_tiny().teacher.unet, sample_size=8, in_channels=4, cross_attention_dim=32)
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert all(len(block.resnets) == 2 for block in unet.down_blocks)
    assert 4.0e6 < sum(p.numel() for p in unet.parameters()) < 5.0e6


def resolve_tiny():
    import tempfile
    from pathlib import Path

    return resolve(write_params(Path(tempfile.mkdtemp()), "tiny"))


def test_tokenizer_spells_caption_words_as_single_tokens():
    tok = build_tokenizer(["a handwritten digit seven", "the digit nine, written by hand"], max_length=16)
    ids = tok("a handwritten digit seven").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>",
                                              "seven</w>", "<|endoftext|>"]
    unknown = tok.convert_ids_to_tokens(tok("zebra").input_ids)
    assert unknown[1:-1] == ["z", "e", "b", "r", "a</w>"]  # bytes, never an unknown token


def test_min_snr_weight_reference_values():
    alphas = torch.tensor([0.99, 0.5, 0.01])  # SNR = 99, 1, 1/99
    w = min_snr_weight(alphas, torch.tensor([0, 1, 2]), gamma=5.0)
    assert torch.allclose(w, torch.tensor([5 / 99, 1.0, 1.0]))
    assert torch.equal(min_snr_weight(alphas, torch.tensor([0, 2]), None), torch.ones(2))


def test_sd15_teacher_from_a_local_folder_is_copied_through(smoke_project, tmp_path):
    shutil.copytree(smoke_project / "data", tmp_path / "data")
    params = resolve(write_params(tmp_path, "smoke",
                                  teacher={"source": str(smoke_project / "models" / "teacher")}))
    summary = run_stage("teacher", params, tmp_path)
    a = StableDiffusionPipeline.from_pretrained(smoke_project / "models" / "teacher").unet.state_dict()
    b = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "teacher").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["unet_parameters"] == sum(v.numel() for v in a.values())
    saved = json.loads((tmp_path / "models" / "teacher" / "params.resolved.json").read_text())
    assert saved["teacher"]["source"].endswith("teacher")


def test_teacher_source_path_without_model_index_is_refused(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    params = resolve(write_params(tmp_path, "smoke", teacher={"source": str(tmp_path / "empty")}))
    with pytest.raises(FileNotFoundError, match="holds no model_index.json"):
        run_stage("teacher", params, tmp_path)
    assert not (tmp_path / "models" / "teacher").exists()
