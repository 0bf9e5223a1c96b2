"""Stage ``encode`` and the training data read from disk: what is written, how it is read back, and bad latents."""

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from sd_distill.cli import main
from sd_distill.data import latents as latent_data
from sd_distill.data.latents import encode_images, in_memory, to_model_range, tokenize
from sd_distill.data.shards import read_split, sha256_file
from sd_distill.data.store import LatentStore
from sd_distill.params import TrainParams, resolve
from sd_distill.runner import run_stage
from sd_distill.stages import encode
from tests.conftest import write_params
from tests.test_bad_input import one_error_line


@pytest.fixture(scope="module")
def project(smoke_project):
    """The shared smoke project, read-only: its encode ran on 272 training samples in two shards of 150 and 122."""
    return smoke_project


def copy_of(project, dest, *parts):
    for part in parts:
        shutil.copytree(project / part, dest / part)
    write_params(dest)
    return dest


def teacher(project):
    return StableDiffusionPipeline.from_pretrained(project / "models" / "teacher", local_files_only=True)


def test_each_sample_holds_the_teacher_vae_posterior_in_fp16_and_its_caption_token_ids(project):
    pipe = teacher(project)
    store = LatentStore(project / "data" / "latents")
    manifest = store.manifest
    assert manifest["samples"] == {"train": 272} and [r["samples"] for r in manifest["shards"]] == [150, 122]
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["scaling_factor"] == pipe.vae.config.scaling_factor
    for row in manifest["shards"]:
        for f in row["files"].values():
            assert sha256_file(project / "data" / "latents" / f["file"]) == f["sha256"]
    split = read_split(project / "data" / "prepared", "train")
    picks = [0, 149, 150, 271]  # both ends of both shards
    mean, std = encode_images(pipe.vae.eval(), to_model_range(split.images[picks]))
    rows = store.rows(np.array(picks))
    assert rows["posterior"].dtype == torch.float16 and rows["posterior"].shape == (4, 2, 4, 8, 8)
    assert torch.equal(rows["posterior"][:, 0], mean.half()) and torch.equal(rows["posterior"][:, 1], std.half())
    assert torch.equal(rows["ids"], tokenize(pipe.tokenizer, [split.captions[i] for i in picks]))
    with torch.no_grad():
        emb = pipe.text_encoder(rows["ids"])[0]
    torch.testing.assert_close(rows["emb"], emb, atol=1e-5, rtol=1e-5)


def test_rows_come_back_in_the_order_asked_across_shards_and_with_repeats(project):
    store = LatentStore(project / "data" / "latents")
    folder = project / "data" / "latents"
    whole = np.concatenate([np.load(folder / r["files"]["posterior"]["file"]) for r in store.manifest["shards"]])
    idx = np.array([271, 0, 150, 0, 149])
    assert np.array_equal(store.rows(idx)["posterior"].numpy(), whole[idx])
    with pytest.raises(IndexError):
        store.rows(np.array([272]))


def draws(batches, keys, dropout=0.1):
    out = []
    for step, micro in keys:
        gen = torch.Generator().manual_seed(1000 * step + micro)  # any generator: the rows must follow its draw
        out.append(batches.draw(step, micro, gen, dropout))
    return out


def feed(project, pipe, workers, steps=6, grad_accum=2):
    train = TrainParams(steps=steps, batch_size=16, grad_accum=grad_accum, loader_workers=workers)
    return latent_data.from_disk(project / "data" / "latents", pipe, "test", "teacher", train, seed=0, device="cpu")


def test_read_ahead_workers_give_the_batches_the_loop_draws_bit_for_bit_also_after_a_resume(project):
    """Rows are read ahead for the (seed, step, micro) generators, so the draw must be the one the loop's own
    generator makes; a mismatch would raise. Checked against the in-memory encoding of the same split too."""
    from sd_distill.training.loop import step_generator

    pipe = teacher(project)
    keys = [(s, m) for s in range(6) for m in range(2)]

    def loop_draws(batches, keys):
        return [batches.draw(s, m, step_generator(0, s, m), 0.1) for s, m in keys]

    with feed(project, pipe, 0) as alone, feed(project, pipe, 2) as ahead, feed(project, pipe, 2) as resumed:
        a, b = loop_draws(alone, keys), loop_draws(ahead, keys)
        c = loop_draws(resumed, keys[5:])  # a run resumed mid-way starts reading there
        again = loop_draws(ahead, [keys[7]])  # an out-of-memory retry asks for a batch of the current step again
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    for x, y in zip(a[5:], c):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert all(torch.equal(u, v) for u, v in zip(a[7], again[0]))
    split = read_split(project / "data" / "prepared", "train")
    memory = in_memory(pipe.vae, pipe.tokenizer, pipe.text_encoder, split.images, split.captions, 16)
    m = loop_draws(memory, keys)
    for (x, cond, idx), (xm, condm, idxm) in zip(a, m):
        assert torch.equal(idx, idxm)
        torch.testing.assert_close(x, xm, atol=2e-3, rtol=2e-3)  # fp16 posteriors on disk, fp32 in memory
        torch.testing.assert_close(cond, condm, atol=1e-5, rtol=1e-5)


def test_a_batch_the_loop_did_not_draw_is_refused(project):
    with feed(project, teacher(project), 0) as batches:
        with pytest.raises(RuntimeError, match="not the ones the loop drew"):
            batches.draw(0, 0, torch.Generator().manual_seed(123))


def test_computed_embeddings_give_the_batches_of_stored_ones(project, tmp_path):
    root = copy_of(project, tmp_path, "data/prepared", "models/teacher")
    params = resolve(write_params(root, encode={"embeddings": "computed"}))
    run_stage("encode", params, root)
    manifest = json.loads((root / "data" / "latents" / "manifest.json").read_text())
    assert manifest["embeddings"] == "computed" and "text_encoder" not in manifest["models"]
    assert all(set(r["files"]) == {"posterior", "ids"} for r in manifest["shards"])
    pipe = teacher(project)
    with feed(project, pipe, 0) as stored, feed(root, pipe, 0) as computed:
        from sd_distill.training.loop import step_generator

        for s in range(3):
            x1, c1, _ = stored.draw(s, 0, step_generator(0, s, 0), 0.3)
            x2, c2, _ = computed.draw(s, 0, step_generator(0, s, 0), 0.3)
            assert torch.equal(x1, x2)
            torch.testing.assert_close(c1, c2, atol=1e-5, rtol=1e-5)


def test_a_changed_latent_shard_fails_the_training_stage_and_publishes_nothing(project, tmp_path, capsys):
    root = copy_of(project, tmp_path, "data/prepared", "data/latents", "models/teacher")
    shard = root / "data" / "latents" / "train-00001.posterior.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    assert main(["run", "vpred", "--params", str(root / "params.yaml")]) == 2
    line = one_error_line(capsys, "run")
    assert "train-00001.posterior.npy: sha256 differs from" in line and "Rerun encode" in line
    assert not (root / "models" / "vpred").exists()


def test_latents_made_by_another_vae_are_refused(project, tmp_path, capsys):
    root = copy_of(project, tmp_path, "data/prepared", "data/latents", "models/teacher")
    vae = AutoencoderKL.from_pretrained(root / "models" / "teacher" / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.01)  # another VAE: its decoder differs
    vae.save_pretrained(root / "models" / "teacher" / "vae")
    assert main(["run", "vpred", "--params", str(root / "params.yaml")]) == 2
    line = one_error_line(capsys, "run")
    assert "the latents were made by a vae with weights sha256" in line and "teacher's vae has" in line
    assert not (root / "models" / "vpred").exists()


def test_missing_latents_name_the_stage_to_run(project, tmp_path, capsys):
    root = copy_of(project, tmp_path, "data/prepared", "models/teacher")
    (root / "data" / "latents").mkdir()
    assert main(["run", "vpred", "--params", str(root / "params.yaml")]) == 2
    assert "no manifest of encoded latents; run `sd-distill run encode` first" in one_error_line(capsys, "run")


def test_images_the_vae_cannot_encode_are_refused_naming_the_factor(project, tmp_path, capsys):
    root = copy_of(project, tmp_path, "models/teacher")
    write_params(root, prepare={"resolution": 17})
    assert main(["run", "prepare", "--params", str(root / "params.yaml")]) == 0
    capsys.readouterr()
    assert main(["run", "encode", "--params", str(root / "params.yaml")]) == 2
    line = one_error_line(capsys, "run")
    assert "holds 17x17 px images" in line and "prepare.resolution must be a multiple of 2" in line
    assert not (root / "data" / "latents").exists()


def test_an_interrupted_encode_reuses_its_finished_shards_and_ends_with_the_same_bytes(project, tmp_path,
                                                                                         monkeypatch):
    root = copy_of(project, tmp_path, "data/prepared", "models/teacher")
    params = resolve(write_params(root))
    real, calls = encode.encode_shard, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as a kill mid-stage: the first shard is complete
        return real(*args, **kwargs)

    monkeypatch.setattr(encode, "encode_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_stage("encode", params, root)
    assert not (root / "data" / "latents").exists()
    assert (root / "checkpoints" / "encode" / "train-00000.done.json").is_file()
    monkeypatch.setattr(encode, "encode_shard", real)
    summary = run_stage("encode", params, root)
    assert summary["shards_reused"] == 1 and summary["shards"] == 2
    assert (root / "data" / "latents" / "manifest.json").read_bytes() == \
        (project / "data" / "latents" / "manifest.json").read_bytes()
    assert not list((root / "checkpoints" / "encode").glob("*.npy"))  # published, not copied


def test_read_ahead_rows_are_the_same_in_a_spawned_worker(project):
    """macOS and Windows start DataLoader workers with spawn, which sends the dataset to a fresh interpreter: the
    decoder's rows (posteriors from the store, pixels from the prepared shards) must arrive there and read the same."""
    from torch.utils.data import DataLoader

    from sd_distill.data.feed import KeyedRows
    from sd_distill.data.shards import PreparedImages
    from sd_distill.stages.decoder import PosteriorsAndPixels

    store = LatentStore(project / "data" / "latents")
    rows = KeyedRows(PosteriorsAndPixels(store, PreparedImages(project / "data" / "prepared", "train")), len(store),
                     8, seed=0)
    keys = [(3, 1), (4, 0)]
    loader = DataLoader(rows, batch_size=None, sampler=keys, num_workers=1, multiprocessing_context="spawn")
    for key, (_, idx, there) in zip(keys, loader):
        _, here_idx, here = rows[key]
        assert torch.equal(idx, here_idx) and all(torch.equal(here[k], there[k]) for k in here)


@pytest.mark.parametrize("workers", [0, 1])
def test_prefetch_measures_how_long_the_loop_waited_for_rows(workers, caplog):
    """Rows that take 50 ms to read: read when asked (0 workers), the loop waits for every batch; read ahead by a
    worker while the loop computes for 150 ms a step, it waits for none but the first. The bench parses the line."""
    import logging
    import time

    from sd_distill.bench.data import WAITED
    from sd_distill.data.feed import KeyedRows, Prefetch

    def slow(idx):
        time.sleep(0.05)
        return {"x": torch.from_numpy(idx)}

    steps = 6
    prefetch = Prefetch(KeyedRows(slow, 100, 4, seed=0), steps, 1, workers, 2, pin=False, name="probe")
    for step in range(steps):
        prefetch.get(step, 0)
        time.sleep(0.15)
    with caplog.at_level(logging.INFO, logger="sd_distill.data.feed"):
        prefetch.finish()
    first, later = (float(v) for v in WAITED.search(caplog.text).groups())
    assert prefetch.batches == steps and (first, later) == (round(prefetch.first_wait, 2), round(prefetch.wait, 2))
    assert first >= 0.05
    if workers:
        assert later < 0.05
    else:
        assert later >= 0.05 * (steps - 1)


HEAP_PROBE = """
import sys
import numpy as np
from sd_distill.stages.encode import steady_heap
if sys.argv[1] == "steady":
    assert steady_heap()
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
before = rss_kb()
for _ in range(3):  # a 4 MB block, freed; with glibc's default the threshold rises to 4 MB on the first free,
    a = np.ones(1 << 19)  # so the next ones come from the heap, whose free top (below the trim threshold) stays
    del a
print(rss_kb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file() or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt and /proc only")
def test_steady_heap_returns_freed_large_blocks_to_the_os():
    """With glibc's dynamic threshold a freed 4 MB block stays in the process (it came from the heap); with
    ``steady_heap`` it was a mapping of its own and is gone."""
    held = {mode: int(subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("default", "steady")}
    assert held["default"] >= 3000, held  # the 4 MB block (4096 kB) is still resident
    assert held["steady"] < 1000, held  # each block was a mapping of its own, unmapped when freed
