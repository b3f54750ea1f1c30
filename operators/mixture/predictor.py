"""The search's predictor: gradient-boosted trees from mixture weights [N, D] to the proxy
score [N], its held-out rank correlation, and the predictor-guided picks of rounds 2+ and of
the final mixture (algorithms.md, "CLIMB: Search"). numpy / scikit-learn / LightGBM.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from operators.mixture.sampler import dirichlet_candidates

@dataclasses.dataclass
class Predictor:
    """A fitted regressor from mixture weights [N, D] to the proxy score [N]."""
    model: Any
    backend: str          # "sklearn" (HistGradientBoostingRegressor) or "lightgbm"
    info: dict            # sizes, iterations and the parameters used (goes into mixture.json)
    num_threads: int = 1  # OpenMP threads; more is much slower on a busy 2-core box

    def predict(self, weights_ND) -> np.ndarray:
        w = np.asarray(weights_ND, dtype=np.float64)
        if self.backend == "lightgbm":
            return np.asarray(self.model.predict(w, num_threads=self.num_threads), dtype=np.float64)
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=self.num_threads):
            return np.asarray(self.model.predict(w), dtype=np.float64)


def fit_predictor(weights_ND, scores_N, *, seed: int, backend: str = "auto", num_threads: int = 1,
                  validation_fraction: float = 0.1, min_validation: int = 5, early_stopping_rounds: int = 20,
                  max_iter: int = 1000, learning_rate: float = 0.01, max_depth: int = 4,
                  min_samples_leaf: int = 5, l1: float = 1.0, l2: float = 1.0) -> Predictor:
    """Gradient-boosted trees on (mixture [N, D], score [N]) pairs, the paper's LightGBM settings.

    Split as in the reference: shuffle (seeded), the first int(N * (1 - validation_fraction))
    rows train, the rest validate; training stops after `early_stopping_rounds` rounds without
    improvement of the validation L2 loss.
    Small N: with fewer than `min_validation` validation rows there is no early stopping and
    every row trains for `max_iter` rounds; min_samples_leaf is lowered to max(1, N_train // 4)
    when N_train < 4 * min_samples_leaf, so that trees can split at all (recorded in `info`).
    backend "auto": LightGBM when importable (exact paper parameters: reg_alpha = l1,
    reg_lambda = l2), else scikit-learn's HistGradientBoostingRegressor with max_depth,
    min_samples_leaf (= min_child_samples), l2_regularization = l2, learning_rate, max_iter,
    n_iter_no_change; it has no L1 term, so l1 is ignored there.
    """
    w = np.asarray(weights_ND, dtype=np.float64)
    y = np.asarray(scores_N, dtype=np.float64)
    if w.ndim != 2 or y.shape != (len(w),):
        raise ValueError(f"fit_predictor: weights must be [N, D] and scores [N], got {w.shape} and {y.shape}")
    if len(w) < 2 or not (np.all(np.isfinite(w)) and np.all(np.isfinite(y))):
        raise ValueError(f"fit_predictor needs >= 2 finite (mixture, score) pairs, got {len(w)}")
    if backend == "auto":
        try:
            import lightgbm  # noqa: F401
            backend = "lightgbm"
        except ImportError:
            backend = "sklearn"
    if backend not in ("sklearn", "lightgbm"):
        raise ValueError(f"backend must be 'auto', 'sklearn' or 'lightgbm', got {backend!r}")
    order = np.random.default_rng(seed).permutation(len(w))
    num_train = int(len(w) * (1 - validation_fraction))
    if len(w) - num_train < min_validation:
        num_train = len(w)
    tr, va = order[:num_train], order[num_train:]
    leaf = min_samples_leaf if num_train >= 4 * min_samples_leaf else max(1, num_train // 4)
    info = {"backend": backend, "num_train": int(len(tr)), "num_validation": int(len(va)),
            "early_stopping": bool(len(va)), "min_samples_leaf": leaf, "max_depth": max_depth,
            "learning_rate": learning_rate, "max_iter": max_iter, "l2": l2,
            "l1": l1 if backend == "lightgbm" else None, "seed": int(seed)}
    if backend == "lightgbm":
        import lightgbm as lgb
        model = lgb.LGBMRegressor(boosting_type="gbdt", objective="regression", n_estimators=max_iter,
                                  learning_rate=learning_rate, max_depth=max_depth, min_child_samples=leaf,
                                  reg_alpha=l1, reg_lambda=l2, random_state=seed, n_jobs=num_threads,
                                  deterministic=True, verbosity=-1)  # deterministic: resumable plans
        fit_kw = {}
        if len(va):
            fit_kw = {"eval_set": [(w[va], y[va])], "eval_metric": "l2",
                      "callbacks": [lgb.early_stopping(early_stopping_rounds, verbose=False)]}
        model.fit(w[tr], y[tr], **fit_kw)
        info["iterations"] = int(model.best_iteration_ or max_iter)
        return Predictor(model, backend, info, num_threads)
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits
    model = HistGradientBoostingRegressor(
        learning_rate=learning_rate, max_iter=max_iter, max_depth=max_depth, min_samples_leaf=leaf,
        l2_regularization=l2, early_stopping=bool(len(va)), n_iter_no_change=early_stopping_rounds,
        validation_fraction=None, random_state=seed)
    with threadpool_limits(limits=num_threads):
        if len(va):
            model.fit(w[tr], y[tr], X_val=w[va], y_val=y[va])
        else:
            model.fit(w[tr], y[tr])
    info["iterations"] = int(model.n_iter_)
    return Predictor(model, backend, info, num_threads)


class RankCorrelation(NamedTuple):
    """Spearman correlation of out-of-fold predictions with the measured scores."""
    spearman: float | None  # None when it cannot be measured; `reason` says why
    num_pairs: int
    method: str
    reason: str | None = None


def rank_correlation_heldout(weights_ND, scores_N, *, seed: int, num_folds: int = 5, min_pairs: int = 10,
                             **fit_kwargs) -> RankCorrelation:
    """Predictor quality on held-out pairs: K-fold, every pair predicted once by a predictor
    that did not see it, one Spearman over all N pairs. K-fold rather than one 90/10 split
    because 10% of ~100 pairs is ~10 pairs, too few for a stable rank correlation."""
    from scipy.stats import spearmanr
    w = np.asarray(weights_ND, dtype=np.float64)
    y = np.asarray(scores_N, dtype=np.float64)
    n = len(y)
    k = min(num_folds, n)
    method = f"{k}-fold out-of-fold Spearman over {n} pairs"
    if n < min_pairs:
        return RankCorrelation(None, n, method, f"only {n} finished pairs, need >= {min_pairs}")
    if np.ptp(y) == 0:
        return RankCorrelation(None, n, method, "all scores are equal")
    oof = np.empty(n)
    for i, fold in enumerate(np.array_split(np.random.default_rng(seed).permutation(n), k)):
        train = np.setdiff1d(np.arange(n), fold)
        oof[fold] = fit_predictor(w[train], y[train], seed=seed + i, **fit_kwargs).predict(w[fold])
    if np.ptp(oof) == 0:
        return RankCorrelation(None, n, method, "the held-out predictions are constant")
    return RankCorrelation(float(spearmanr(oof, y).statistic), n, method)


def best_first(pred_N: np.ndarray, minimize: bool) -> np.ndarray:
    """Indices [N] of the predictions, best first (lowest when `minimize`); ties keep input order."""
    return np.argsort(pred_N if minimize else -pred_N, kind="stable")


def next_round_candidates(predictor: Predictor, prior_D, n: int, rng: np.random.Generator, *,
                          num_draws: int = 100_000, seen=None, minimize: bool = True,
                          **sampler) -> np.ndarray:
    """Mixtures [n, D] for round 2+: `dirichlet_candidates` (minus `seen`), predicted, the best
    max(n^2, 128) kept (lowest score when `minimize`, e.g. a loss; highest for an accuracy),
    and n of them drawn uniformly without replacement. `sampler`: dirichlet_candidates' keywords."""
    cands = dirichlet_candidates(prior_D, num_draws, rng, seen=seen, **sampler)
    if len(cands) < n:
        raise ValueError(f"next_round_candidates: only {len(cands)} new candidates from {num_draws} draws, "
                         f"need {n}; raise num_draws")
    pool = best_first(predictor.predict(cands), minimize)[:max(n * n, 128)]
    return cands[pool[rng.choice(len(pool), size=n, replace=False)]]


def best_mixture(predictor: Predictor, prior_D, rng: np.random.Generator, *, num_draws: int = 100_000,
                 minimize: bool = True, **sampler) -> np.ndarray:
    """The final mixture [D]: the best predicted of `num_draws` fresh Dirichlet(prior) candidates."""
    cands = dirichlet_candidates(prior_D, num_draws, rng, **sampler)
    if len(cands) == 0:
        raise ValueError(f"best_mixture: no candidate passed the caps in {num_draws} draws")
    return cands[best_first(predictor.predict(cands), minimize)[0]]
