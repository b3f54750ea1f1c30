"""Sampling the corpus to a mixture: which documents (and how many copies of each) the mix
stage keeps so that each domain gets its share of the token budget; the search prior from
token counts. Pure numpy.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from operators.mixture.sampler import check_prior

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
