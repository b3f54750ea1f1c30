"""RegMix sampling of candidate mixtures: the round-1 sampler and the Dirichlet candidates of
rounds 2+ (algorithms.md, "CLIMB: Search"). Pure numpy.

Weights are float64 arrays [D] over the search's domains. Decisions the papers leave open:

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
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

STRENGTHS = tuple(float(s) for s in np.logspace(np.log10(0.1), np.log10(5.0), 15))

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


def grid_units(grid: float, dedup_l1: float) -> int:
    """Units of `grid` in a weight of 1 (5000 for 2e-4); raises unless grid = 1/k and
    dedup_l1 < 2 * grid (module doc, "Dedup")."""
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
    units = grid_units(grid, dedup_l1)
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
    units = grid_units(grid, dedup_l1)
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
