"""A throwaway S3-compatible server (moto) on 127.0.0.1 for tests that need object storage.

`s3_server()` starts `python -m moto.server` as a child process on a free loopback
port, creates a bucket, and sets AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_REGION in `os.environ` for its duration, so Ray workers
and other child processes started inside the `with` block see the same store.
pyarrow 26 honours AWS_ENDPOINT_URL (scheme included) in `FileSystem.from_uri("s3://...")`
and in `S3FileSystem()`, so `s3://bucket/...` paths work unchanged.

A child process rather than moto's in-process `ThreadedMotoServer`: pyarrow calls
that block while holding the GIL (an output stream's destructor, for one) stall a
server thread in the same process; seen here as a 30 s UploadPart timeout.

Needs `moto[server]` (a test dependency, not a runtime one).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(endpoint: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto server at {endpoint} did not answer within {timeout_s} s")


@contextlib.contextmanager
def s3_server(bucket: str = "tokenmill-test", timeout_s: float = 30.0) -> Iterator[str]:
    """Run an S3 server with `bucket` created; yield its endpoint URL (http://127.0.0.1:PORT).

    The AWS_* variables are set in `os.environ` inside the block and restored after.
    """
    import boto3  # comes with moto[server]

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # one access-log line per request otherwise
    )
    env = {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    saved = {key: os.environ.get(key) for key in env}
    try:
        _wait_until_up(endpoint, proc, timeout_s)
        os.environ.update(env)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
