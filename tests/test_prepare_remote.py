"""``prepare`` reading from object storage: an S3-compatible server on 127.0.0.1 (moto's server mode) holding
webdataset shards, a parquet file and an image folder, read through fsspec/s3fs as a bucket in the cloud would be."""

import json
import logging
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd_distill.cli import main
from sd_distill.data import sources
from sd_distill.params import PrepareParams
from tests.conftest import write_params
from tests.test_prepare import img2dataset_webdataset, make_folder, png, run

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

LOG_RECORD = re.compile(r"^(\d{4}/\d\d/\d\d )?\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


@pytest.fixture(scope="module", autouse=True)
def dummy_credentials():
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    old = {name: os.environ.get(name) for name in names}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def serve():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def upload(url: str, local, bucket: str, prefix: str) -> None:
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(local) + "/", f"{bucket}/{prefix}", recursive=True)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A server holding, in bucket ``data``: ``wds/`` (two img2dataset webdataset shards), ``pq/`` (a parquet file
    of two row groups) and ``folder/`` (images and metadata.jsonl, one file missing); and the local copies."""
    local = tmp_path_factory.mktemp("local")
    img2dataset_webdataset(local / "wds", shards=2, per=6)
    (local / "pq").mkdir()
    pq.write_table(pa.table({"image": [png((i * 20, 3, 3)) for i in range(9)], "text": [f"red {i}" for i in range(9)]}),
                   local / "pq" / "part-0.parquet", row_group_size=5)
    (local / "folder").mkdir()
    make_folder(local / "folder", bad=False, good=12)
    with open(local / "folder" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "not-uploaded.png", "text": "x"}) + "\n")
    server, url = serve()
    for prefix in ("wds", "pq", "folder"):
        upload(url, local / prefix, "data", prefix)
    yield url, local
    server.stop()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("sd-distill run: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("source", ["webdataset", "parquet", "folder"])
def test_shards_read_from_s3_are_those_of_the_local_copy(bucket, tmp_path, source):
    url, local = bucket
    prefix = {"webdataset": "wds", "parquet": "pq", "folder": "folder"}[source]
    common = {"source": source, "resolution": 16, "min_size": 8, "max_reject_rate": 0.1, "shard_size": 4}
    remote = PrepareParams(path=f"s3://data/{prefix}", storage_options={"client_kwargs": {"endpoint_url": url}},
                           **common)
    _, from_s3, out = run(remote, tmp_path, "s3")
    _, from_disk, _ = run(PrepareParams(path=str(local / prefix), **common), tmp_path, "disk")
    assert from_s3["shards"] == from_disk["shards"] and from_s3["seen"] == from_disk["seen"]
    assert sum(from_s3["samples"].values()) == {"webdataset": 12, "parquet": 9, "folder": 12}[source]
    if source == "folder":
        missing = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
        assert missing == [{"key": "not-uploaded", "reason": "missing", "detail": "s3://data/folder/not-uploaded.png"}]


@pytest.mark.parametrize("path, expected", [
    ("s3://data/nothing-here/", "prepare.path: no .tar shard at s3://data/nothing-here/"),
    ("s3://no-such-bucket/wds", "prepare.path: no .tar shard at s3://no-such-bucket/wds"),
])
def test_a_missing_key_is_one_line_and_exit_status_2(bucket, tmp_path, capsys, monkeypatch, path, expected):
    """The endpoint from botocore's standard ``AWS_ENDPOINT_URL`` here (no storage_options)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", bucket[0])
    write_params(tmp_path, prepare={"source": "webdataset", "path": path})
    assert main(["run", "prepare", "--params", str(tmp_path / "params.yaml")]) == 2
    assert one_error_line(capsys).endswith(expected)
    assert not any((tmp_path / "data").glob("*"))  # no data/prepared, no partial


def test_a_server_that_goes_away_mid_read_is_one_line_and_publishes_nothing(tmp_path, capsys, monkeypatch):
    server, url = serve()
    img2dataset_webdataset(tmp_path / "wds", shards=2, per=6)
    upload(url, tmp_path / "wds", "gone", "wds")
    opened = []

    def stop_after_the_first_shard(tar):
        opened.append(tar)
        yield from real(tar)
        if len(opened) == 1:
            server.stop()

    real = sources._groups
    monkeypatch.setattr(sources, "_groups", stop_after_the_first_shard)
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, prepare={"source": "webdataset", "path": "s3://gone/wds", "max_reject_rate": 0.0,
                                   "storage_options": {"client_kwargs": {"endpoint_url": url}, **FAST_FAIL}})
    assert main(["run", "prepare", "--params", str(project / "params.yaml")]) == 2
    line = one_error_line(capsys)
    assert "s3://gone/wds/00001.tar: cannot be read (EndpointConnectionError: Could not connect" in line
    assert len(opened) == 1 and not any((project / "data").glob("*"))
