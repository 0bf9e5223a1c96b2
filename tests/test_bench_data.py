"""The data-scale benchmark's inputs: LAION-like pairs with unique captions, and a teacher shaped like SD v1.5."""

import json

from diffusers import StableDiffusionPipeline
from PIL import Image

from sd_distill.bench import data


def test_synthetic_pairs_are_jpegs_of_the_size_asked_with_all_captions_different(tmp_path):
    data.synthetic_pairs(tmp_path, 12, 32)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len({r["text"] for r in rows}) == 12
    with Image.open(tmp_path / rows[0]["file_name"]) as image:
        assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"


def test_the_teacher_has_sd15_structure_at_reduced_width(tmp_path):
    data.sd_shaped_teacher(tmp_path, 64)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.tokenizer.model_max_length == 77 and pipe.unet.config.sample_size == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.unet.config.layers_per_block == 2
    assert list(pipe.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    image = pipe("a red cat, picture 3", num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
