"""The second node of a two-node local cluster killed mid-stage: the run finishes on the head.

A head and a worker node (infra/start-local-cluster.sh, one CPU each, token auth, loopback).
The driver (`python -m tests.integration.fault_stages`) runs the staged config with a tokenize
stage whose every item pauses 1.5 s after writing its shard, so the stage is long enough to
lose a node in. As soon as an item runs on the worker node, its raylet and every process under
it are SIGKILLed (the node is gone, as when a machine dies). Ray notices the node's death and
re-runs the lost tasks on the head (`max_retries`); the shards equal a clean run's, byte for
byte. Were the retries exhausted, the run would fail with Ray's error and a resume would
finish it: that branch is exercised too, when it happens. About 60-90 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.local_cluster import REPO, local_cluster
from tests.integration.test_faults import (assert_counts_balance, bytes_lost, corpus,  # noqa: F401 (fixtures)
                                           make_config, reference)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
TOKEN = secrets.token_hex(16)


def _worker_raylet(state_dir: str) -> psutil.Process:
    raylets = [p for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "raylet" and state_dir in " ".join(p.info["cmdline"] or [])]
    assert len(raylets) == 2, "expected a head and a worker raylet"
    workers = [p for p in raylets if "worker_node" in " ".join(p.info["cmdline"])]
    assert len(workers) == 1, [p.info["cmdline"] for p in raylets]
    return workers[0]


def _driver(config_path, address: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "tests.integration.fault_stages", str(config_path),
                             "--address", address], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_the_second_node_killed_mid_stage_the_run_finishes(corpus, reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "plan.json").write_text(json.dumps({"tokenize": {"pause_s": 1.5}}))
    config_path = tmp_path / "config.json"  # JSON is YAML
    config_path.write_text(json.dumps(make_config(corpus, run_dir).model_dump(mode="json")))

    with local_cluster(TOKEN, workers=1) as (state, state_dir):
        raylet = _worker_raylet(state_dir)
        node = [raylet, *raylet.children(recursive=True)]
        driver = _driver(config_path, state["GCS_ADDRESS"])
        killed_at, deadline = None, time.time() + 300
        while killed_at is None and driver.poll() is None and time.time() < deadline:
            pids = {int(p.read_text()) for p in faults.glob("started-tokenize-*")}
            on_worker = pids & {p.pid for p in raylet.children(recursive=True)}
            if on_worker:
                for proc in [raylet, *raylet.children(recursive=True)] + node:
                    try:
                        proc.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
                killed_at = time.time()
            time.sleep(0.05)
        assert killed_at is not None, "no tokenize item ran on the worker node"
        out, _ = driver.communicate(timeout=400)
        if driver.returncode != 0:  # a clear error, then a resume on what is left finishes it
            assert "Error" in out, out[-3000:]
            resumed = _driver(config_path, state["GCS_ADDRESS"])
            out, _ = resumed.communicate(timeout=400)
            assert resumed.returncode == 0, out[-3000:]
        assert not raylet.is_running()
    done = json.loads((run_dir / "tokenize" / "_SUCCESS.json").read_text())
    assert done["rows_out"] == done["rows_in"] > 0
    assert bytes_lost(run_dir, reference["product"]) == 0
    assert_counts_balance(run_dir, reference["rows"])
