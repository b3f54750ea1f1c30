"""CLIMB mixture search and sampling a corpus to a mixture (algorithms.md, "CLIMB: Search").

One concern per module:

* `sampler.py`   RegMix round-1 sampling and Dirichlet candidates: epoch caps, the 2e-4 grid, dedup
* `predictor.py` the boosted-tree predictor, its held-out rank correlation, predictor-guided picks
* `search.py`    SearchConfig, the resumable SearchState, plan_round, final_result (mixture.json)
* `corpus.py`    sample_to_mixture (documents and copies for a budget), realised_weights, token_prior

Pure numpy / scikit-learn (LightGBM when installed); the names below are the public API.
"""
from operators.mixture.corpus import MixtureSample, realised_weights, sample_to_mixture, token_prior
from operators.mixture.predictor import (Predictor, RankCorrelation, best_first, best_mixture, fit_predictor,
                                         next_round_candidates, rank_correlation_heldout)
from operators.mixture.sampler import STRENGTHS, check_prior, dirichlet_candidates, epoch_caps, regmix_sample
from operators.mixture.search import (METRICS, STATUSES, SearchConfig, SearchKnobs, SearchState, Trial,
                                      final_result, plan_round)

__all__ = [
    "METRICS", "STATUSES", "STRENGTHS", "MixtureSample", "Predictor", "RankCorrelation", "SearchConfig",
    "SearchKnobs", "SearchState", "Trial", "best_first", "best_mixture", "check_prior", "dirichlet_candidates",
    "epoch_caps", "final_result", "fit_predictor", "next_round_candidates", "plan_round",
    "rank_correlation_heldout", "realised_weights", "regmix_sample", "sample_to_mixture", "token_prior",
]
