"""Start and stop a token-authenticated local Ray cluster with infra/start-local-cluster.sh.

Shared by the submission and object-storage tests: its own state directory and free
ports, so it runs beside any other Ray on the machine, and always stopped.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def local_cluster(token: str, *, workers: int = 0, drop_env: tuple[str, ...] = ("RAY_",),
                  timeout: int = 180) -> Iterator[tuple[dict, str]]:
    """(cluster.env as a dict, its state directory); variables starting with `drop_env` are withheld."""
    state_dir = tempfile.mkdtemp(prefix="tm-ray-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_env)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    ray_bin = Path(sys.executable).with_name("ray")  # the ray of the environment under test
    if ray_bin.exists():
        env["RAY_BIN"] = str(ray_bin)
    try:
        for attempt in range(2):
            started = subprocess.run(["bash", REPO / "infra/start-local-cluster.sh", "--dir", state_dir,
                                      "--workers", str(workers)], env=env, capture_output=True, text=True,
                                     timeout=timeout)
            # On a loaded 2-core CI machine Ray's own start-up wait can run out; the script has
            # stopped what it started, so one more try is a fresh start, not a test retry.
            if started.returncode == 0 or "timed out during startup" not in started.stderr:
                break
        assert started.returncode == 0, f"start-local-cluster.sh failed:\n{started.stdout}\n{started.stderr}"
        yield dict(line.split("=", 1) for line in Path(state_dir, "cluster.env").read_text().splitlines()), state_dir
    finally:
        subprocess.run(["bash", REPO / "infra/stop-local-cluster.sh", "--dir", state_dir, "--clean"],
                       env=env, capture_output=True, timeout=60)
