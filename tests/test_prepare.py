import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd_distill.data import shards
from sd_distill.data.checks import REASONS
from sd_distill.data.shards import (SPLITS, Sample, ShardWriter, iter_shard, read_manifest, read_split, sample_members,
                                  sha256_file)
from sd_distill.data.sources import read_source
from sd_distill.params import PrepareParams
from sd_distill.stages import prepare as stage
from sd_distill.stages.prepare import TooManyRejects, prepare, split_of, write
from tests.conftest import BIN, ROOT, write_params


def png(color, size=(40, 30), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


# every kind of bad sample the issue names, one file (or caption) each: key -> expected reject reason
PLANTED = {
    "corrupt": "unreadable", "truncated": "unreadable", "truncated_jpeg": "unreadable",
    "zero_bytes": "empty_file", "not_an_image": "not_image",
    "gray": "not_rgb", "rgba": "not_rgb", "palette": "not_rgb", "cmyk": "not_rgb", "tiny": "too_small",
    "blank_caption": "empty_caption", "null_caption": "empty_caption",
    "number_caption": "caption_not_text", "list_caption": "caption_not_text",
    "dupe": "duplicate", "missing": "missing",
}


def plant_bad(root) -> list[dict]:
    """One file or caption of each kind in ``PLANTED``; returns their metadata rows."""
    full, jpeg = png((1, 2, 3)), png((1, 2, 3), fmt="JPEG")
    files = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "truncated.png": full[: len(full) // 2],
        "truncated_jpeg.jpg": jpeg[: len(jpeg) // 2], "zero_bytes.png": b"",
        "not_an_image.png": b"<html><body>404 Not Found</body></html>\n",
        "gray.png": png(128, mode="L"), "rgba.png": png((1, 2, 3, 4), mode="RGBA"), "palette.png": png(3, mode="P"),
        "cmyk.jpg": png((1, 2, 3, 4), mode="CMYK", fmt="JPEG"), "tiny.png": png((5, 5, 5), size=(4, 4)),
        "blank_caption.png": png((9, 9, 9)), "null_caption.png": png((9, 9, 10)),
        "number_caption.png": png((9, 9, 11)), "list_caption.png": png((9, 9, 12)),
        "dupe.png": (root / "good3.png").read_bytes(),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    captions = {"blank_caption.png": " \t\x00 ", "null_caption.png": None, "number_caption.png": 42,
                "list_caption.png": ["a", "b"]}
    rows = [{"file_name": name, "text": captions.get(name, "x")} for name in files]
    return rows + [{"file_name": "missing.png", "text": "x"}]


def make_folder(root, bad=True, good=20):
    """``good`` good images (distinct colours) plus, with ``bad``, one of each kind of defect (``PLANTED``)."""
    rows = []
    for i in range(good):
        (root / f"good{i}.png").write_bytes(png((i % 256, 255 - i // 256 * 12, 7)))
        rows.append({"file_name": f"good{i}.png", "text": f"  a  colour\tswatch {i} "})
    if bad:
        rows += plant_bad(root)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def tree_digest(root) -> dict:
    return {p.name: sha256_file(p) for p in sorted(root.iterdir())}


def shard_keys(out, split=None) -> list[str]:
    """The sample keys in the shards (of ``split``, or all), in the order they were written."""
    keys = []
    for row in read_manifest(out)["shards"]:
        if split in (None, row["split"]):
            with tarfile.open(out / row["file"]) as tar:
                keys += [m.name.rpartition(".")[0] for m in tar if m.name.endswith(".png")]
    return keys


def rejects_of(out) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def folder_params(path, **kw):
    return PrepareParams(**{"source": "folder", "path": str(path), "resolution": 16, "min_size": 8,
                            "max_reject_rate": 0.5, **kw})


def run(p, tmp_path, name="out", seed=0):
    """prepare then write, as the stage's entry does; returns (prepared, manifest, output folder)."""
    prepared = prepare(p, seed, tmp_path / f"{name}-work")
    out = tmp_path / name
    return prepared, write(prepared, out, p), out


@pytest.fixture
def src(tmp_path):
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


def test_every_kind_of_bad_sample_is_skipped_counted_and_listed(src, tmp_path):
    make_folder(src)
    prepared, manifest, out = run(folder_params(src), tmp_path)
    listed = rejects_of(out)
    assert {k: r["reason"] for k, r in listed.items()} == PLANTED
    # every reason has a planted sample or a test of its own below
    assert set(PLANTED.values()) | {"low_score", "duplicate_key", "not_downloaded"} == set(REASONS)
    assert prepared.seen == manifest["seen"] == 20 + len(PLANTED) and sum(prepared.samples.values()) == 20
    detail = {k: r["detail"] for k, r in listed.items()}
    assert "good3" in detail["dupe"] and "mode CMYK" in detail["cmyk"] and "int 42" in detail["number_caption"]
    assert manifest["rejects"] == {"unreadable": 3, "empty_file": 1, "not_image": 1, "not_rgb": 4, "too_small": 1,
                                   "empty_caption": 2, "caption_not_text": 2, "duplicate": 1, "missing": 1}
    train = read_split(out, "train")
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    assert all(c.startswith("a colour swatch ") for c in train.captions)  # whitespace cleaned, text kept
    assert not list((tmp_path / "out-work").iterdir())  # shards moved out, state cleared


def test_five_percent_planted_bad_files_are_all_counted_and_none_kept(src, tmp_path):
    """The issue's battery: 16 bad among 304 good (5.0%, at the default max_reject_rate): every planted one is
    counted by kind and listed, none reaches the shards, every good one does, and the input is left as it was."""
    make_folder(src, good=304)
    before = tree_digest(src)
    p = PrepareParams(source="folder", path=str(src), resolution=16, min_size=8)
    assert p.max_reject_rate == 0.05
    prepared, manifest, out = run(p, tmp_path)
    assert prepared.seen == 320 and prepared.reject_rate == 0.05
    assert {k: r["reason"] for k, r in rejects_of(out).items()} == PLANTED
    assert sum(manifest["rejects"].values()) == len(PLANTED)
    assert sorted(shard_keys(out)) == sorted(f"good{i}" for i in range(304))
    assert tree_digest(src) == before


def test_reject_rate_above_threshold_stops_with_counts_and_a_higher_threshold_reuses_the_pass(src, tmp_path,
                                                                                               monkeypatch):
    make_folder(src, good=304)
    with open(src / "metadata.jsonl", "a") as f:  # one more bad sample: 17 of 321 (5.3%) is above 5%
        f.write(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    p = PrepareParams(source="folder", path=str(src), resolution=16, min_size=8)
    with pytest.raises(TooManyRejects) as err:
        prepare(p, 0, tmp_path / "work")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("prepare: 17 of 321 samples rejected (5.3%), above prepare.max_reject_rate=5.0%")
    for reason, n in {"unreadable": 3, "not_rgb": 4, "missing": 2, "duplicate": 1, "caption_not_text": 2}.items():
        assert f"{reason} {n} (e.g. " in message
    assert "nothing was published" in message and not (tmp_path / "out").exists()

    # the threshold changes no byte: a rerun above it finishes from the shards already written, without reading
    def no_reading(*args):
        raise AssertionError("the source was read again")

    higher = p.model_copy(update={"max_reject_rate": 0.06})
    with monkeypatch.context() as m:
        m.setattr(stage, "read_source", no_reading)
        prepared = prepare(higher, 0, tmp_path / "work")
    assert prepared.seen == 321 and sum(prepared.samples.values()) == 304
    again = run(higher, tmp_path, "fresh")[1]
    assert write(prepared, tmp_path / "out", higher)["shards"] == again["shards"]


def test_a_certain_failure_of_the_gate_stops_early(src, tmp_path, monkeypatch):
    """Bad samples first: once the rejects exceed the rate of the known total, reading stops."""
    rows = [{"file_name": f"gone{i}.png", "text": "x"} for i in range(8)]
    for i in range(40):
        (src / f"good{i}.png").write_bytes(png((i, 0, 0)))
        rows.append({"file_name": f"good{i}.png", "text": "red"})
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(stage, "EARLY_STOP_MIN", 10)
    with pytest.raises(TooManyRejects) as err:
        prepare(folder_params(src, max_reject_rate=0.1), 0, tmp_path / "work")
    assert str(err.value).startswith("prepare: 8 of the first 10 of 48 samples rejected, more than 10.0% of all 48 "
                                     "already, above prepare.max_reject_rate=10.0%; by reason: missing 8 (e.g. gone0")


def test_split_depends_only_on_key_and_seed(src, tmp_path):
    make_folder(src, bad=False)
    p = folder_params(src)
    a, b = run(p, tmp_path, "a")[2], run(p, tmp_path, "b")[2]
    c = run(p, tmp_path, "c", seed=1)[2]
    keys = lambda out: {s: shard_keys(out, s) for s in SPLITS}
    assert keys(a) == keys(b) and keys(a) != keys(c)
    assert tree_digest(a) == tree_digest(b)
    all_keys = sum(keys(a).values(), [])
    assert len(all_keys) == len(set(all_keys)) == 20
    assert {s: len(k) for s, k in keys(a).items()} == {"train": 12, "val": 2, "test": 6}  # pinned
    assert "good2" in keys(a)["test"] and "good14" in keys(a)["val"] and "good0" in keys(a)["train"]

    rows = (src / "metadata.jsonl").read_text().splitlines()  # half the samples, in reverse order
    (src / "metadata.jsonl").write_text("\n".join(rows[::-2]) + "\n")
    half = keys(run(p, tmp_path, "half")[2])
    assert all(k in keys(a)[s] for s in SPLITS for k in half[s])

    counts = {s: 0 for s in SPLITS}
    for i in range(20_000):
        counts[split_of(f"k{i}", 0, p)] += 1
    assert abs(counts["test"] / 20_000 - p.test_fraction) < 0.01 and abs(counts["val"] / 20_000 - p.val_fraction) < 0.01


def test_a_repeated_key_is_a_reject_not_an_overwrite(src, tmp_path):
    make_folder(src, bad=False)
    (src / "more").mkdir()
    (src / "more" / "good1.png").write_bytes(png((200, 1, 1)))
    with open(src / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "more/good1.png", "text": "another"}) + "\n")
    _, manifest, out = run(folder_params(src), tmp_path)
    assert manifest["rejects"] == {"duplicate_key": 1}
    assert "'good1' already used" in rejects_of(out)["good1"]["detail"]
    assert sorted(shard_keys(out)) == sorted(f"good{i}" for i in range(20))
    assert "another" not in sum((read_split(out, s).captions for s in ("train", "test")), [])


def test_output_bytes_are_the_same_whatever_the_number_of_workers(src, tmp_path):
    make_folder(src, good=60)
    one = run(folder_params(src, shard_size=7), tmp_path, "one")[2]
    three = run(folder_params(src, shard_size=7, workers=3), tmp_path, "three")[2]
    assert tree_digest(one) == tree_digest(three) and len(list(one.glob("*.tar"))) > 3


def test_manifest_hash_catches_a_changed_shard(src, tmp_path):
    make_folder(src, bad=False)
    _, manifest, out = run(folder_params(src), tmp_path)
    for row in manifest["shards"]:
        assert sha256_file(out / row["file"]) == row["sha256"]
    shard = out / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(ValueError, match="sha256 differs"):
        read_split(out, manifest["shards"][0]["split"])


def test_digits_source_captions_and_labels_agree(tmp_path):
    _, manifest, out = run(PrepareParams(max_images=200), tmp_path)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    train = read_split(out, "train")
    for caption, label in zip(train.captions, train.labels):
        assert words[label] in caption.split(" ") or words[label] + "," in caption
    assert train.images.shape[1:] == (16, 16, 3)
    assert manifest["samples"] == {"train": 132, "val": 29, "test": 39}  # pinned: the key-based split
    assert shard_keys(out, "test")[:3] == ["digits-00000", "digits-00003", "digits-00010"]


def test_parquet_source_with_score_filter(tmp_path):
    images = [png((i * 20, 0, 0)) for i in range(10)]
    table = pa.table({"image": [{"bytes": b, "path": None} for b in images],
                      "text": [f"red {i}" for i in range(10)], "hps": [float(i) for i in range(10)]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    p = PrepareParams(source="parquet", path=str(tmp_path), score_column="hps", min_score=4.0, max_reject_rate=0.0)
    prepared, _, out = run(p, tmp_path)
    assert sum(prepared.samples.values()) == 6
    assert prepared.rejects == {"low_score": 4}  # filtered, not counted against the rate
    assert sorted(shard_keys(out)) == [f"part-0-{i:07d}" for i in range(4, 10)]


def test_webdataset_source(tmp_path):
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "shard-000.tar", "w") as tar:
        for i in range(6):
            for ext, data in (("jpg", png((0, i * 30, 0))), ("txt", f"green {i}".encode())):
                info = tarfile.TarInfo(f"sample{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    _, _, out = run(PrepareParams(source="webdataset", path=str(tmp_path / "in"), max_reject_rate=0.0), tmp_path)
    captions = sorted(c for s in SPLITS if shard_keys(out, s) for c in read_split(out, s).captions)
    assert captions == [f"green {i}" for i in range(6)]


def add(tar, name, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def img2dataset_webdataset(folder, shards=2, per=5, score=True) -> None:
    """img2dataset's webdataset output: ``NNNNN.tar`` of ``KEY.jpg``/``KEY.txt``/``KEY.json``, with a parquet and
    a ``_stats.json`` per shard beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per):
                key = f"{s:05d}{i:04d}"
                meta = {"url": f"http://x/{key}.jpg", "key": key, "status": "success", "hps": float(i)}
                add(tar, f"{key}.jpg", png((s * 50, i * 40, 9), fmt="JPEG"))
                add(tar, f"{key}.txt", f"photo {s} {i}".encode())
                add(tar, f"{key}.json", json.dumps(meta).encode())
        pq.write_table(pa.table({"key": [f"{s:05d}{i:04d}" for i in range(per)]}), folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"successes": per}))


def test_img2dataset_webdataset_output_reads_as_is(tmp_path):
    img2dataset_webdataset(tmp_path / "wds")
    p = PrepareParams(source="webdataset", path=str(tmp_path / "wds"), score_column="hps", min_score=1.0,
                      max_reject_rate=0.0)
    prepared, manifest, out = run(p, tmp_path)
    assert prepared.seen == 10 and manifest["rejects"] == {"low_score": 2}
    assert sorted(shard_keys(out)) == sorted(f"{s:05d}-{s:05d}{i:04d}" for s in range(2) for i in range(1, 5))


def test_img2dataset_parquet_output_reads_as_is(tmp_path):
    """Its parquet output: ``key``, the image bytes in ``jpg``, ``txt``, and rows of failed downloads (``status``,
    no image) that are listed but not counted as rejects."""
    ok = [png((i * 30, 5, 5), fmt="JPEG") for i in range(6)]
    table = pa.table({"key": [f"{i:09d}" for i in range(8)], "jpg": ok + [None, None],
                      "txt": [f"cat {i}" for i in range(8)], "url": [f"http://x/{i}" for i in range(8)],
                      "status": ["success"] * 6 + ["failed_to_download"] * 2,
                      "error_message": [None] * 6 + ["404", "timeout"]})
    pq.write_table(table, tmp_path / "00000.parquet", row_group_size=3)
    p = PrepareParams(source="parquet", path=str(tmp_path / "00000.parquet"), image_column="jpg",
                      caption_column="txt", max_reject_rate=0.0)
    prepared, manifest, out = run(p, tmp_path)
    assert manifest["rejects"] == {"not_downloaded": 2} and prepared.reject_rate == 0.0
    assert sorted(shard_keys(out)) == [f"00000-{i:09d}" for i in range(6)]
    assert rejects_of(out)["00000-000000006"]["detail"] == "status 'failed_to_download', expected 'success'"


def test_every_source_resumes_reading_where_it_stopped(tmp_path):
    """The records after ``start`` (consumed counts per source file) are exactly those an unbroken read gives."""
    img2dataset_webdataset(tmp_path / "wds", shards=3, per=4)
    table = pa.table({"image": [png((i, 0, 0)) for i in range(11)], "text": [str(i) for i in range(11)]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 4), tmp_path / "pq" / "a.parquet", row_group_size=2)
    pq.write_table(table.slice(4), tmp_path / "pq" / "b.parquet", row_group_size=3)
    (tmp_path / "folder").mkdir()
    make_folder(tmp_path / "folder", bad=False, good=9)
    sources = [PrepareParams(source="webdataset", path=str(tmp_path / "wds")),
               PrepareParams(source="parquet", path=str(tmp_path / "pq")),
               folder_params(tmp_path / "folder"), PrepareParams(max_images=30)]
    for p in sources:
        whole = [(r.key, r.source) for r in read_source(p, 0)]
        for cut in (0, 1, 5, len(whole) - 1, len(whole)):
            start = []
            for _, source in whole[:cut]:
                if start and start[-1][0] == source:
                    start[-1][1] += 1
                else:
                    start.append([source, 1])
            rest = [(r.key, r.source) for r in read_source(p, 0, [tuple(s) for s in start])]
            assert rest == whole[cut:], (p.source, cut)


def test_parquet_rows_with_a_non_bytes_image_or_caption_are_skipped(tmp_path):
    good = [{"bytes": png((i * 20, 0, 0)), "path": None} for i in range(6)]
    table = pa.table({"image": [*good, {"bytes": None, "path": "elsewhere.jpg"}, {"bytes": b"", "path": None}],
                      "text": [f"red {i}" for i in range(6)] + ["x", "y"]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    prepared, _, out = run(PrepareParams(source="parquet", path=str(tmp_path), max_reject_rate=0.5), tmp_path)
    assert sorted(r["reason"] for r in rejects_of(out).values()) == ["empty_file", "missing"]
    assert sum(prepared.samples.values()) == 6


def test_bad_captions_file_names_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: expected keys file_name and text"):
        prepare(folder_params(tmp_path), 0, tmp_path / "work")


def test_credentials_in_storage_options_are_refused():
    with pytest.raises(ValueError, match="storage_options.client_kwargs.aws_secret_access_key: credentials do not"):
        PrepareParams(source="webdataset", path="s3://b/x",
                      storage_options={"client_kwargs": {"aws_secret_access_key": "canary"}})
    assert PrepareParams(source="webdataset", path="gs://b/x", storage_options={"token": "anon"})


# -- a killed prepare resumes --------------------------------------------------------------------------------

def start(project, env):
    return subprocess.Popen([BIN / "sd-distill", "run", "prepare", "--params", project / "params.yaml"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_after_a_shard_then_a_rerun_publishes_the_uninterrupted_bytes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_folder(raw, good=1500)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    section = {"source": "folder", "path": str(raw), "resolution": 16, "min_size": 8, "max_reject_rate": 0.05,
               "max_images": None, "shard_size": 25}
    projects = {}
    for name in ("whole", "killed"):
        projects[name] = tmp_path / name
        projects[name].mkdir()
        write_params(projects[name], prepare=section)
    whole = start(projects["whole"], env)
    assert whole.wait(timeout=300) == 0, whole.communicate()[1][-3000:]

    killed = start(projects["killed"], env)
    second_shard = projects["killed"] / "checkpoints" / "prepare" / "train-00001.tar"  # train-00000 checkpointed
    deadline = time.time() + 120
    while not second_shard.exists():
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (projects["killed"] / "data" / "prepared").exists()

    again = start(projects["killed"], env)
    err = again.communicate(timeout=300)[1]
    assert again.returncode == 0, err[-3000:]
    resumed = [line for line in err.splitlines() if "prepare: resuming after" in line]
    assert resumed and " 0 records" not in resumed[0]
    finals = {name: root / "data" / "prepared" for name, root in projects.items()}
    assert read_manifest(finals["killed"]) == read_manifest(finals["whole"])
    assert tree_digest(finals["killed"]) == tree_digest(finals["whole"])
    assert not (projects["killed"] / "checkpoints" / "prepare" / "state.sqlite").exists()


# -- memory does not grow with the data set ------------------------------------------------------------------

# The peak is the process's own high-water mark (VmHWM): Linux carries ru_maxrss over execve, so in a child of the
# pytest process it starts at pytest's size and would hide any growth below that.
RSS_PROBE = """
import json, resource, sys
from pathlib import Path
from sd_distill.params import PrepareParams
from sd_distill.stages.prepare import prepare, write

def peak_kb():
    status = Path("/proc/self/status")
    if status.is_file():
        return int(next(l for l in status.read_text().splitlines() if l.startswith("VmHWM:")).split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # macOS: bytes, not inherited

if __name__ == "__main__":
    src, out, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    p = PrepareParams(source="folder", path=str(src), resolution=64, min_size=64, shard_size=100, workers=workers)
    after_imports = peak_kb()
    manifest = write(prepare(p, 0, out / "work"), out / "prepared", p)
    print(json.dumps({"kept": sum(manifest["samples"].values()), "after_imports_kb": after_imports,
                      "peak_rss_kb": peak_kb()}))
"""


def noise_folder(folder, n: int) -> None:
    """``n`` 64 px PNGs of random noise (incompressible: 12 KB each) and their captions."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as index:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
            index.write(json.dumps({"file_name": f"{i:05d}.png", "text": f"noise {i}"}) + "\n")


def test_peak_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    """Peak RSS of a prepare process over 300 and over 3,000 samples of 64 px (36 MB of pixels for the larger): a
    stage that kept the samples would hold ~33 MB more for it; the streaming one stays within a few MB (the keys
    and digests it checks repeats against live in its SQLite state, on disk)."""
    (tmp_path / "probe.py").write_text(RSS_PROBE)
    peaks = {}
    for n in (300, 3000):
        noise_folder(tmp_path / f"src{n}", n)
        out = subprocess.run([sys.executable, tmp_path / "probe.py", tmp_path / f"src{n}", tmp_path / f"out{n}", "1"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr[-3000:]
        record = json.loads(out.stdout.strip().splitlines()[-1])
        assert record["kept"] == n
        peaks[n] = record["peak_rss_kb"] / 1024, record["after_imports_kb"] / 1024
    print(f"peak RSS (after imports): {peaks[300][0]:.1f} MB ({peaks[300][1]:.1f}) at 300 samples, "
          f"{peaks[3000][0]:.1f} MB ({peaks[3000][1]:.1f}) at 3000")
    assert peaks[3000][0] - peaks[300][0] < 6, peaks


def noise_shard(folder, samples: int, side: int = 64):
    """A shard of ``samples`` incompressible ``side`` px PNGs written by ShardWriter; returns its path."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, "train", shard_size=samples + 1)
    for i in range(samples):
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        writer.add(f"s{i:04d}", sample_members(Sample(f"s{i:04d}", image, f"caption {i}", {"i": i})))
    return folder / writer.close()[0]["file"]


def test_a_shard_is_read_one_sample_at_a_time(tmp_path):
    import tracemalloc

    path = noise_shard(tmp_path, 200)  # 200 x 12 KB of PNG: 2.4 MB
    tracemalloc.start()
    seen = [(s.key, s.caption, s.meta["i"], int(s.image[0, 0, 0])) for s in iter_shard(path)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [k for k, *_ in seen] == [f"s{i:04d}" for i in range(200)]
    assert [(c, i) for _, c, i, _ in seen] == [(f"caption {i}", i) for i in range(200)]
    assert path.stat().st_size > 2_400_000 and peak < 600_000  # a few samples' worth, never the shard's


def test_a_shard_whose_samples_are_interleaved_is_refused(tmp_path):
    path = tmp_path / "train-00000.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.png", "b.png", "a.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match=r"train-00000.tar: the members of sample 'a' are not consecutive"):
        list(shards._iter_tar(path))
