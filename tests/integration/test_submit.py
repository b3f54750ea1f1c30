"""`pipeline.submit` against a real Ray head with token auth, started by infra/start-local-cluster.sh.

The job's project is a temporary directory whose `jobs/run.py` is a tiny script that
prints its config and arguments, so this tests the submission path (upload, config
outside the project, --set, log streaming, exit codes, 401/403) without the pipeline.
About 30 s on 2 cores: head start 7 s, two jobs 7 s each, stop 6 s.
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.submit import SubmitError, add_submit_arguments, submit_job
from tests.integration.local_cluster import local_cluster

pytestmark = pytest.mark.integration

TOKEN = secrets.token_hex(16)
FAKE_RUN = '''\
import pathlib, sys
print("CONFIG:", pathlib.Path(sys.argv[1]).read_text().strip())
print("ARGS:", sys.argv[2:])
sys.exit(3 if "fail=1" in sys.argv else 0)
'''


@pytest.fixture(scope="module")
def head_url():
    """Dashboard URL of a token-authenticated head (no worker node) on free ports."""
    with local_cluster(TOKEN, workers=0, timeout=120) as (state, _):
        yield state["DASHBOARD_URL"]


@pytest.fixture
def project(tmp_path):
    (tmp_path / "project" / "jobs").mkdir(parents=True)
    (tmp_path / "project" / "jobs" / "run.py").write_text(FAKE_RUN)
    return tmp_path / "project"


@pytest.fixture
def outside_config(tmp_path):
    """A config that lives outside the uploaded project."""
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "elsewhere" / "demo.yaml"
    path.write_text("name: submitted-from-outside\n")
    return path


@pytest.fixture
def with_token(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)


def test_succeeded_job_streams_logs_and_returns_0(head_url, project, outside_config, with_token, capsys):
    code = submit_job(address=head_url, config_path=str(outside_config),
                      overrides=["run_dir=s3://bucket/runs/demo"], project_root=project)
    out = capsys.readouterr().out
    assert code == 0, out
    # Printed by the job itself, so it reached us through the log stream.
    assert "CONFIG: name: submitted-from-outside" in out
    assert "ARGS: ['--set', 'run_dir=s3://bucket/runs/demo']" in out
    assert "SUCCEEDED" in out


def test_failed_job_returns_1(head_url, project, outside_config, with_token, capsys):
    parser = add_submit_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(outside_config), "--address", head_url, "--set", "fail=1"])
    code = submit_job(address=args.address, config_path=args.config, overrides=args.overrides,
                      wait=args.wait, project_root=project)
    out = capsys.readouterr().out
    assert code == 1, out
    assert "ARGS: ['--set', 'fail=1']" in out
    assert out.rstrip().endswith("FAILED: Job entrypoint command failed with exit code 3")


def test_missing_token_is_a_clear_401(head_url, project, outside_config, tmp_path):
    # A fresh process, as a user would run it: inside this test process an earlier ray.init()
    # leaves Ray's own token loader holding a token, which would turn the 401 into a 403.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(outside_config), "--address", head_url],
                       cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(r"requires a token \(HTTP 401\): set RAY_AUTH_TOKEN", r.stderr), r.stderr[-2000:]


def test_wrong_token_is_a_clear_403(head_url, project, outside_config, with_token, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(SubmitError, match=r"rejected the token \(HTTP 403\)"):
        submit_job(address=head_url, config_path=str(outside_config), overrides=[], project_root=project)
