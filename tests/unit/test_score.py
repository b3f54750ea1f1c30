"""TokenScorer with tiny models saved to disk and loaded through the real loading path.

Every expected value is computed independently: single unpadded sequences, plain
torch cross-entropy, and transformers' own eager attention (output_attentions).
"""
import functools
import logging
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from operators import schema, token_loss
from operators.prompt_attention import enable_prompt_attention, verify_prompt_attention
from operators.score import TokenScorer, length_batches, load_causal_lm, score_sequences
from operators.select import prompt_lengths, sstoken_mask
from operators.select_config import SelectConfig
from tests.unit.tiny_models import make_tiny_causal_lm, tiny_config

VOCAB = 300
LENGTHS = [9, 2, 31, 17, 5, 24, 12]
PROMPTS = [3, 1, 10, 16, 2, 1, 12]  # prompt positions (BOS included); 12 of 12 = no response


def gpt2_scaled_by_layer(path, seed):
    """GPT-2 with scale_attn_by_inverse_layer_idx: layer i divides its scores by i + 1."""
    cfg = tiny_config("gpt2", vocab_size=VOCAB, layers=3)
    cfg.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        # Llama with GQA (4 query heads share 2 kv heads) and RoPE; GPT-2 with learned positions
        # and per-layer attention scaling (scale_attn_by_inverse_layer_idx)
        "llama": (make_tiny_causal_lm(root / "llama_cur", seed=0, heads=4, kv_heads=2),
                  make_tiny_causal_lm(root / "llama_hist", seed=1, heads=4, kv_heads=2)),
        "gpt2": (gpt2_scaled_by_layer(root / "gpt2_cur", seed=2),
                 make_tiny_causal_lm(root / "gpt2_hist", seed=3, arch="gpt2", layers=3)),
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
        s = TokenScorer({"method": "sstoken", "current_model": cur, "history_model": hist, "batch_tokens": 64})
        s.setup()
        out[arch] = s
    return out


def reference_losses(model, seq):
    """Independent: one unpadded sequence, plain cross-entropy on shifted logits."""
    with torch.no_grad():
        ids = torch.as_tensor(seq, dtype=torch.long)[None]
        logits = model(input_ids=ids).logits[0]
    return np.r_[np.nan, F.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="none").numpy()]


@functools.lru_cache(maxsize=None)
def eager_model(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def reference_prompt_attention(path, seq, prompt_len):
    """Independent: transformers' eager attention probabilities of the last layer."""
    model = eager_model(path)
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
    monkeypatch.setattr(token_loss, "PROBS_BUDGET", 500)  # force several query chunks
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


def test_ref_loss_static_mask_and_ref_only_mode(scorers, models, docs):
    ids, tms, table = docs
    s = scorers["llama"]
    out = s(table)
    for seq, tm, ref, mask, sc in zip(ids, tms, out.column(schema.REF_LOSS).to_pylist(),
                                      out.column(schema.LOSS_MASK).to_pylist(),
                                      out.column(schema.TOKEN_SCORES).to_pylist()):
        ref, expected = np.array(ref, np.float64), reference_losses(s._other, seq)
        assert np.isnan(ref[tm == 0]).all()
        np.testing.assert_allclose(ref[tm == 1], expected[tm == 1], rtol=1e-5, atol=1e-5)
    # the static mask: sstoken_mask on the history and current losses and the eager attention
    cur_losses = [reference_losses(s._current, x) for x in ids]
    attn = [reference_prompt_attention(models["llama"][0], x, p) for x, p in zip(ids, prompt_lengths(tms))]
    hist_losses = [reference_losses(s._other, x) for x in ids]
    expected = sstoken_mask([h - c for h, c in zip(hist_losses, cur_losses)], attn, tms)
    assert out.column(schema.LOSS_MASK).to_pylist() == [m.tolist() for m in expected.loss_masks]
    # without a current model: ref_loss only, no selection offline
    only = TokenScorer({"method": "sstoken", "history_model": models["llama"][1]})(table)
    assert only.column(schema.LOSS_MASK).to_pylist() == [t.tolist() for t in tms]
    assert all(np.isnan(np.array(x, np.float64)).all() for x in only.column(schema.TOKEN_SCORES).to_pylist())
    def flat(t):
        return np.concatenate([np.array(x, np.float64) for x in t.column(schema.REF_LOSS).to_pylist()])
    np.testing.assert_allclose(flat(only), flat(out), rtol=1e-5)


def test_bf16_model_stores_fp32_head_losses(models, docs):
    """A bf16 forward with the lm_head in fp32: ref_loss equals the fp32 log-softmax of fp32
    logits computed from the bf16 model's own last hidden state, and is far closer to it than
    the bf16 logits' loss would be."""
    ids, tms, table = docs
    path = models["llama"][1]
    scorer = TokenScorer({"method": "rho1", "reference_model": path, "dtype": "bfloat16", "device": "cpu",
                          "batch_tokens": 1})  # one unpadded document per forward, as the reference below
    ref = scorer(table).column(schema.REF_LOSS).to_pylist()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    head = bf16.lm_head.weight.float()
    worst_ours = worst_bf16 = 0.0
    for seq, tm, got in zip(ids, tms, ref):
        x = torch.as_tensor(seq, dtype=torch.long)[None]
        with torch.no_grad():
            out = bf16(input_ids=x, output_hidden_states=True)
            fp32_logits = out.hidden_states[-1][0].float() @ head.T
            truth = F.cross_entropy(fp32_logits[:-1], x[0, 1:], reduction="none").numpy()
            bf16_loss = F.cross_entropy(out.logits[0, :-1].float(), x[0, 1:], reduction="none").numpy()
        t = tm[1:] == 1
        worst_ours = max(worst_ours, float(np.abs(np.array(got[1:], np.float64)[t] - truth[t]).max(initial=0)))
        worst_bf16 = max(worst_bf16, float(np.abs(bf16_loss[t] - truth[t]).max(initial=0)))
    assert worst_ours < 1e-4 and worst_bf16 > 10 * worst_ours
    # the capture verification passes for a bf16 model too (tolerance 3e-2)
    model = load_causal_lm(models["llama"][0], device="cpu", dtype=torch.bfloat16, capture_attention=True)
    assert verify_prompt_attention(model, model.tokenmill_prompt_attention) < 3e-2


def test_long_documents_are_scored_in_pack_windows(models):
    """window_len = pack.seq_len: each window's ref_loss is the piece's own loss (the context the
    trainer gives it), its first token is NaN (not a target), and nothing is lost at the joins."""
    rng = np.random.default_rng(1)
    seq = rng.integers(0, VOCAB, 150).astype(np.int32)
    tm = (np.arange(150) >= 10).astype(np.uint8)
    table = pa.table({schema.ID: ["long"], schema.INPUT_IDS: pa.array([seq.tolist()], pa.list_(pa.int32())),
                      schema.TARGET_MASK: pa.array([tm.tolist()], pa.list_(pa.uint8()))})
    scorer = TokenScorer({"method": "sstoken", "history_model": models["llama"][1],
                          "current_model": models["llama"][0]}, window_len=64)
    out = scorer(table)
    ref = np.array(out.column(schema.REF_LOSS).to_pylist()[0], np.float64)
    mask = np.array(out.column(schema.LOSS_MASK).to_pylist()[0])
    assert ref.size == mask.size == 150 and out.column(schema.ID).to_pylist() == ["long"]
    for start in (0, 64, 128):
        piece = seq[start:start + 64]
        expected = reference_losses(scorer._other, piece)
        got = ref[start:start + 64]
        assert np.isnan(got[0])
        t = tm[start:start + 64].astype(bool)
        t[0] = False
        np.testing.assert_allclose(got[t], expected[t], rtol=1e-5, atol=1e-5)
        assert mask[start] == 0  # a window's first token is never selected
    assert mask.sum() == sum(int(np.ceil(round(0.6 * n, 6))) for n in (54, 63, 21))


def test_gpt2_per_layer_scaling_is_reproduced(models):
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"][0])
    assert model.config.scale_attn_by_inverse_layer_idx
    assert verify_prompt_attention(model, enable_prompt_attention(model, verify=False)) < 1e-5


def test_unsupported_attention_is_refused(tmp_path, monkeypatch):
    from transformers import BloomConfig, GptOssConfig, MistralConfig
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    cases = [(GptOssConfig(**small, num_local_experts=2, num_experts_per_tok=1, head_dim=8,
                           layer_types=["full_attention"] * 2), "s_aux"),
             (MistralConfig(**small, sliding_window=4), "sliding_window=4"),
             (BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), "AttentionInterface")]
    for cfg, why in cases:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / cfg.model_type)
        with pytest.raises(ValueError, match=why) as e:
            TokenScorer({"method": "sstoken", "current_model": str(tmp_path / cfg.model_type),
                         "history_model": str(tmp_path / cfg.model_type)}).setup()
        assert str(tmp_path / cfg.model_type) in str(e.value)
    # the numeric probe: a recomputation that does not match the eager probabilities is refused
    from operators import prompt_attention
    model = AutoModelForCausalLM.from_pretrained(make_tiny_causal_lm(tmp_path / "llama", seed=5))
    monkeypatch.setattr(prompt_attention, "_PROBE_TOLERANCE", {torch.float32: 0.0})
    with pytest.raises(ValueError, match="differs from the model's own eager attention"):
        enable_prompt_attention(model)


def test_trust_remote_code_is_logged_at_load(models, caplog):
    with caplog.at_level(logging.WARNING, logger="operators.score"):
        load_causal_lm(models["llama"][1], device="cpu", dtype=torch.float32, trust_remote_code=True)
    assert any("trust_remote_code=True" in r.getMessage() and models["llama"][1] in r.getMessage()
               for r in caplog.records)


def test_operator_table_contract(scorers, docs):
    ids, tms, table = docs
    out = scorers["llama"](table.slice(1, 5))  # a slice: list offsets do not start at 0
    assert out.column_names == table.column_names + [schema.LOSS_MASK, schema.TOKEN_SCORES, schema.REF_LOSS]
    assert out.schema.field(schema.LOSS_MASK).type == pa.list_(pa.uint8())
    assert out.schema.field(schema.TOKEN_SCORES).type == pa.list_(pa.float32())
    assert out.schema.field(schema.REF_LOSS).type == pa.list_(pa.float32())
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
    assert empty.num_rows == 0 and schema.REF_LOSS in empty.column_names


def test_scorer_pickles_before_setup(models):
    cur, hist = models["llama"]
    s = pickle.loads(pickle.dumps(TokenScorer(SelectConfig(method="rho1", current_model=cur, reference_model=hist))))
    assert s.config.method == "rho1" and s._current is None


def test_one_config_with_key_path_errors(models, tmp_path):
    from pipeline.config import ConfigError, parse_config
    cur, hist = models["llama"]
    for bad, where in (({"method": "sstoken", "history_model": hist, "gamma": 1.5}, "select.gamma"),
                       ({"method": "sstoken", "current_model": cur}, "select.history_model"),
                       ({"method": "rho1", "reference_model": hist, "ratio": 0}, "select.ratio"),
                       ({"method": "sstoken", "history_model": hist, "warmup_docs": 100}, "select.warmup_docs"),
                       ({"method": "rho1", "reference_model": hist, "ratoi": 0.5}, "select.ratoi: unknown key"),
                       ({"method": "rho-1", "reference_model": hist}, "select.method")):
        with pytest.raises(ValueError, match=where):
            TokenScorer(bad)
        with pytest.raises(ConfigError, match=where.split(":")[0]):
            parse_config({"run_dir": str(tmp_path), "sources": [{"path": "x.jsonl", "text_field": "t"}],
                          "tokenize": {"tokenizers": [{"name": "t", "spec": "tiktoken:cl100k_base"}]},
                          "select": bad})
    cfg = parse_config({"run_dir": str(tmp_path), "sources": [{"path": "x.jsonl", "text_field": "t"}],
                        "tokenize": {"tokenizers": [{"name": "t", "spec": "tiktoken:cl100k_base"}]},
                        "select": {"method": "sstoken", "history_model": hist, "current_model": cur}})
    assert isinstance(cfg.select, SelectConfig) and TokenScorer(cfg.select).config is cfg.select
    block = cfg.select.manifest_block(window_len=512)
    assert block["mode"] == "offline_static_mask" and block["ref_loss"] is True and block["window_len"] == 512
    assert "approximation" in block["loss_mask"] and block["warmup_fraction"] == 0.2
    assert SelectConfig(method="rho1", reference_model=hist).manifest_block()["mode"] == "ref_loss_only"
    with pytest.raises(ValueError, match="none"):
        TokenScorer({"method": "none"})


def test_clear_errors(models, docs, tmp_path):
    cur, hist = models["llama"]
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        TokenScorer({"method": "sstoken", "current_model": missing, "history_model": hist}).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        TokenScorer({"method": "rho1", "current_model": cur, "reference_model": str(tmp_path / "empty")}).setup()
    with pytest.raises(ValueError, match="vocab sizes differ.*v301"):
        TokenScorer({"method": "rho1", "current_model": cur, "reference_model": models["vocab301"]}).setup()
    with pytest.raises(ValueError, match="batch_tokens"):
        TokenScorer({"method": "rho1", "reference_model": hist, "batch_tokens": 0})
    with pytest.raises(ValueError, match="window_len"):
        TokenScorer({"method": "rho1", "reference_model": hist}, window_len=1)


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
    with pytest.raises(KeyError, match=schema.TARGET_MASK):
        s(pa.table({schema.ID: ["x"], schema.INPUT_IDS: pa.array([[1]], pa.list_(pa.int32()))}))
