import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd_distill.data.shards import read_manifest, read_split, sha256_file
from sd_distill.params import PrepareParams
from sd_distill.stages.prepare import TooManyRejects, prepare, write


def png(color, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, bad=True):
    """20 good images (distinct colours) plus, with ``bad``, one of each kind of defect."""
    rows = []
    for i in range(20):
        (root / f"good{i}.png").write_bytes(png((i * 12, 255 - i * 12, 7)))
        rows.append({"file_name": f"good{i}.png", "text": f"  a  colour\tswatch {i} "})
    if bad:
        full = png((1, 2, 3))
        (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        (root / "truncated.png").write_bytes(full[: len(full) // 2])
        (root / "empty.png").write_bytes(png((9, 9, 9)))
        (root / "tiny.png").write_bytes(png((5, 5, 5), size=(4, 4)))
        (root / "dupe.png").write_bytes((root / "good3.png").read_bytes())
        (root / "gray.png").write_bytes(png(128, mode="L"))
        rows += [{"file_name": "corrupt.png", "text": "x"}, {"file_name": "truncated.png", "text": "x"},
                 {"file_name": "empty.png", "text": "   "}, {"file_name": "tiny.png", "text": "x"},
                 {"file_name": "dupe.png", "text": "x"}, {"file_name": "gray.png", "text": "x"},
                 {"file_name": "missing.png", "text": "x"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def folder_params(path, **kw):
    return PrepareParams(source="folder", path=str(path), resolution=16, min_size=8, max_reject_rate=0.5, **kw)


def test_every_kind_of_bad_sample_is_skipped_counted_and_listed(tmp_path):
    (tmp_path / "src").mkdir()
    src = make_folder(tmp_path / "src")
    prepared = prepare(folder_params(src), seed=0)
    reasons = {r.key: r.reason for r in prepared.rejects}
    assert reasons == {"corrupt": "unreadable", "truncated": "unreadable", "empty": "empty_caption",
                       "tiny": "too_small", "dupe": "duplicate", "gray": "not_rgb", "missing": "missing"}
    assert prepared.seen == 27 and sum(len(v) for v in prepared.splits.values()) == 20
    out = tmp_path / "out"
    manifest = write(prepared, out, folder_params(src))
    listed = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["key"] for r in listed} == set(reasons)
    assert "good3" in next(r["detail"] for r in listed if r["key"] == "dupe")
    assert manifest["rejects"]["unreadable"] == 2
    train = read_split(out, "train")
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    assert all(c.startswith("a colour swatch ") for c in train.captions)  # whitespace cleaned, text kept


def test_reject_rate_above_threshold_stops_with_counts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src)
    with pytest.raises(TooManyRejects, match=r"7 of 27 samples rejected \(25.9%\).*max_reject_rate=10.0%"):
        prepare(folder_params(src).model_copy(update={"max_reject_rate": 0.1}), seed=0)


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


def test_bad_captions_file_names_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: expected keys file_name and text"):
        prepare(folder_params(tmp_path), seed=0)
