"""`pipeline.storage` without a server: which filesystem a URI resolves to."""
from __future__ import annotations

import pyarrow.fs as pafs

from pipeline import storage


def _endpoint(fs: pafs.S3FileSystem) -> str:
    return fs.__reduce__()[1][0]["endpoint_override"]  # pyarrow exposes it only for pickling


def test_s3_filesystem_follows_the_endpoint_in_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9001")
    fs_a, path = storage.resolve("s3://bucket/runs/r1/")
    assert path == "bucket/runs/r1" and isinstance(fs_a, pafs.S3FileSystem)
    assert storage.resolve("s3://bucket/other")[0] is fs_a  # cached per bucket and endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9002")  # a new server, same bucket name
    fs_b, _ = storage.resolve("s3://bucket/runs/r1")
    assert not fs_b.equals(fs_a)
    assert _endpoint(fs_a) == "127.0.0.1:9001" and _endpoint(fs_b) == "127.0.0.1:9002"
    assert isinstance(storage.resolve("runs/r1")[0], pafs.LocalFileSystem)
