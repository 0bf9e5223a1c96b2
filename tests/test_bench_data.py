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


def _row(n, commit):
    stage = {"seconds": 1.0, "peak_rss_mb": 100.0, "images_per_second": 10.0, "first_step_seconds": 2.0,
             "samples_per_second": 3.0, "samples_per_second_without_data_wait": 3.0, "data_wait_seconds": 0.0}
    return {"n": n, **{k: {**stage, "commit": commit, "date": "2026-12-01"}
                       for k in ("prepare_w1", "prepare_w2", "encode", "vpred")}}


def test_a_stage_measured_again_replaces_its_figures_and_the_table_says_at_which_commit():
    result = {"side": 256, "machine": "2 cores", "rows": [_row(1000, "aaa"), _row(50000, "aaa")]}
    again = {"n": 50000, "encode": {**_row(50000, "bbb")["encode"], "peak_rss_mb": 90.0, "date": "2026-12-03"}}
    data.merge(result, again)
    assert [r["n"] for r in result["rows"]] == [1000, 50000]
    assert result["rows"][1]["encode"]["peak_rss_mb"] == 90.0 and result["rows"][1]["vpred"]["commit"] == "aaa"
    table = data.render(result)
    assert "| 50,000 | 10 | 10 | 100 / 100 | 10 | 90 | 100 |" in table
    assert "- N=50,000: prepare_w1 at aaa (2026-12-01), prepare_w2 at aaa (2026-12-01), encode at bbb (2026-12-03)" \
        in table
    assert "N=1,000" not in table  # one commit for the whole row: no note
    for stage in ("prepare_w1", "prepare_w2", "vpred"):  # figures from before they carried a commit and a date
        for key in ("commit", "date"):
            del result["rows"][1][stage][key]
    assert "- N=50,000: prepare_w1 at an earlier commit, prepare_w2 at an earlier commit, encode at bbb (2026-12-03), " \
        "vpred at an earlier commit" in data.render(result)


def test_measuring_some_stages_needs_the_rows_it_updates(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        data.main(["--stages", "encode", "--sizes", "1000", "--out", str(tmp_path), "--work", str(tmp_path)])
    assert exit_.value.code == 2 and "bench_data.json to update" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data.main(["--stages", "encode,decode", "--out", str(tmp_path)])
    assert "'decode' not among prepare, encode, vpred" in capsys.readouterr().err
