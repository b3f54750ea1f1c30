"""Proxy LMs: they learn what they are trained on, train deterministically, score choices."""
import numpy as np
import pytest
import torch

from operators.proxy import ProxyConfig, eval_loss, eval_multiple_choice, rows_for_mixture, train_proxy

TINY = dict(hidden=32, layers=2, heads=2, seq_len=32, batch_size=8, lr=3e-3, warmup_steps=5)
V = 64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def domains(seed=0):
    rng = np.random.default_rng(seed)
    return {0: np.tile(np.arange(10), 500),                   # repeating pattern 0..9
            1: rng.integers(10, V, size=5000)}                 # random tokens


def test_rows_for_mixture_shares_and_determinism():
    rows = rows_for_mixture(domains(), {0: 0.75, 1: 0.25}, 100, 32, np.random.default_rng(0))
    assert rows.shape == (100, 32) and rows.dtype == np.int32
    assert (rows.max(axis=1) < 10).sum() == 75                  # pattern rows only use ids 0..9
    again = rows_for_mixture(domains(), np.array([0.75, 0.25]), 100, 32, np.random.default_rng(0))
    assert np.array_equal(rows, again)
    with pytest.raises(ValueError, match="only 5 tokens"):
        rows_for_mixture({0: np.arange(5)}, [1.0], 4, 32, np.random.default_rng(0))


def test_proxy_learns_its_domain_and_is_deterministic():
    doms = domains()
    train = rows_for_mixture(doms, [1.0, 0.0], 64, 32, np.random.default_rng(0))
    cfg = ProxyConfig(steps=60, **TINY)
    model = train_proxy(train, V, cfg, seed=3, num_threads=1)
    pattern = rows_for_mixture(doms, [1.0, 0.0], 16, 32, np.random.default_rng(1))
    noise = rows_for_mixture(doms, [0.0, 1.0], 16, 32, np.random.default_rng(1))
    lp, ln = eval_loss(model, pattern), eval_loss(model, noise)
    # random ids 10..63 cannot be predicted below ln(54) = 3.99 nats; the pattern can reach 0
    assert lp < 1.0 and ln > 3.5, (lp, ln)
    again = train_proxy(train, V, cfg, seed=3, num_threads=1)
    assert eval_loss(again, pattern) == lp                      # bit-identical with the same seed
    other = train_proxy(train, V, cfg, seed=4, num_threads=1)
    assert eval_loss(other, pattern) != lp


def test_multiple_choice_after_training():
    facts = ["the sky is blue.", "grass is green.", "snow is white."]
    rng = np.random.default_rng(0)
    stream = np.frombuffer("\n".join(rng.choice(facts, 600)).encode(), np.uint8)
    rows = rows_for_mixture({0: stream}, [1.0], 128, 32, rng)
    model = train_proxy(rows, 256, ProxyConfig(steps=120, **TINY), seed=0, num_threads=1)
    tokenize = lambda s: list(s.encode())  # noqa: E731  byte-level: token id = byte
    colours = ["blue.", "green.", "white."]
    items = [{"question": "\nthe sky is", "choices": colours, "answer": 0},
             {"question": "\ngrass is", "choices": colours, "answer": 1},
             {"question": "\nsnow is", "choices": colours, "answer": 2}]
    assert eval_multiple_choice(model, tokenize, items) == 1.0
    assert eval_multiple_choice(model, tokenize, items, normalize="tokens") == 1.0
    with pytest.raises(ValueError, match="answer"):
        eval_multiple_choice(model, tokenize, [{"question": "x", "choices": ["a"], "answer": 3}])


def test_config_and_input_errors():
    with pytest.raises(ValueError, match=r"hidden \(30\) must be a multiple of heads \(4\)"):
        ProxyConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="seed"):
        ProxyConfig(seed=0)  # a call argument of train_proxy, not a setting
    with pytest.raises(ValueError, match="token ids must be in"):
        train_proxy(np.full((2, 8), 99), V, ProxyConfig(steps=1, **TINY), seed=0)
    with pytest.raises(ValueError, match="more than proxy.seq_len"):
        train_proxy(np.zeros((2, 64), np.int64), V, ProxyConfig(steps=1, **TINY), seed=0)
