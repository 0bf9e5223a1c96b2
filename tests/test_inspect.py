import json

import pytest
import torch
from diffusers import AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sd_distill.cli import main
from sd_distill.errors import UserError
from sd_distill.models import bk, costs
from sd_distill.models.parts import assemble
from sd_distill.models.tokenizer import build_tokenizer

# UNet parameters of SD v1.5 and of BK-SDM's published configs (Kim et al. 2023) in current diffusers
BK_SDM_UNET_PARAMETERS = {"none": 859.52e6, "base": 579.38e6, "small": 482.35e6, "tiny": 323.38e6}

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16, 16], layers_per_block=2,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=8)


@pytest.fixture(scope="module")
def sd15():
    return costs.report_arch("sd15")


@pytest.fixture(scope="module")
def bk_tiny_taesd():
    return costs.report_arch("sd15", "tiny", "tiny")


def meta_unet(variant: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(bk.compact_config(costs.SD15_UNET_CONFIG, variant))


@pytest.mark.parametrize("variant", bk.VARIANTS)
def test_bk_sdm_unet_parameters_match_the_published_configs(variant):
    n = costs.count_parameters(meta_unet(variant))
    assert n == pytest.approx(BK_SDM_UNET_PARAMETERS[variant], rel=1e-3)


def test_parameter_counts_take_shared_weights_once_and_can_count_only_the_trained_ones():
    shared = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    model = torch.nn.Sequential(shared, torch.nn.Linear(2, 5), shared)  # + 10 + 5
    assert costs.count_parameters(model) == 8 + 15 and costs.count_parameters(None) == 0
    model[1].requires_grad_(False)
    assert costs.count_parameters(model, trainable_only=True) == 8
    assert costs.count_parameters(model) == 8 + 15


def test_bk_sdm_variants_get_smaller_in_order():
    counts = [costs.count_parameters(meta_unet(v)) for v in ("none", "base", "small", "tiny")]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4


def test_sd15_vae_decoder_and_taesd_decoder_parameters(sd15, bk_tiny_taesd):
    assert sd15["decoder_class"] == "AutoencoderKL" and bk_tiny_taesd["decoder_class"] == "AutoencoderTiny"
    assert sd15["parameters"]["vae_decoder"] == pytest.approx(49.49e6, rel=1e-3)
    assert bk_tiny_taesd["parameters"]["vae_decoder"] == pytest.approx(1.22e6, rel=0.02)


def test_sd15_unet_macs_without_attention_matmuls_are_the_quoted_339g(sd15):
    call = sd15["unet_call"]
    assert call["macs_without_attention_matmuls"] == pytest.approx(339e9, rel=0.02)
    assert 2 * call["macs_total"] == pytest.approx(803e9, rel=0.01)  # FLOPs with the attention matmuls
    assert call["macs_total"] == call["macs_attention_matmuls"] + call["macs_without_attention_matmuls"]


def test_sd15_attention_matmuls_match_a_hand_count(sd15):
    # Q K^T and A V: 2 * N_q * N_k * C MACs per attention; every transformer block has self-attention
    # (N_k = N) and cross-attention (N_k = 77 tokens). Latent 64x64: 5 blocks at 64x64 (C 320), 5 at 32x32
    # (C 640), 5 at 16x16 (C 1280), the mid block at 8x8 (C 1280).
    blocks = [(320, 64 * 64, 5), (640, 32 * 32, 5), (1280, 16 * 16, 5), (1280, 8 * 8, 1)]
    expected = sum(k * 2 * c * n * (n + 77) for c, n, k in blocks)
    assert sd15["unet_call"]["macs_attention_matmuls"] == expected


def test_counts_are_the_same_on_cpu_and_meta():
    # CPU's fused attention kernel has no FlopCounterMode formula; counting must not lose it there
    unet = UNet2DConditionModel(**TINY_UNET)
    on_cpu = costs.unet_macs(unet, 8, 8, seq_len=5)
    on_meta = costs.unet_macs(unet.to("meta"), 8, 8, seq_len=5)
    assert on_cpu == on_meta and on_cpu["macs_attention_matmuls"] > 0


def test_bk_report_compares_with_the_parent(bk_tiny_taesd):
    r = bk_tiny_taesd
    assert r["parent_unet"]["parameters"] == pytest.approx(859.52e6, rel=1e-3)
    assert r["parameters"]["unet"] == pytest.approx(323.38e6, rel=1e-3)
    assert r["unet_reduction_pct"]["parameters"] == pytest.approx(100 * (1 - 323.38 / 859.52), abs=0.1)
    assert r["unet_call"]["macs_total"] < r["parent_unet"]["unet_call"]["macs_total"]
    assert r["decoder_call"]["macs_total"] < r["unet_call"]["macs_total"]


def test_json_output_has_the_documented_keys(capsys):
    assert main(["inspect", "--arch", "sd15", "--bk", "small", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"model", "weights", "bk_variant", "decoder", "decoder_class", "resolution", "latent_shape",
            "text_states_shape", "guidance_input_dim", "parameters", "unet_call", "decoder_call", "parent_unet",
            "unet_reduction_pct"} <= set(r)
    assert set(r["parameters"]) == {"unet", "vae_decoder", "vae_encoder", "text_encoder"}
    assert set(r["unet_call"]) == {"macs_total", "macs_attention_matmuls", "macs_without_attention_matmuls"}
    assert r["resolution"] == 512 and r["latent_shape"] == [4, 64, 64] and r["text_states_shape"] == [77, 768]
    assert r["parameters"]["text_encoder"] == pytest.approx(123.06e6, rel=1e-3)


def test_table_shows_parent_reduction_and_both_mac_counts(capsys):
    assert main(["inspect", "--arch", "sd15", "--bk", "base"]) == 0
    out = capsys.readouterr().out
    assert "579.38M" in out and "859.52M" in out and "-32.6%" in out
    assert "without attention matmuls" in out and "338.61G" in out and "401.64G" in out


def test_unknown_arch_exits_2_and_names_the_allowed_ones(capsys):
    assert main(["inspect", "--arch", "sd99"]) == 2
    err = capsys.readouterr().err
    assert "sd99" in err and "sd15" in err


def test_folder_without_a_pipeline_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_folder_with_a_tiny_decoder_is_counted_as_saved(tmp_path):
    tokenizer = build_tokenizer(["a digit"], max_length=6)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=6,
                                        projection_dim=16))
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    assemble(vae, text, tokenizer, unet, DDIMScheduler(clip_sample=False, steps_offset=1)).save_pretrained(tmp_path)

    r = costs.report_folder(tmp_path)
    assert r["parameters"]["unet"] == costs.count_parameters(unet)
    assert r["parameters"]["vae_decoder"] == costs.count_parameters(vae.decoder)
    assert r["decoder"] == "tiny" and r["decoder_class"] == "AutoencoderTiny"
    assert r["text_states_shape"] == [6, 16] and r["guidance_input_dim"] == 8
    assert r["resolution"] == 16 and r["latent_shape"] == [4, 8, 8]
    with pytest.raises(UserError, match="AutoencoderTiny"):
        costs.report_folder(tmp_path, decoder="full")
