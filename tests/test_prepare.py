import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd_distill.data.checks import REASONS
from sd_distill.data.shards import read_manifest, read_split, sha256_file
from sd_distill.params import PrepareParams
from sd_distill.stages.prepare import TooManyRejects, prepare, write


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


def shard_keys(out) -> list[str]:
    keys = []
    for row in read_manifest(out)["shards"]:
        with tarfile.open(out / row["file"]) as tar:
            keys += sorted({m.name.rpartition(".")[0] for m in tar})
    return keys


def folder_params(path, **kw):
    return PrepareParams(source="folder", path=str(path), resolution=16, min_size=8, max_reject_rate=0.5, **kw)


def test_every_kind_of_bad_sample_is_skipped_counted_and_listed(tmp_path):
    (tmp_path / "src").mkdir()
    src = make_folder(tmp_path / "src")
    prepared = prepare(folder_params(src), seed=0)
    reasons = {r.key: r.reason for r in prepared.rejects}
    assert reasons == PLANTED
    assert set(PLANTED.values()) | {"low_score"} == set(REASONS)  # every reason has a planted sample (or a test)
    assert prepared.seen == 20 + len(PLANTED) and sum(len(v) for v in prepared.splits.values()) == 20
    out = tmp_path / "out"
    manifest = write(prepared, out, folder_params(src))
    listed = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["key"] for r in listed} == set(reasons)
    detail = {r["key"]: r["detail"] for r in listed}
    assert "good3" in detail["dupe"] and "mode CMYK" in detail["cmyk"] and "int 42" in detail["number_caption"]
    assert manifest["rejects"] == {"unreadable": 3, "empty_file": 1, "not_image": 1, "not_rgb": 4, "too_small": 1,
                                   "empty_caption": 2, "caption_not_text": 2, "duplicate": 1, "missing": 1}
    train = read_split(out, "train")
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    assert all(c.startswith("a colour swatch ") for c in train.captions)  # whitespace cleaned, text kept


def test_five_percent_planted_bad_files_are_all_counted_and_none_kept(tmp_path):
    """The issue's battery: 16 bad among 304 good (5.0%, at the default max_reject_rate): every planted one is
    counted by kind and listed, none reaches the shards, every good one does, and the input is left as it was."""
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src, good=304)
    before = tree_digest(src)
    p = PrepareParams(source="folder", path=str(src), resolution=16, min_size=8)
    assert p.max_reject_rate == 0.05
    prepared = prepare(p, seed=0)
    assert prepared.seen == 320 and prepared.reject_rate == 0.05
    assert {r.key: r.reason for r in prepared.rejects} == PLANTED
    out = tmp_path / "out"
    manifest = write(prepared, out, p)
    assert sum(manifest["rejects"].values()) == len(PLANTED)
    assert sorted(shard_keys(out)) == sorted(f"good{i}" for i in range(304))
    assert tree_digest(src) == before


def test_reject_rate_above_threshold_stops_with_counts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src, good=304)
    with open(src / "metadata.jsonl", "a") as f:  # one more bad sample: 17 of 321 (5.3%) is above 5%
        f.write(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(TooManyRejects) as err:
        prepare(PrepareParams(source="folder", path=str(src), resolution=16, min_size=8), seed=0)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("prepare: 17 of 321 samples rejected (5.3%), above prepare.max_reject_rate=5.0%")
    for reason, n in {"unreadable": 3, "not_rgb": 4, "missing": 2, "duplicate": 1, "caption_not_text": 2}.items():
        assert f"{reason} {n} (e.g. " in message


def test_split_is_deterministic_and_disjoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src, bad=False)
    p = folder_params(src)
    a, b, c = prepare(p, seed=0), prepare(p, seed=0), prepare(p, seed=1)
    keys = lambda prep: {k: [s.key for s in v] for k, v in prep.splits.items()}
    assert keys(a) == keys(b) and keys(a) != keys(c)
    all_keys = sum(keys(a).values(), [])
    assert len(all_keys) == len(set(all_keys)) == 20
    assert len(a.splits["test"]) == 4 and len(a.splits["val"]) == 2


def test_manifest_hash_catches_a_changed_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src, bad=False)
    out = tmp_path / "out"
    write(prepare(folder_params(src), seed=0), out, folder_params(src))
    manifest = read_manifest(out)
    for row in manifest["shards"]:
        assert sha256_file(out / row["file"]) == row["sha256"]
    shard = out / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(ValueError, match="sha256 differs"):
        read_split(out, manifest["shards"][0]["split"])


def test_digits_source_captions_and_labels_agree():
    p = PrepareParams(max_images=200)
    prepared = prepare(p, seed=0)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for s in prepared.splits["train"]:
        assert words[s.meta["label"]] in s.caption.split(" ") or words[s.meta["label"]] + "," in s.caption
        assert s.image.shape == (16, 16, 3)


def test_parquet_source_with_score_filter(tmp_path):
    images = [png((i * 20, 0, 0)) for i in range(10)]
    table = pa.table({"image": [{"bytes": b, "path": None} for b in images],
                      "text": [f"red {i}" for i in range(10)], "hps": [float(i) for i in range(10)]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    p = PrepareParams(source="parquet", path=str(tmp_path), score_column="hps", min_score=4.0, max_reject_rate=0.0)
    prepared = prepare(p, seed=0)
    assert sum(len(v) for v in prepared.splits.values()) == 6
    assert {r.reason for r in prepared.rejects} == {"low_score"}  # filtered, not counted against the rate


def test_webdataset_source(tmp_path):
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i in range(6):
            for ext, data in (("jpg", png((0, i * 30, 0))), ("txt", f"green {i}".encode())):
                info = tarfile.TarInfo(f"sample{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    prepared = prepare(PrepareParams(source="webdataset", path=str(tmp_path), max_reject_rate=0.0), seed=0)
    captions = sorted(s.caption for v in prepared.splits.values() for s in v)
    assert captions == [f"green {i}" for i in range(6)]


def test_parquet_rows_with_a_non_bytes_image_or_caption_are_skipped(tmp_path):
    good = [{"bytes": png((i * 20, 0, 0)), "path": None} for i in range(6)]
    table = pa.table({"image": [*good, {"bytes": None, "path": "elsewhere.jpg"}, {"bytes": b"", "path": None}],
                      "text": [f"red {i}" for i in range(6)] + ["x", "y"]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    prepared = prepare(PrepareParams(source="parquet", path=str(tmp_path), max_reject_rate=0.5), seed=0)
    assert sorted(r.reason for r in prepared.rejects) == ["empty_file", "missing"]
    assert sum(len(v) for v in prepared.splits.values()) == 6


def test_bad_captions_file_names_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: expected keys file_name and text"):
        prepare(folder_params(tmp_path), seed=0)
