"""What pyarrow 26 does on an S3-compatible store (moto), pinned because the sinks rely on it.

- `FileSystem.from_uri("s3://...")` honours AWS_ENDPOINT_URL, http scheme included
  (`S3FileSystem()` without arguments does not: it goes to AWS).
- An object is invisible until its output stream is closed: a killed writer publishes nothing.
- But closing publishes whatever was written, and `with` closes on an exception too:
  a failed writer leaves a partial object at the key it was writing.
- `move` of a file is a server-side copy then a delete (not atomic, but the destination
  only ever holds a whole object) and overwrites; directories cannot be moved.
"""
from __future__ import annotations

import pyarrow.fs as pafs
import pytest

pytest.importorskip("moto", reason="needs moto[server]")
from tests.integration.s3_server import s3_server  # noqa: E402

pytestmark = pytest.mark.integration
BUCKET = "tokenmill-test"


@pytest.fixture(scope="module")
def endpoint():
    with s3_server(BUCKET) as url:
        yield url


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _list(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.type == pafs.FileType.File)


def test_from_uri_honours_aws_endpoint_url(endpoint):
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/uri/x.txt")
    assert path == f"{BUCKET}/uri/x.txt"
    _write(fs, path, b"via env")
    explicit = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http")
    assert explicit.open_input_stream(path).read() == b"via env"


def test_write_read_list_move(endpoint):
    fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http")
    base = f"{BUCKET}/move"
    _write(fs, f"{base}/.tmp-a", b"shard-a")
    _write(fs, f"{base}/b", b"old")
    assert _list(fs, base) == [f"{base}/.tmp-a", f"{base}/b"]

    fs.move(f"{base}/.tmp-a", f"{base}/a")
    fs.move(f"{base}/a", f"{base}/b")  # overwrites
    assert _list(fs, base) == [f"{base}/b"]
    assert fs.open_input_stream(f"{base}/b").read() == b"shard-a"
    with pytest.raises(OSError):
        fs.move(base, f"{BUCKET}/moved")  # no directory moves on S3


def test_object_appears_only_on_close_even_on_error(endpoint):
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    path = f"{BUCKET}/visibility/x"
    with fs.open_output_stream(path) as f:
        f.write(b"half")
        assert fs.get_file_info(path).type == pafs.FileType.NotFound
    assert fs.get_file_info(path).type == pafs.FileType.File

    failed = f"{BUCKET}/visibility/failed"
    with pytest.raises(RuntimeError):
        with fs.open_output_stream(failed) as f:
            f.write(b"partial")
            raise RuntimeError("writer died")
    assert fs.open_input_stream(failed).read() == b"partial"
