"""The one file and folder hasher: digests pinned on a small tree, as the three implementations it replaced
(``runner.tree_hash``, ``register._file_hashes``, ``common.fingerprint``'s inline loop) gave them. These digests are
persisted (done records, checkpoint markers, registration keys, KFP cache keys): they must not change."""

from pathlib import Path
from types import SimpleNamespace

from sd_distill.hashing import file_hashes, sha256_file, tree_hash
from sd_distill.names import PARAMS_RECORD
from sd_distill.orchestrators import common

EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of no bytes
ALPHA = "b6a98d9ce9a2d9149288fa3df42d377c3e42737afdcdaf714e33c0a100b51060"  # sha256 of b"alpha\n"
BIG = "7d471e4af16db5a30ce10aebbc29f5178b2edbad6c7dc2e8ff8ee6e4848a726f"
FILES = [  # path order, the params records left out
    ("a.txt", ALPHA),
    ("empty", EMPTY),
    ("sp ace.txt", "d1a56fde9e6f2548350d4a07601eecbb6d2fc92024f974757ace74c2e5268a12"),
    ("sub/b.bin", BIG),
    ("sub/deeper/c.json", "613fe5aa65343dbb1b9abe6abac6773f5c91bd60d3f2ffb7e2eae69e1db8b227"),
]
RECORDS = {PARAMS_RECORD: "92954c6fd35664173a376b28b5f64cddc59c25c767d8617c6aeaf70b6f30b8cc",
           f"sub/{PARAMS_RECORD}": "8dd17f102a7032ae3cf331ae4d2f72790903ca17949c45fc541cc5c3e4073efc"}


def sample_tree(folder: Path) -> Path:
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"alpha\n")
    (folder / "sp ace.txt").write_bytes("\u00fcber\n".encode())
    (folder / "empty").write_bytes(b"")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 5000)  # over the 1 MiB read chunk
    (folder / "sub" / "deeper" / "c.json").write_text('{"x": 1}')
    (folder / PARAMS_RECORD).write_text('{"base": {}}')
    (folder / "sub" / PARAMS_RECORD).write_text('{"nested": true}')
    return folder


def test_file_digests_are_plain_sha256_read_in_chunks(tmp_path):
    tree = sample_tree(tmp_path / "m")
    assert sha256_file(tree / "empty") == EMPTY
    assert sha256_file(tree / "a.txt") == ALPHA
    assert sha256_file(tree / "sub" / "b.bin") == BIG


def test_file_hashes_list_every_file_in_path_order_and_leave_out_what_they_are_told(tmp_path):
    tree = sample_tree(tmp_path / "m")
    assert file_hashes(tree, {PARAMS_RECORD}) == FILES
    assert dict(file_hashes(tree)) == {**dict(FILES), **RECORDS}  # the checkpoint marker's form: nothing left out


def test_tree_hash_is_pinned_and_ignores_the_runners_params_record(tmp_path):
    tree = sample_tree(tmp_path / "m")
    assert tree_hash(tree) == "56e444cdb3fe5454f9e58144e29cb6323b32d54afa2331815c898320f0b0ed5e"
    assert tree_hash(tree / "a.txt") == ALPHA
    (tree / "sub" / PARAMS_RECORD).write_text('{"base": {"device": "cuda"}}')
    assert tree_hash(tree) == "56e444cdb3fe5454f9e58144e29cb6323b32d54afa2331815c898320f0b0ed5e"
    (tree / "empty").write_bytes(b"\0")
    assert tree_hash(tree) != "56e444cdb3fe5454f9e58144e29cb6323b32d54afa2331815c898320f0b0ed5e"


def test_kubeflow_fingerprint_is_pinned_over_folders_files_and_upstream(tmp_path):
    sample_tree(tmp_path / "models" / "m")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "r.json").write_text("{}")
    stage = SimpleNamespace(produced={"report": "reports/r.json", "model": "models/m"})
    assert common.fingerprint(stage, tmp_path, ["b", "a"]) == (
        "de6312f618c068f9391ce90961a0762c71643844d2da9ffd594e9e1be1ba5c91")
