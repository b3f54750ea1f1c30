"""The CLIMB search loop: its settings, its resumable state, the plan of each round and the
final result (algorithms.md, "CLIMB: Search (iterative bootstrapping)").

The orchestrator in `pipeline/` trains and evaluates the proxies (Ray tasks) and calls::

    state = SearchState.create(prior=prior_D, domain_ids=ids_D, config=SearchConfig(rounds=(64, 32, 16)))
    for r in range(state.num_rounds):
        for trial in state.ensure_planned(r):          # = plan_round(state, r), deterministic
            ...proxy on trial.weights -> state.record(r, trial.index, score)   (or .mark_failed)
            state.save(run_dir / "mixture" / "trials.json")   # after every finished trial
    write run_dir / "mixture" / "mixture.json" <- final_result(state)

Weights are float64 arrays [D] over the search's domains (column d is `domain_ids[d]`).
Round 1 is RegMix sampling (sampler.py); rounds 2+ and the final pick are predictor-guided
(predictor.py).

Determinism: round r uses `np.random.default_rng([seed, r])` and finished trials sorted by
(round, index), so the same seed and the same finished trials give the same plan, whatever
order the proxies finished in: that is what makes resume safe.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Annotated, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from operators.mixture.predictor import (best_first, best_mixture, fit_predictor, next_round_candidates,
                                         rank_correlation_heldout)
from operators.mixture.sampler import check_prior, epoch_caps, grid_units, regmix_sample

METRICS = {"target_loss": True, "task_accuracy": False}  # metric -> minimize
STATUSES = ("planned", "done", "failed")


class SearchKnobs(BaseModel):
    """The search settings a user sets in the `mixture:` block. pipeline/config.py's
    `MixtureSection` extends this model, so these rules are checked once, at config load,
    with the key path (`mixture.rounds.1: ...`). Defaults are the paper's (algorithms.md)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: tuple[Annotated[StrictInt, Field(ge=1)], ...] = Field((64, 32, 16), min_length=1)  # proxies per round
    seed: StrictInt = Field(0, ge=0)
    num_draws: StrictInt = Field(100_000, ge=1)  # Dirichlet candidates in rounds 2+ and the final pick
    max_epochs: float = Field(15, gt=0)          # no domain repeated more often in the final run


class SearchConfig(SearchKnobs):
    """Everything the search reads, persisted with its state. `metric` and `epoch_budget_ratio`
    are derived by the stage (from `mixture.target` / `task` and the corpus size); the sampler
    settings keep the paper's values."""
    metric: str = "target_loss"             # or "task_accuracy" (higher is better)
    epoch_budget_ratio: float = Field(1.0, gt=0)  # corpus tokens / budget_tokens (sampler.py)
    temperature: float = 0.5
    min_weight: float = 2e-4
    grid: float = 2e-4
    dedup_l1: float = 1e-5
    predictor_threads: StrictInt = Field(1, ge=1)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"expected one of {sorted(METRICS)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _grid(self) -> SearchConfig:
        grid_units(self.grid, self.dedup_l1)
        return self

    @classmethod
    def from_knobs(cls, knobs: SearchKnobs, **derived) -> SearchConfig:
        """The knobs of a `mixture:` section (or any SearchKnobs) plus the derived settings."""
        return cls(**{name: getattr(knobs, name) for name in SearchKnobs.model_fields}, **derived)

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
        return {"config": self.config.model_dump(), "prior": self.prior, "domain_ids": self.domain_ids,
                "trials": [dataclasses.asdict(t) for t in self.trials]}

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchState:
        trials = [Trial(**t) for t in data["trials"]]
        for t in trials:
            if t.status not in STATUSES or len(t.weights) != len(data["prior"]):
                raise ValueError(f"trial ({t.round}, {t.index}): bad status {t.status!r} or weights length")
        return cls(SearchConfig.model_validate(data["config"]), list(data["prior"]), list(data["domain_ids"]),
                   trials)

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
    best_trial = done[int(best_first(y, state.minimize)[0])]
    predicted = _predicted_when_planned(state)
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
        "config": cfg.model_dump(),
        "history": [{"round": t.round, "index": t.index, "status": t.status, "weights": as_map(t.weights),
                     cfg.metric: t.score, **({"predicted": predicted[t.round, t.index]} if (t.round, t.index)
                                             in predicted else {})}
                    for t in sorted(state.trials, key=lambda t: (t.round, t.index))],
    }


def _predicted_when_planned(state: SearchState) -> dict[tuple[int, int], float]:
    """What the predictor that planned round r (fit on the finished trials before it, as in
    plan_round) predicted for each trial of round r >= 1: the search's predicted-vs-observed."""
    cfg, out = state.config, {}
    for r in range(1, state.num_rounds):
        done, trials = state.finished(before_round=r), state.round_trials(r)
        if len(done) < 2 or not trials:
            continue
        predictor = fit_predictor([t.weights for t in done], [t.score for t in done],
                                  seed=_round_seed(cfg.seed, r), num_threads=cfg.predictor_threads)
        pred = predictor.predict(np.array([t.weights for t in trials]))
        out.update({(r, t.index): float(p) for t, p in zip(trials, pred)})
    return out

