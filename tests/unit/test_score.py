"""TokenScorer with tiny models saved to disk and loaded through the real loading path.

Every expected value is computed independently: single unpadded sequences, plain
torch cross-entropy, and transformers' own eager attention (output_attentions).
"""
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from operators import schema, score
from operators.score import TokenScorer, length_batches, score_sequences
from operators.select import masks_from_logits
from tests.unit.tiny_models import make_tiny_causal_lm

VOCAB = 300
LENGTHS = [9, 2, 31, 17, 5, 24, 12]
PROMPTS = [3, 1, 10, 16, 2, 1, 12]  # prompt positions (BOS included); 12 of 12 = no response


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        # Llama with GQA (4 query heads share 2 kv heads) and RoPE; GPT-2 with learned positions
        "llama": (make_tiny_causal_lm(root / "llama_cur", seed=0, heads=4, kv_heads=2),
                  make_tiny_causal_lm(root / "llama_hist", seed=1, heads=4, kv_heads=2)),
        "gpt2": (make_tiny_causal_lm(root / "gpt2_cur", seed=2, arch="gpt2"),
                 make_tiny_causal_lm(root / "gpt2_hist", seed=3, arch="gpt2")),
        "vocab301": make_tiny_causal_lm(root / "v301", vocab_size=301, seed=4),
    }


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, VOCAB, n).astype(np.int32) for n in LENGTHS]
    tms = [(np.arange(n) >= p).astype(np.uint8) for n, p in zip(LENGTHS, PROMPTS)]
    table = pa.table({
        schema.ID: [f"doc{i}" for i in range(len(ids))],
        schema.INPUT_IDS: pa.array([x.tolist() for x in ids], pa.list_(pa.int32())),
        schema.TARGET_MASK: pa.array([x.tolist() for x in tms], pa.list_(pa.uint8())),
        "extra": list(range(len(ids))),
    })
    return ids, tms, table


@pytest.fixture(scope="module")
def scorers(models):
    out = {}
    for arch in ("llama", "gpt2"):
        cur, hist = models[arch]
        s = TokenScorer(current_model=cur, other_model=hist, method="sstoken", batch_tokens=64)
        s.setup()
        out[arch] = s
    return out


def reference_losses(model, seq):
    """Independent: one unpadded sequence, plain cross-entropy on shifted logits."""
    with torch.no_grad():
        ids = torch.as_tensor(seq, dtype=torch.long)[None]
        logits = model(input_ids=ids).logits[0]
    return np.r_[np.nan, F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").numpy()]


def reference_prompt_attention(path, seq, prompt_len):
    """Independent: transformers' eager attention probabilities of the last layer."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(seq, dtype=torch.long)[None], output_attentions=True)
    return out.attentions[-1][0, :, :, :prompt_len].sum(-1).mean(0).numpy()  # [H,T,T] -> [T]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_losses_equal_unpadded_reference(scorers, docs, arch):
    ids, _, _ = docs
    s = scorers[arch]
    for model in (s._current, s._other):
        got, _ = score_sequences(model, ids, batch_tokens=64)
        for seq, g in zip(ids, got):
            np.testing.assert_allclose(g, reference_losses(model, seq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_attention_equals_eager(scorers, models, docs, arch, monkeypatch):
    ids, _, _ = docs
    prompts = np.array(PROMPTS)
    monkeypatch.setattr(score, "_PROBS_BUDGET", 500)  # force several query chunks
    _, attn = score_sequences(scorers[arch]._current, ids, prompt_lens=prompts, batch_tokens=64)
    for seq, p, a in zip(ids, prompts, attn):
        np.testing.assert_allclose(a, reference_prompt_attention(models[arch][0], seq, p), atol=1e-5)
        assert a[0] == pytest.approx(1.0)  # query 0 sees only key 0 = BOS, a prompt key


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_padded_equals_unbatched(scorers, docs, arch):
    ids, _, _ = docs
    model, prompts = scorers[arch]._current, np.array(PROMPTS)
    alone = score_sequences(model, ids, prompt_lens=prompts, batch_tokens=1)
    together = score_sequences(model, ids, prompt_lens=prompts, batch_tokens=10_000)
    for a, b in zip(alone[0] + alone[1], together[0] + together[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_length_batches_respect_budget_and_cover_all():
    lengths = np.array(LENGTHS + [0, 40])
    batches = length_batches(lengths, 48)
    assert sorted(np.concatenate(batches).tolist()) == [i for i, n in enumerate(lengths) if n > 0]
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 48
        assert lengths[b[0]] == lengths[b].max()


@pytest.mark.parametrize("method", ["sstoken", "rho1"])
def test_offline_masks_equal_masks_from_logits(models, docs, method):
    """The training helper, fed logits and eager attention of one padded batch,
    gives the same masks as the offline operator."""
    ids, tms, table = docs
    cur_path, hist_path = models["llama"]
    out = TokenScorer(current_model=cur_path, other_model=hist_path, method=method, batch_tokens=40)(table)
    T = max(LENGTHS)
    ids_BT = torch.zeros(len(ids), T, dtype=torch.long)
    tm_BT = torch.zeros(len(ids), T, dtype=torch.uint8)
    for r, (x, t) in enumerate(zip(ids, tms)):
        ids_BT[r, :len(x)], tm_BT[r, :len(t)] = torch.as_tensor(x), torch.as_tensor(t)
    attn_mask = (tm_BT.new_tensor(np.arange(T))[None] < torch.tensor(LENGTHS)[:, None]).long()
    cur = AutoModelForCausalLM.from_pretrained(cur_path, attn_implementation="eager").eval()
    hist = AutoModelForCausalLM.from_pretrained(hist_path).eval()
    with torch.no_grad():
        c = cur(input_ids=ids_BT, attention_mask=attn_mask, output_attentions=True)
        h = hist(input_ids=ids_BT, attention_mask=attn_mask)
    got = masks_from_logits(c.logits, h.logits, ids_BT, tm_BT, method, attn_last_layer=c.attentions[-1])
    for r, mask in enumerate(out.column(schema.LOSS_MASK).to_pylist()):
        assert got[r, :LENGTHS[r]].to(torch.uint8).tolist() == mask
        assert not got[r, LENGTHS[r]:].any()


def test_operator_table_contract(scorers, docs):
    ids, tms, table = docs
    out = scorers["llama"](table.slice(1, 5))  # a slice: list offsets do not start at 0
    assert out.column_names == table.column_names + [schema.LOSS_MASK, schema.TOKEN_SCORES]
    assert out.schema.field(schema.LOSS_MASK).type == pa.list_(pa.uint8())
    assert out.schema.field(schema.TOKEN_SCORES).type == pa.list_(pa.float32())
    assert out.column("extra").to_pylist() == [1, 2, 3, 4, 5]
    for r, (mask, sc) in enumerate(zip(out.column(schema.LOSS_MASK).to_pylist(),
                                       out.column(schema.TOKEN_SCORES).to_pylist())):
        tm = tms[r + 1]
        mask, sc = np.array(mask), np.array(sc, dtype=np.float64)
        assert len(mask) == len(tm) and np.all(mask <= tm)
        assert mask.sum() == np.ceil(round(0.6 * tm.sum(), 6))
        assert np.isnan(sc[tm == 0]).all() and np.isfinite(sc[tm == 1]).all()
    again = scorers["llama"](out)  # re-scoring replaces the columns instead of duplicating them
    assert again.column_names == out.column_names
    empty = scorers["llama"](table.slice(0, 0))
    assert empty.num_rows == 0 and schema.LOSS_MASK in empty.column_names


def test_scorer_pickles_before_setup(models):
    cur, hist = models["llama"]
    s = pickle.loads(pickle.dumps(TokenScorer(current_model=cur, other_model=hist, method="rho1")))
    assert s.config.method == "rho1" and s._current is None


def test_clear_errors(models, docs, tmp_path):
    cur, hist = models["llama"]
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        TokenScorer(current_model=missing, other_model=hist, method="sstoken").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        TokenScorer(current_model=cur, other_model=str(tmp_path / "empty"), method="rho1").setup()
    with pytest.raises(ValueError, match="vocab sizes differ.*v301"):
        TokenScorer(current_model=cur, other_model=models["vocab301"], method="rho1").setup()
    with pytest.raises(ValueError, match="unknown|must be 'sstoken' or 'rho1'"):
        TokenScorer(current_model=cur, other_model=hist, method="rho-1")
    with pytest.raises(ValueError, match="ratio"):
        TokenScorer(current_model=cur, other_model=hist, method="rho1", ratio=0.0)
    with pytest.raises(ValueError, match="batch_tokens"):
        TokenScorer(current_model=cur, other_model=hist, method="rho1", batch_tokens=0)


def test_bad_documents_name_the_row(scorers):
    def table(ids, tm):
        return pa.table({schema.ID: ["ok", "bad"],
                         schema.INPUT_IDS: pa.array([[1, 2, 3], ids], pa.list_(pa.int32())),
                         schema.TARGET_MASK: pa.array([[0, 1, 1], tm], pa.list_(pa.uint8()))})
    s = scorers["llama"]
    with pytest.raises(ValueError, match="'bad'.*position 0"):
        s(table([4, 5], [1, 1]))
    with pytest.raises(ValueError, match="'bad'.*vocabulary"):
        s(table([4, VOCAB], [0, 1]))
    with pytest.raises(ValueError, match="'bad'.*lengths differ"):
        s(table([4, 5, 6], [0, 1]))
    with pytest.raises(ValueError, match="'bad'.*positions"):
        s(table([4] * 300, [0] + [1] * 299))
    with pytest.raises(KeyError, match=schema.TARGET_MASK):
        s(pa.table({schema.ID: ["x"], schema.INPUT_IDS: pa.array([[1]], pa.list_(pa.int32()))}))
