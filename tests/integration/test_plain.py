"""The fused plain path (read → tokenize → pack per input range) against the staged path."""
import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.inspect_run import reassemble, verify_shards
from pipeline.runner import run
from tests.conftest import shared_rows
from tests.integration.test_run import corpus, make_config  # noqa: F401  (the module's corpus fixture)

pytestmark = pytest.mark.integration


def _quarantine(run_dir):
    return sorted(json.dumps({k: v for k, v in json.loads(line).items()}, sort_keys=True)
                  for f in (run_dir / "quarantine").glob("*.jsonl") for line in f.read_text().splitlines())


def test_fused_path_gives_the_staged_documents_without_intermediate_files(local_ray, corpus, tmp_path, hf_bpe_dir,
                                                                          sp_model):
    d, _ = corpus
    # a large plain .jsonl, cut into byte ranges (with a malformed line in the middle)
    rows = shared_rows("news_agnews_5k.jsonl.zst", 1700)[200:]  # the corpus fixture holds the first 200
    lines = [json.dumps(r) for r in rows]
    lines.insert(700, '{"id": "broken", "text": ')
    (d / "big.jsonl").write_text("\n".join(lines) + "\n")
    fused, staged = tmp_path / "fused", tmp_path / "staged"

    def cfg(run_dir, fused_path, backend="ray"):
        c = make_config(d, run_dir, hf_bpe_dir, sp_model).model_dump()
        c["ray"]["backend"] = backend
        c["sources"].append({"path": str(d / "big.jsonl"), "text_field": "text", "id_field": "id"})
        c.update(fused=fused_path)
        c["read"].update(range_bytes=100_000)
        c["output"].update(shard_rows=40)
        return type(make_config(d, run_dir, hf_bpe_dir, sp_model)).model_validate(c)

    run(cfg(fused, True))
    run(cfg(staged, False))
    assert sorted(p.name for p in fused.iterdir()) == ["config.sha256", "config.yaml", "plain", "quarantine", "report.html", "shards"]
    plain = json.loads((fused / "plain" / "_SUCCESS.json").read_text())
    assert len(plain["items"]) > 10  # big.jsonl was cut into ranges
    for name in ("bpe", "sp", "cl100k"):
        a, b = reassemble(str(fused / "shards" / name)), reassemble(str(staged / "shards" / name))
        assert a.keys() == b.keys() and len(a) == 300 + 200 + 150 + 1 + 1500
        for doc_id in a:
            assert all((x == y).all() for x, y in zip(a[doc_id], b[doc_id])), doc_id
        counts = verify_shards(str(fused / "shards" / name))
        manifest = json.loads((fused / "shards" / name / "manifest.json").read_text())
        assert counts["docs"] == manifest["counts"]["docs"] == len(a)
        # shard size is set by the output: every shard but each item's last holds at least shard_rows rows
        rows_by_item = {}
        for s in manifest["shards"]:
            rows_by_item.setdefault(s["file"].split("-")[1], []).append(s["rows"])
        assert all(n >= 40 for r in rows_by_item.values() for n in r[:-1])
    assert _quarantine(fused) == _quarantine(staged)
    assert any(json.loads(q)["line"] == 701 and "big.jsonl" in json.loads(q)["source"] for q in _quarantine(fused))
    assert plain["rows_in"] == plain["rows_out"] + plain["rows_quarantined"]

    # a re-run of the fused path elsewhere, on the local process pool instead of Ray, is byte-identical
    again = tmp_path / "again"
    run(cfg(again, True, backend="processes"))
    files = sorted(p.relative_to(fused) for p in (fused / "shards").rglob("*.arrow"))
    assert files == sorted(p.relative_to(again) for p in (again / "shards").rglob("*.arrow"))
    assert all((fused / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert _quarantine(again) == _quarantine(fused)
    assert json.loads((again / "plain" / "_SUCCESS.json").read_text())["rows_in"] == plain["rows_in"]
