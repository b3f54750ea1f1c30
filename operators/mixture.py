"""CLIMB mixture search (RegMix sampler, predictor-guided rounds) and sampling a corpus to a mixture.

algorithms.md, "CLIMB: Search (iterative bootstrapping)". Pure numpy / scikit-learn: the
orchestrator in `pipeline/` trains and evaluates the proxies (Ray tasks) and calls::

    state = SearchState.create(prior=prior_D, domain_ids=ids_D, config=SearchConfig(rounds=(64, 32, 16)))
    for r in range(state.num_rounds):
        for trial in state.ensure_planned(r):          # = plan_round(state, r), deterministic
            ...proxy on trial.weights -> state.record(r, trial.index, score)   (or .mark_failed)
            state.save(run_dir / "mixture" / "trials.json")   # after every finished trial
    write run_dir / "mixture" / "mixture.json" <- final_result(state)

Weights are float64 arrays [D] over the search's domains (column d is `domain_ids[d]`).
Decisions the papers leave open, and what this file does:

* **Epoch cap.** A mixture is rejected when any w_d > min(max_epochs * prior_d * r, 1), with
  r = `epoch_budget_ratio` = corpus tokens / final training budget (tokens). Then w_d * budget
  <= max_epochs * tokens_d: no domain is repeated more than `max_epochs` times in the final run.
  r = 1 (default) is the reference code's `min(15 * prior_d, 1)`, i.e. it assumes the final
  budget equals the corpus size. As in the reference, the cap is tested on the raw Dirichlet
  draw; we test it again after snapping so every returned mixture satisfies it.
* **Grid.** Weights are kept as integer counts of `grid` units (1 / 2e-4 = 5000 units):
  floor, then the units still missing go to the largest remainders (ties to the lower
  domain), so the counts sum to exactly 5000 and weight = count / 5000 (the float sum is 1
  to ~1e-16). Non-zero weights are >= min_weight >= grid before snapping, so none snaps to 0.
* **Dedup.** Two different grid points are >= 2 * grid apart in L1, so "L1 <= dedup_l1" with
  dedup_l1 < 2 * grid means "same counts": candidates are deduplicated exactly by their
  counts; `seen` (earlier rounds, possibly off-grid) is compared by L1.
* **Strength.** The reference draws one Dirichlet per strength and keeps a random one; we pick
  the strength first, then draw once (the same distribution).
* **Rounds 2+.** Candidates come from Dirichlet(prior * 1) with the raw prior, as in the CLIMB
  reference (`8_predict.py`), then the same cap / snap / dedup as round 1.
* **Determinism.** Round r uses `np.random.default_rng([seed, r])` and finished trials sorted by
  (round, index), so the same seed and the same finished trials give the same plan, whatever
  order the proxies finished in: that is what makes resume safe.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

STRENGTHS = tuple(float(s) for s in np.logspace(np.log10(0.1), np.log10(5.0), 15))
METRICS = {"target_loss": True, "task_accuracy": False}  # metric -> minimize
STATUSES = ("planned", "done", "failed")


# --- sampling -------------------------------------------------------------------------------

def check_prior(prior_D: Sequence[float] | np.ndarray) -> np.ndarray:
    """float64 [D] prior normalised to sum 1; raises on negative, non-finite or all-zero input."""
    p = np.asarray(prior_D, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"prior must be a non-empty 1-D array of per-domain token shares, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"prior must be finite, >= 0 and not all zero, got {p.tolist()}")
    return p / p.sum()


def epoch_caps(prior_D, *, max_epochs: float = 15, epoch_budget_ratio: float = 1.0) -> np.ndarray:
    """Largest allowed weight per domain, [D]: min(max_epochs * prior_d * epoch_budget_ratio, 1).

    epoch_budget_ratio = corpus tokens / final budget tokens (module doc). Raises when the caps
    sum to < 1, i.e. when no mixture can reach the budget within `max_epochs` repeats."""
    prior = check_prior(prior_D)
    if max_epochs <= 0 or epoch_budget_ratio <= 0:
        raise ValueError(f"max_epochs and epoch_budget_ratio must be > 0, got {max_epochs}, {epoch_budget_ratio}")
    caps = np.minimum(max_epochs * prior * epoch_budget_ratio, 1.0)
    if caps.sum() < 1.0 - 1e-12:
        raise ValueError(f"infeasible epoch caps: the corpus repeated {max_epochs} times covers only "
                         f"{caps.sum():.3f} of the budget (epoch_budget_ratio={epoch_budget_ratio}); "
                         "lower budget_tokens or raise max_epochs")
    return caps


def _grid_units(grid: float, dedup_l1: float) -> int:
    units = int(round(1.0 / grid)) if grid > 0 else 0
    if units < 1 or abs(units * grid - 1.0) > 1e-9:
        raise ValueError(f"grid must be 1/k for an integer k (2e-4 = 1/5000), got {grid}")
    if not 0 <= dedup_l1 < 2 * grid:
        raise ValueError(f"dedup_l1 must be in [0, 2 * grid) = [0, {2 * grid}) so that near-duplicates on "
                         f"the grid are exact duplicates, got {dedup_l1}")
    return units


def _snap(w_ND: np.ndarray, units: int) -> np.ndarray:
    """Integer counts [N, D] summing to `units` per row: largest-remainder rounding of w * units."""
    scaled = w_ND * units
    counts = np.floor(scaled).astype(np.int64)
    deficit = units - counts.sum(axis=1)
    order = np.argsort(-(scaled - counts), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(w_ND.shape[1]), order.shape), axis=1)
    counts += (rank < deficit[:, None]) & (w_ND > 0)
    assert np.all(counts.sum(axis=1) == units), "grid snapping lost a unit"
    return counts


def _postprocess(raw_ND: np.ndarray, caps_D: np.ndarray, min_weight: float, units: int):
    """Cap test, zeroing below min_weight, renormalisation and snapping of raw draws.
    Returns (counts [N, D] int64, ok [N] bool)."""
    ok = np.all(np.isfinite(raw_ND), axis=1) & np.all(raw_ND <= caps_D, axis=1)
    w = np.where(np.isfinite(raw_ND) & (raw_ND >= min_weight), raw_ND, 0.0)
    total = w.sum(axis=1, keepdims=True)
    ok &= total[:, 0] > 0
    counts = _snap(w / np.where(total > 0, total, 1.0), units)
    ok &= np.all(counts <= np.floor(caps_D * units + 1e-9), axis=1)  # renormalising can push past a cap
    return counts, ok


def _near(w_ND: np.ndarray, seen_SD: np.ndarray | None, tol: float) -> np.ndarray:
    """[N] bool: row within L1 <= tol of some row of `seen` (loop over seen: S << N)."""
    hit = np.zeros(len(w_ND), dtype=bool)
    for s in (() if seen_SD is None else seen_SD):
        hit |= np.abs(w_ND - s).sum(axis=1) <= tol
    return hit


def _as_seen(seen, num_domains: int) -> np.ndarray | None:
    if seen is None or len(seen) == 0:
        return None
    s = np.asarray(seen, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != num_domains:
        raise ValueError(f"seen must be [S, {num_domains}] mixtures, got shape {s.shape}")
    return s


def regmix_sample(prior_D, n: int, rng: np.random.Generator, *, strengths: Sequence[float] = STRENGTHS,
                  temperature: float = 0.5, max_epochs: float = 15, epoch_budget_ratio: float = 1.0,
                  min_weight: float = 2e-4, grid: float = 2e-4, dedup_l1: float = 1e-5,
                  seen=None, max_tries: int | None = None) -> np.ndarray:
    """Round-1 mixtures, float64 [n, D], by the RegMix sampler (module doc for the details).

    Per draw: strength s from `strengths`; w ~ Dirichlet(p * s) with p = prior^temperature
    normalised; rejected when over the epoch cap; weights < min_weight zeroed, renormalised,
    snapped to `grid`; dropped when within L1 <= dedup_l1 of an earlier draw or of `seen`.
    Domains with prior 0 always get 0. Raises ValueError after `max_tries` draws (default
    1000 * n + 10000) with fewer than n mixtures.
    """
    prior = check_prior(prior_D)
    caps = epoch_caps(prior, max_epochs=max_epochs, epoch_budget_ratio=epoch_budget_ratio)
    units = _grid_units(grid, dedup_l1)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    support = prior > 0
    p = prior[support] ** temperature
    p /= p.sum()
    seen_SD = _as_seen(seen, prior.size)
    max_tries = 1000 * n + 10_000 if max_tries is None else max_tries
    out, keys, tries, rejected, duplicates = [], set(), 0, 0, 0
    while len(out) < n and tries < max_tries:
        tries += 1
        raw = np.zeros((1, prior.size))
        raw[0, support] = rng.dirichlet(p * strengths[rng.integers(len(strengths))])
        counts, ok = _postprocess(raw, caps, min_weight, units)
        if not ok[0]:
            rejected += 1
            continue
        key = counts[0].tobytes()
        if key in keys or _near(counts / units, seen_SD, dedup_l1)[0]:
            duplicates += 1
            continue
        keys.add(key)
        out.append(counts[0])
    if len(out) < n:
        raise ValueError(f"regmix_sample: only {len(out)} of {n} distinct mixtures after {tries} draws "
                         f"({rejected} over the epoch caps {np.round(caps, 4).tolist()}, {duplicates} "
                         "duplicates); the caps are too tight or there are too few domains for n mixtures")
    return np.stack(out) / units


def dirichlet_candidates(prior_D, num_draws: int, rng: np.random.Generator, *, concentration: float = 1.0,
                         max_epochs: float = 15, epoch_budget_ratio: float = 1.0, min_weight: float = 2e-4,
                         grid: float = 2e-4, dedup_l1: float = 1e-5, seen=None) -> np.ndarray:
    """Candidates for rounds 2+ and the final pick, float64 [M, D] with M <= num_draws:
    Dirichlet(prior * concentration) draws after the round-1 cap / snap / dedup, minus `seen`."""
    prior = check_prior(prior_D)
    caps = epoch_caps(prior, max_epochs=max_epochs, epoch_budget_ratio=epoch_budget_ratio)
    units = _grid_units(grid, dedup_l1)
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    support = prior > 0
    raw = np.zeros((num_draws, prior.size))
    raw[:, support] = rng.dirichlet(prior[support] * concentration, size=num_draws)
    counts, ok = _postprocess(raw, caps, min_weight, units)
    counts = counts[ok]
    _, first = np.unique(counts, axis=0, return_index=True)
    w = counts[np.sort(first)] / units  # first occurrences, in draw order
    return w[~_near(w, _as_seen(seen, prior.size), dedup_l1)]


# --- predictor ------------------------------------------------------------------------------

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


def _ranked(pred_N: np.ndarray, minimize: bool) -> np.ndarray:
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
    pool = _ranked(predictor.predict(cands), minimize)[:max(n * n, 128)]
    return cands[pool[rng.choice(len(pool), size=n, replace=False)]]


def best_mixture(predictor: Predictor, prior_D, rng: np.random.Generator, *, num_draws: int = 100_000,
                 minimize: bool = True, **sampler) -> np.ndarray:
    """The final mixture [D]: the best predicted of `num_draws` fresh Dirichlet(prior) candidates."""
    cands = dirichlet_candidates(prior_D, num_draws, rng, **sampler)
    if len(cands) == 0:
        raise ValueError(f"best_mixture: no candidate passed the caps in {num_draws} draws")
    return cands[_ranked(predictor.predict(cands), minimize)[0]]


# --- search state, plan, result -------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Search settings; defaults are the paper's (algorithms.md). Mapped from the `mixture:` block."""
    rounds: tuple[int, ...] = (64, 32, 16)  # proxies per round
    seed: int = 0
    metric: str = "target_loss"             # or "task_accuracy" (higher is better)
    max_epochs: float = 15
    epoch_budget_ratio: float = 1.0         # corpus tokens / budget_tokens (module doc)
    num_draws: int = 100_000                # Dirichlet candidates in rounds 2+ and the final pick
    temperature: float = 0.5
    min_weight: float = 2e-4
    grid: float = 2e-4
    dedup_l1: float = 1e-5
    predictor_threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "rounds", tuple(self.rounds))
        if not self.rounds or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.rounds):
            raise ValueError(f"mixture.rounds: expected a non-empty list of integers >= 1, got {list(self.rounds)}")
        if self.metric not in METRICS:
            raise ValueError(f"mixture.metric: expected one of {sorted(METRICS)}, got {self.metric!r}")
        if self.num_draws < 1 or self.predictor_threads < 1:
            raise ValueError("mixture.num_draws and mixture.predictor_threads must be >= 1")
        _grid_units(self.grid, self.dedup_l1)

    def sampler(self) -> dict:
        return {"max_epochs": self.max_epochs, "epoch_budget_ratio": self.epoch_budget_ratio,
                "min_weight": self.min_weight, "grid": self.grid, "dedup_l1": self.dedup_l1}


@dataclasses.dataclass
class Trial:
    """One proxy run: `weights` [D] aligned with SearchState.domain_ids; `score` is the metric."""
    round: int
    index: int  # position in its round's plan
    weights: list[float]
    score: float | None = None
    status: str = "planned"  # planned | done | failed
    info: dict = dataclasses.field(default_factory=dict)  # free-form: proxy seed, wall time, error


@dataclasses.dataclass
class SearchState:
    """Everything needed to resume a search: config, prior, domain ids and every trial."""
    config: SearchConfig
    prior: list[float]
    domain_ids: list[int]
    trials: list[Trial] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, *, prior, domain_ids: Sequence[int] | None = None,
               config: SearchConfig | None = None) -> SearchState:
        p = check_prior(prior)
        ids = list(range(p.size)) if domain_ids is None else [int(d) for d in domain_ids]
        if len(ids) != p.size or len(set(ids)) != len(ids):
            raise ValueError(f"domain_ids must be {p.size} distinct ids, got {ids}")
        config = config or SearchConfig()
        epoch_caps(p, max_epochs=config.max_epochs, epoch_budget_ratio=config.epoch_budget_ratio)
        return cls(config, p.tolist(), ids)

    @property
    def num_rounds(self) -> int:
        return len(self.config.rounds)

    @property
    def minimize(self) -> bool:
        return METRICS[self.config.metric]

    def round_trials(self, r: int) -> list[Trial]:
        return sorted((t for t in self.trials if t.round == r), key=lambda t: t.index)

    def finished(self, before_round: int | None = None) -> list[Trial]:
        """Done trials (rounds < before_round), sorted by (round, index): the predictor's data."""
        return sorted((t for t in self.trials if t.status == "done"
                       and (before_round is None or t.round < before_round)), key=lambda t: (t.round, t.index))

    def ensure_planned(self, r: int) -> list[Trial]:
        """Trials of round r, planning them (plan_round) the first time; on resume the persisted
        plan is returned as it is."""
        if not self.round_trials(r):
            self.trials += [Trial(r, i, w.tolist()) for i, w in enumerate(plan_round(self, r))]
        return self.round_trials(r)

    def _trial(self, r: int, index: int) -> Trial:
        for t in self.trials:
            if t.round == r and t.index == index:
                return t
        raise KeyError(f"no trial {index} in round {r}")

    def record(self, r: int, index: int, score: float, info: Mapping | None = None) -> None:
        if not np.isfinite(score):
            raise ValueError(f"trial ({r}, {index}): score must be finite, got {score}; use mark_failed")
        t = self._trial(r, index)
        t.score, t.status = float(score), "done"
        t.info.update(info or {})

    def mark_failed(self, r: int, index: int, reason: str) -> None:
        t = self._trial(r, index)
        t.score, t.status = None, "failed"
        t.info["error"] = reason

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "prior": self.prior, "domain_ids": self.domain_ids,
                "trials": [dataclasses.asdict(t) for t in self.trials]}

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchState:
        cfg = dict(data["config"])
        cfg["rounds"] = tuple(cfg["rounds"])
        trials = [Trial(**t) for t in data["trials"]]
        for t in trials:
            if t.status not in STATUSES or len(t.weights) != len(data["prior"]):
                raise ValueError(f"trial ({t.round}, {t.index}): bad status {t.status!r} or weights length")
        return cls(SearchConfig(**cfg), list(data["prior"]), list(data["domain_ids"]), trials)

    def save(self, path: str | os.PathLike) -> None:
        _write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchState:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _write_json_atomic(path, obj) -> None:
    """Temp file, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _round_seed(seed: int, r: int) -> int:
    return int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def plan_round(state: SearchState, round_index: int) -> np.ndarray:
    """The mixtures [rounds[r], D] of round r, a pure function of (config, prior, finished trials
    of rounds < r). The generator is derived from (seed, r) rather than passed in, so a resumed
    orchestrator gets the same plan whatever it drew before. Rounds < r must be fully finished
    (done or failed)."""
    cfg, r = state.config, round_index
    if not 0 <= r < state.num_rounds:
        raise ValueError(f"round {r} out of range: the schedule has rounds 0..{state.num_rounds - 1}")
    rng = np.random.default_rng([cfg.seed, r])
    prior = np.asarray(state.prior)
    if r == 0:
        return regmix_sample(prior, cfg.rounds[0], rng, temperature=cfg.temperature, **cfg.sampler())
    for j in range(r):
        ts = state.round_trials(j)
        pending = [t.index for t in ts if t.status == "planned"]
        if len(ts) != cfg.rounds[j] or pending:
            raise ValueError(f"cannot plan round {r}: round {j} has {len(ts)} of {cfg.rounds[j]} trials "
                             f"planned and {len(pending)} unfinished; finish them or mark_failed first")
    done = state.finished(before_round=r)
    if len(done) < 2:
        raise ValueError(f"cannot plan round {r}: only {len(done)} successful trials before it")
    predictor = fit_predictor([t.weights for t in done], [t.score for t in done],
                              seed=_round_seed(cfg.seed, r), num_threads=cfg.predictor_threads)
    seen = [t.weights for t in state.trials if t.round < r]
    return next_round_candidates(predictor, prior, cfg.rounds[r], rng, num_draws=cfg.num_draws, seen=seen,
                                 minimize=state.minimize, **cfg.sampler())


def final_result(state: SearchState) -> dict:
    """The `mixture.json` payload: `weights` and `prior` (domain_id -> share), the predictor's
    pick over fresh candidates, its held-out rank correlation, and the whole `history`."""
    cfg, R = state.config, state.num_rounds
    done = state.finished()
    if len(done) < 2:
        raise ValueError(f"final_result: only {len(done)} successful trials")
    w, y = np.array([t.weights for t in done]), np.array([t.score for t in done])
    predictor = fit_predictor(w, y, seed=_round_seed(cfg.seed, R), num_threads=cfg.predictor_threads)
    best = best_mixture(predictor, state.prior, np.random.default_rng([cfg.seed, R]), num_draws=cfg.num_draws,
                        minimize=state.minimize, **cfg.sampler())
    rc = rank_correlation_heldout(w, y, seed=_round_seed(cfg.seed, R + 1), num_threads=cfg.predictor_threads)
    best_trial = done[int(_ranked(y, state.minimize)[0])]
    as_map = lambda v: {str(d): float(x) for d, x in zip(state.domain_ids, v)}  # noqa: E731
    return {
        "weights": as_map(best),
        "prior": as_map(state.prior),
        "metric": cfg.metric,
        "minimize": state.minimize,
        "predicted_score": float(predictor.predict(best[None])[0]),
        "best_trial": {"round": best_trial.round, "index": best_trial.index,
                       "weights": as_map(best_trial.weights), cfg.metric: best_trial.score},
        "rank_correlation": rc._asdict(),
        "predictor": predictor.info,
        "config": dataclasses.asdict(cfg),
        "history": [{"round": t.round, "index": t.index, "status": t.status, "weights": as_map(t.weights),
                     cfg.metric: t.score} for t in sorted(state.trials, key=lambda t: (t.round, t.index))],
    }


# --- sampling the corpus to a mixture -------------------------------------------------------

class MixtureSample(NamedTuple):
    doc_indices: np.ndarray   # int64 [M], sorted; a document appears once per copy
    copy_numbers: np.ndarray  # int32 [M], 0, 1, 2, ... per document (the pipeline's `<id>#<copy>`)
    report: dict              # per-domain tokens requested / targeted / selected, epochs, shortfall


def sample_to_mixture(domain_ids_N, num_tokens_N, weights_D, budget_tokens: float, *, seed: int,
                      max_epochs: int = 15) -> MixtureSample:
    """Choose documents (with repeats) so that domain d gets ~weights_D[d] * budget_tokens tokens.

    domain_ids_N: int [N], index into weights_D (an array indexed by domain id, or mixture.json's
    {domain_id: share}); negative = pruned, never chosen. num_tokens_N:
    tokens per document. A domain needing more than `max_epochs` times its tokens is capped
    there; its shortfall goes to the uncapped domains in proportion to their weights (repeated
    until nothing is over its cap), so the budget is still met when the corpus allows it; the
    report lists requested vs targeted tokens and the effective weights. Per domain: k = target
    // available full copies of every document, then a seeded permutation of its documents
    fills the remainder (copy number k), stopping at the prefix closest to the target.
    """
    dom = np.asarray(domain_ids_N, dtype=np.int64)
    tok = np.asarray(num_tokens_N, dtype=np.int64)
    if isinstance(weights_D, Mapping):  # mixture.json's {"domain_id": share}
        ids = {int(k): float(v) for k, v in weights_D.items()}
        weights_D = np.zeros(max(max(ids) + 1, int(dom.max(initial=-1)) + 1))
        weights_D[list(ids)] = list(ids.values())
    w = np.asarray(weights_D, dtype=np.float64)
    if dom.shape != tok.shape or dom.ndim != 1:
        raise ValueError(f"domain_ids and num_tokens must be 1-D of equal length, got {dom.shape}, {tok.shape}")
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be a 1-D array of shares >= 0, not all zero, got {w.tolist()}")
    if np.any(dom >= w.size) or np.any(tok < 0):
        raise ValueError(f"domain ids must be < {w.size} (len(weights)) and token counts >= 0")
    if not budget_tokens > 0 or max_epochs < 1:
        raise ValueError(f"budget_tokens must be > 0 and max_epochs >= 1, got {budget_tokens}, {max_epochs}")
    w = w / w.sum()
    kept = dom >= 0
    available = np.bincount(dom[kept], weights=tok[kept], minlength=w.size)
    limit = max_epochs * available
    target = np.zeros(w.size)
    active, remaining = w > 0, float(budget_tokens)
    while active.any():  # water-filling: cap, hand the rest to the others, repeat
        want = remaining * w * active / w[active].sum()
        over = active & (want > limit)
        if not over.any():
            target[active] = want[active]
            break
        target[over] = limit[over]
        remaining -= limit[over].sum()
        active &= ~over

    rows, copies, selected = [], [], np.zeros(w.size, dtype=np.int64)
    for d in np.flatnonzero(target > 0):
        docs = np.flatnonzero(dom == d)
        full = min(int(target[d] // available[d]), max_epochs)
        rest = target[d] - full * available[d] if full < max_epochs else 0.0
        perm = docs[np.random.default_rng([seed, int(d)]).permutation(len(docs))]
        cum = np.cumsum(tok[perm])
        m = int(np.searchsorted(cum, rest, side="right"))  # documents whose prefix stays <= rest
        if m < len(perm) and cum[m] - rest < rest - (cum[m - 1] if m else 0):
            m += 1  # one more document lands closer to the target
        rows += [np.repeat(docs, full), perm[:m]]
        copies += [np.tile(np.arange(full, dtype=np.int32), len(docs)), np.full(m, full, np.int32)]
        selected[d] = full * int(available[d]) + (int(cum[m - 1]) if m else 0)
    idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cp = np.concatenate(copies) if copies else np.zeros(0, np.int32)
    order = np.lexsort((cp, idx))
    requested = w * budget_tokens
    report = {"budget_tokens": float(budget_tokens), "selected_tokens": int(selected.sum()),
              "requested_tokens": requested.tolist(), "target_tokens": target.tolist(),
              "selected_tokens_per_domain": selected.tolist(), "available_tokens": available.tolist(),
              "epochs": (selected / np.maximum(available, 1)).tolist(),
              "capped_domains": np.flatnonzero(target < requested * (1 - 1e-9)).tolist(),
              "shortfall_tokens": np.maximum(requested - target, 0).tolist(),
              "effective_weights": (target / max(target.sum(), 1e-300)).tolist()}
    return MixtureSample(idx[order], cp[order], report)


def realised_weights(domain_ids_N, num_tokens_N, doc_indices, num_domains: int) -> np.ndarray:
    """Token share per domain [num_domains] of the selected documents (copies counted)."""
    dom = np.asarray(domain_ids_N, dtype=np.int64)[doc_indices]
    tokens = np.bincount(dom, weights=np.asarray(num_tokens_N, dtype=np.float64)[doc_indices],
                         minlength=num_domains)
    return tokens / max(tokens.sum(), 1e-300)


def token_prior(domain_ids_N, num_tokens_N) -> tuple[np.ndarray, np.ndarray]:
    """(domain ids [D], token share [D]) of the non-pruned (>= 0) domains present: the search prior."""
    dom = np.asarray(domain_ids_N, dtype=np.int64)
    tok = np.asarray(num_tokens_N, dtype=np.float64)
    ids, inverse = np.unique(dom[dom >= 0], return_inverse=True)
    counts = np.bincount(inverse, weights=tok[dom >= 0], minlength=len(ids))
    return ids, check_prior(counts)
