"""An object store that misbehaves: throttled, failing and dropping connections for a while, or
refusing for good.

A loopback S3 server (moto) behind a fault-injecting proxy (flaky_proxy.py, loopback only):
for the first 45 faults, every third request is answered 503 SlowDown, 500 InternalError or a
TCP reset. `tokenmill run` (a subprocess with its own local Ray) reads its sources from the
bucket and writes its run_dir there; pyarrow's standard retry strategy (`storage.S3_MAX_ATTEMPTS`,
exponential backoff) absorbs every fault and the shards equal a clean local run's, byte for
byte. Permanent errors fail fast, before Ray starts, naming the path: 403 AccessDenied on
every request, and a run_dir in a bucket that does not exist. A secret planted in the
environment never reaches the run_dir. About 40 s on 2 cores.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from tests.integration.local_cluster import REPO
from tests.integration.test_faults import corpus, make_config, reference  # noqa: F401 (fixtures)

pytest.importorskip("moto", reason="needs moto[server]")
from tests.integration.flaky_proxy import flaky_proxy  # noqa: E402
from tests.integration.s3_server import s3_server  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
BUCKET = "tokenmill-faults"
FAULTS = 45


@pytest.fixture(scope="module")
def store(corpus):  # noqa: F811
    import boto3
    with s3_server(BUCKET) as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint)
        for f in sorted(corpus.iterdir()):
            client.put_object(Bucket=BUCKET, Key=f"in/{f.name}", Body=f.read_bytes())
        yield endpoint, client


def tokenmill_run(tmp_path, config, endpoint: str, **env) -> tuple[subprocess.CompletedProcess, float]:
    path = tmp_path / "config.yaml"
    import yaml
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    full_env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "RAY_ADDRESS": "", **env}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], cwd=REPO, env=full_env,
                       capture_output=True, text=True, timeout=500)
    return r, time.time() - t0


def s3_config(corpus, run_dir: str, sources: str = f"s3://{BUCKET}/in/*.jsonl*"):  # noqa: F811
    c = make_config(corpus, "unused", ray={"num_cpus": 2}).model_dump(mode="json")
    c["run_dir"] = run_dir
    c["sources"][0]["path"] = sources
    from pipeline.config import parse_config
    return parse_config(c)


def bucket_objects(client, prefix: str) -> dict[str, bytes]:
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                found[o["Key"][len(prefix):]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return found


def test_throttling_500s_and_resets_are_retried_and_the_run_completes(store, corpus, reference, tmp_path):  # noqa: F811
    endpoint, client = store
    planted = "planted-" + secrets.token_hex(12)
    with flaky_proxy(endpoint, faults=FAULTS, every=3) as (proxy, counter):
        r, seconds = tokenmill_run(tmp_path, s3_config(corpus, f"s3://{BUCKET}/runs/flaky"), proxy,
                                   AWS_SECRET_ACCESS_KEY=planted, AWS_SESSION_TOKEN=planted)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum(counter.injected.values()) == FAULTS, counter.injected  # every fault was met and survived
    assert set(counter.injected) == {"503", "500", "reset"}
    written = bucket_objects(client, "runs/flaky/")
    shards = {k: v for k, v in written.items() if k.startswith("shards/") and k.endswith(".arrow")}
    expected = {k: v for k, v in reference["product"].items() if k.startswith("shards/")}
    assert shards == expected  # byte-identical to the clean local run: 0 bytes lost
    assert not [k for k, v in written.items() if planted.encode() in v]
    assert planted not in r.stdout + r.stderr
    print(f"{FAULTS} faults over {counter.requests} requests, run {seconds:.0f}s")


def test_permanent_errors_fail_fast_naming_the_path(store, corpus, tmp_path):  # noqa: F811
    endpoint, _ = store
    with flaky_proxy(endpoint, deny=True) as (proxy, counter):
        r, seconds = tokenmill_run(tmp_path, s3_config(corpus, f"s3://{BUCKET}/runs/denied"), proxy)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"s3://{BUCKET}/in/" in r.stderr and "access denied (HTTP 403)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and counter.requests <= 5 and seconds < 60

    r, seconds = tokenmill_run(tmp_path, s3_config(corpus, "s3://no-such-bucket/runs/r1"), endpoint)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "s3://no-such-bucket/runs/r1" in r.stderr and "the bucket does not exist" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and seconds < 60
