"""CLIMB search logic: sampler invariants, predictor on a known function, resumable plans,
sampling a corpus to a mixture. No models: scores come from a known linear function."""
import json

import numpy as np
import pytest

from operators.mixture import (SearchConfig, SearchState, best_mixture, dirichlet_candidates, epoch_caps,
                               final_result, fit_predictor, next_round_candidates, plan_round,
                               rank_correlation_heldout, realised_weights, regmix_sample, sample_to_mixture,
                               token_prior)

PRIOR = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
COST = np.array([1.0, 0.2, 0.6, 0.9, 0.4])  # "loss" per unit weight: domain 1 is the best one
UNITS = 5000                                  # 1 / grid


def fake_loss(w_ND, rng=None):
    noise = 0.0 if rng is None else 0.01 * rng.normal(size=len(w_ND))
    return np.asarray(w_ND) @ COST + noise


def assert_on_grid(w_ND):
    counts = np.rint(w_ND * UNITS)
    assert np.abs(w_ND * UNITS - counts).max() < 1e-6, "weight not a multiple of 2e-4"
    assert np.all(counts.sum(axis=1) == UNITS), "grid units do not sum to exactly 5000"
    assert np.abs(w_ND.sum(axis=1) - 1).max() < 1e-12


def test_regmix_sample_invariants():
    w = regmix_sample(PRIOR, 64, np.random.default_rng(0))
    assert w.shape == (64, 5)
    assert np.all(w <= epoch_caps(PRIOR) + 1e-12)                # [1, 1, 1, .6, .15]
    assert np.all(w[:, 4] <= 0.15) and np.all(w[:, 3] <= 0.6)
    assert_on_grid(w)
    assert np.all((w == 0) | (w >= 2e-4))
    l1 = np.abs(w[:, None] - w[None]).sum(-1) + np.eye(64)
    assert l1.min() > 1e-5                                        # no near-duplicates
    assert len({row.tobytes() for row in w}) == 64


def test_regmix_sample_determinism_seen_and_errors():
    a = regmix_sample(PRIOR, 16, np.random.default_rng(1))
    assert np.array_equal(a, regmix_sample(PRIOR, 16, np.random.default_rng(1)))
    assert not np.array_equal(a, regmix_sample(PRIOR, 16, np.random.default_rng(2)))
    # the same generator again would redraw `a`; with `seen` all of it is skipped
    b = regmix_sample(PRIOR, 16, np.random.default_rng(1), seen=a)
    assert min(np.abs(a - row).sum(1).min() for row in b) > 1e-5
    # literal epoch cap: ratio 0.1 means the budget is 10x the corpus -> caps 1.5 * prior
    w = regmix_sample(PRIOR, 8, np.random.default_rng(0), epoch_budget_ratio=0.1)
    assert np.all(w <= 1.5 * PRIOR + 1e-12)
    with pytest.raises(ValueError, match="infeasible epoch caps"):
        epoch_caps(PRIOR, epoch_budget_ratio=0.05)                # 15 * 0.05 < 1
    with pytest.raises(ValueError, match="distinct mixtures"):
        regmix_sample([1.0], 2, np.random.default_rng(0), max_tries=50)  # one domain: one mixture
    with pytest.raises(ValueError, match="grid"):
        regmix_sample(PRIOR, 2, np.random.default_rng(0), grid=3e-4)
    # a domain with prior 0 never gets weight
    assert np.all(regmix_sample([0.6, 0.0, 0.4], 8, np.random.default_rng(0))[:, 1] == 0)


def test_candidates_capped_snapped_and_deduplicated():
    seen = regmix_sample(PRIOR, 8, np.random.default_rng(0))
    c = dirichlet_candidates(PRIOR, 5000, np.random.default_rng(0), seen=seen)
    assert np.all(c <= epoch_caps(PRIOR) + 1e-12)
    assert_on_grid(c)
    assert len(np.unique(c, axis=0)) == len(c)
    assert not any(np.abs(c - s).sum(1).min() <= 1e-5 for s in seen)


def test_predictor_recovers_known_function():
    rng = np.random.default_rng(0)
    w = regmix_sample(PRIOR, 64, rng)
    y = fake_loss(w, rng)
    rc = rank_correlation_heldout(w, y, seed=0)
    assert rc.spearman is not None and rc.spearman > 0.8, rc
    pred = fit_predictor(w, y, seed=0)
    assert pred.info["early_stopping"] and pred.info["num_validation"] == 7
    best = best_mixture(pred, PRIOR, np.random.default_rng(1), num_draws=20_000)
    assert int(np.argmax(best)) == 1 and best[1] > 0.9
    # higher is better (an accuracy): the best domain is the costliest one
    best_acc = best_mixture(fit_predictor(w, y, seed=0), PRIOR, np.random.default_rng(1), num_draws=20_000,
                            minimize=False)
    assert int(np.argmax(best_acc)) == 0
    # the next round concentrates on good mixtures, avoids seen ones, is seeded
    nxt = next_round_candidates(pred, PRIOR, 8, np.random.default_rng(2), num_draws=20_000, seen=w)
    assert nxt.shape == (8, 5) and fake_loss(nxt).mean() < fake_loss(w).mean() - 0.2
    assert np.array_equal(nxt, next_round_candidates(pred, PRIOR, 8, np.random.default_rng(2),
                                                     num_draws=20_000, seen=w))
    assert not any(np.abs(w - s).sum(1).min() <= 1e-5 for s in nxt)


def test_predictor_small_samples_and_errors():
    w = regmix_sample(PRIOR, 8, np.random.default_rng(0))
    pred = fit_predictor(w, fake_loss(w), seed=0)
    assert not pred.info["early_stopping"] and pred.info["num_train"] == 8
    assert pred.info["min_samples_leaf"] == 2                     # lowered so trees can split
    assert np.ptp(pred.predict(w)) > 0
    rc = rank_correlation_heldout(w, fake_loss(w), seed=0)
    assert rc.spearman is None and "need >= 10" in rc.reason
    with pytest.raises(ValueError, match="finite"):
        fit_predictor(w, np.full(8, np.nan), seed=0)


def run_round(state, r, order_seed):
    """Plan round r, then record fake losses in a shuffled (completion) order."""
    trials = state.ensure_planned(r)
    for i in np.random.default_rng(order_seed).permutation(len(trials)):
        t = trials[i]
        state.record(r, t.index, float(fake_loss([t.weights])[0]))


def test_plan_round_deterministic_and_resumable(tmp_path):
    cfg = SearchConfig(rounds=(12, 6, 3), seed=7, num_draws=5000)
    a = SearchState.create(prior=PRIOR, domain_ids=[3, 5, 8, 9, 11], config=cfg)
    b = SearchState.create(prior=PRIOR, domain_ids=[3, 5, 8, 9, 11], config=cfg)
    assert np.array_equal(plan_round(a, 0), plan_round(a, 0))
    with pytest.raises(ValueError, match="cannot plan round 1"):
        plan_round(a, 1)                                           # round 0 not planned yet
    run_round(a, 0, order_seed=0)
    run_round(b, 0, order_seed=1)                                  # different completion order
    # resume: persist, reload, plan the next round -> same mixtures
    a.save(tmp_path / "trials.json")
    resumed = SearchState.load(tmp_path / "trials.json")
    p1 = plan_round(a, 1)
    assert np.array_equal(p1, plan_round(resumed, 1))
    assert np.array_equal(p1, plan_round(b, 1))
    # a half-finished round blocks the next one
    resumed.ensure_planned(1)
    resumed.record(1, 0, 0.5)
    with pytest.raises(ValueError, match="5 unfinished"):
        plan_round(resumed, 2)
    for t in resumed.round_trials(1)[1:-1]:
        resumed.record(1, t.index, float(fake_loss([t.weights])[0]))
    resumed.mark_failed(1, 5, "proxy OOM")                         # failed trials are skipped
    assert len(plan_round(resumed, 2)) == 3
    seen = np.array([t.weights for t in resumed.trials])
    assert all(np.abs(seen - s).sum(1).min() > 1e-5 for s in plan_round(resumed, 2))


def test_full_search_and_mixture_json(tmp_path):
    state = SearchState.create(prior=PRIOR, domain_ids=[3, 5, 8, 9, 11],
                               config=SearchConfig(rounds=(16, 8, 4), seed=0, num_draws=5000))
    for r in range(state.num_rounds):
        run_round(state, r, order_seed=r)
    out = final_result(state)
    json.dumps(out)                                                # JSON-serialisable as is
    assert list(out["weights"]) == ["3", "5", "8", "9", "11"]
    assert abs(sum(out["weights"].values()) - 1) < 1e-12 and abs(sum(out["prior"].values()) - 1) < 1e-12
    assert max(out["weights"], key=out["weights"].get) == "5"      # domain 1 of COST
    assert len(out["history"]) == 28 and {h["round"] for h in out["history"]} == {0, 1, 2}
    assert all("target_loss" in h and "weights" in h for h in out["history"])
    assert out["rank_correlation"]["spearman"] > 0.8
    # later rounds were steered towards low loss
    by_round = [np.mean([h["target_loss"] for h in out["history"] if h["round"] == r]) for r in range(3)]
    assert by_round[1] < by_round[0] and by_round[2] < by_round[0]


def synthetic_corpus(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [3000, 2000, 1000, 200]                                 # documents per domain
    dom = np.repeat(np.arange(4), sizes)
    tok = rng.integers(20, 400, size=dom.size)
    perm = rng.permutation(dom.size)                                # interleave the domains
    return dom[perm], tok[perm]


def test_sample_to_mixture_realises_weights():
    dom, tok = synthetic_corpus()
    w = np.array([0.4, 0.3, 0.2, 0.1])
    budget = 0.8 * tok.sum()                                        # domain 3 needs ~2 epochs
    s = sample_to_mixture(dom, tok, w, budget, seed=0)
    real = realised_weights(dom, tok, s.doc_indices, 4)
    assert np.all(np.abs(real - w) / w < 0.01), real
    assert abs(tok[s.doc_indices].sum() / budget - 1) < 0.01
    assert s.report["capped_domains"] == []
    # copies of a document are numbered 0, 1, 2, ...; output sorted by (doc, copy)
    pairs = np.stack([s.doc_indices, s.copy_numbers], 1)
    assert np.array_equal(pairs, pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))])
    counts = np.bincount(s.doc_indices, minlength=dom.size)
    assert all(s.copy_numbers[s.doc_indices == d].tolist() == list(range(counts[d]))
               for d in np.flatnonzero(counts)[:200])
    assert counts.max() >= 2
    again = sample_to_mixture(dom, tok, {"0": 0.4, "1": 0.3, "2": 0.2, "3": 0.1}, budget, seed=0)
    assert np.array_equal(again.doc_indices, s.doc_indices)        # deterministic; mapping form too
    assert not np.array_equal(sample_to_mixture(dom, tok, w, budget, seed=1).doc_indices, s.doc_indices)


def test_sample_to_mixture_caps_epochs_and_reports_shortfall():
    dom, tok = synthetic_corpus()
    dom[dom == 2] = -1                                              # a pruned domain is never chosen
    w = np.array([0.5, 0.2, 0.0, 0.3])
    budget = 2.0 * tok[dom >= 0].sum()                              # domain 3 would need >> 3 epochs
    s = sample_to_mixture(dom, tok, w, budget, seed=0, max_epochs=3)
    assert np.bincount(s.doc_indices).max() <= 3 and s.copy_numbers.max() <= 2
    assert not np.any(dom[s.doc_indices] == -1)
    r = s.report
    assert r["capped_domains"] == [3] and r["shortfall_tokens"][3] > 0
    assert r["epochs"][3] == pytest.approx(3.0)
    # the shortfall went to the other domains in proportion (0.5 : 0.2), the budget is still met
    real = realised_weights(dom, tok, s.doc_indices, 4)
    assert real[0] / real[1] == pytest.approx(2.5, rel=0.01)
    assert abs(r["selected_tokens"] / budget - 1) < 0.01
    assert np.allclose(real, r["effective_weights"], atol=0.01)


def test_token_prior():
    ids, prior = token_prior([0, 2, 2, -1, 0], [10, 5, 5, 100, 20])
    assert ids.tolist() == [0, 2] and prior.tolist() == pytest.approx([0.75, 0.25])
