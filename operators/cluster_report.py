"""The clusters.json report: sizes, token counts, top terms and examples per cluster/domain.

Counts cover the whole corpus and are additive, so the runner computes them per batch
with `cluster_counts` and sums; terms and examples come from a per-cluster sample of
texts (the k-means fit sample is enough). Top terms are class-based TF-IDF: the sampled
texts of one cluster (or domain) are concatenated into one document, and
TfidfVectorizer runs over those K documents, so a term ranks high when it is frequent in
the cluster and rare in the others. Everything is deterministic for a given seed.

Domain counts are counted from the documents' own domain ids: with refined domains a
cluster's documents can fall in more than one domain. A domain's `cluster_ids` are the
clusters whose home domain it is (ClusterFit.domain_of_cluster_K).

Shape of the dict (null domain_id = pruned cluster)::

    {"format": 1, "token_unit": "tokens" | "whitespace_words",
     "num_docs": N, "num_tokens": T, "num_clusters": K, "num_domains": D,
     "num_docs_pruned": P, "num_tokens_pruned": TP, "min_quality": 3.0 | null,
     "merge": {"num_domains": 20 | "distance": 1.5, "refine": true, "restarts": 10},
     "clusters": [{"cluster_id", "domain_id", "num_docs", "num_tokens", "quality_mean",
                   "top_terms": [...], "examples": [{"id", "snippet"}]}, ...],
     "domains": [{"domain_id", "cluster_ids", "num_docs", "num_tokens", "top_terms"}, ...]}
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.cluster import PRUNED, ClusterFit


def whitespace_word_counts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Whitespace-separated words per text, int64 [N]: the token count before tokenizing."""
    return pc.list_value_length(pc.utf8_split_whitespace(texts)).to_numpy(zero_copy_only=False).astype(np.int64)


def cluster_counts(cluster_ids_N: np.ndarray, num_tokens_N: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(documents per cluster, tokens per cluster), both int64 [k]; sum them over batches."""
    return (np.bincount(cluster_ids_N, minlength=k).astype(np.int64),
            np.bincount(cluster_ids_N, weights=num_tokens_N, minlength=k).round().astype(np.int64))


def top_terms(groups: Sequence[str], num_terms: int) -> list[list[str]]:
    """The `num_terms` highest-TF-IDF terms of each group text (one document per group).

    Ties break alphabetically (the vectorizer's vocabulary order), so output is stable.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    # Letters only, two or more: numbers, ids and dates crowd out topical words otherwise.
    vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True, max_features=100_000,
                                 token_pattern=r"(?u)\b[^\W\d_]{2,}\b")
    try:
        weights = vectorizer.fit_transform(groups).tocsr()
    except ValueError:  # empty vocabulary: every group is empty or stop words only
        return [[] for _ in groups]
    vocab = vectorizer.get_feature_names_out()
    out = []
    for row in range(weights.shape[0]):
        lo, hi = weights.indptr[row], weights.indptr[row + 1]
        cols, vals = weights.indices[lo:hi], weights.data[lo:hi]
        order = np.lexsort((cols, -vals))[:num_terms]  # by weight desc, then vocabulary order
        out.append([str(vocab[c]) for c in cols[order]])
    return out


def _pick(groups_S: np.ndarray, num_groups: int, per_group: int, order: np.ndarray) -> list[list[int]]:
    """The first `per_group` rows of each group 0..num_groups-1 in `order` (negative group: skipped)."""
    picked: list[list[int]] = [[] for _ in range(num_groups)]
    for row in order:
        group = groups_S[row]
        if group >= 0 and len(picked[group]) < per_group:
            picked[group].append(int(row))
    return picked


def build_cluster_report(fit: ClusterFit, *, num_docs_K: np.ndarray, num_tokens_K: np.ndarray,
                         num_docs_D: np.ndarray, num_tokens_D: np.ndarray, token_unit: str,
                         sample_cluster_ids_S: np.ndarray, sample_domain_ids_S: np.ndarray,
                         sample_ids_S: Sequence[str], sample_texts_S: Sequence[str], num_terms: int = 10,
                         num_examples: int = 3, docs_per_cluster: int = 50, docs_per_domain: int = 500,
                         chars_per_doc: int = 2000, snippet_chars: int = 160, seed: int = 0) -> dict:
    """The clusters.json dict (module docstring) for a fitted clustering.

    num_docs_K / num_tokens_K: int [K] corpus-wide counts per cluster, num_docs_D /
    num_tokens_D the same per domain over unpruned documents (`cluster_counts`, summed).
    token_unit: "tokens" when counts came from a tokenizer, else "whitespace_words".
    sample_*_S: [S] cluster id, domain id (PRUNED for pruned), document id and text of
    sampled documents; at most `docs_per_cluster` per cluster and `docs_per_domain` per
    domain (chosen with `seed`), each cut to `chars_per_doc` characters, feed the terms;
    the first `num_examples` of a cluster's are its examples.
    """
    k, n_dom = fit.num_clusters, fit.num_domains
    if len(num_docs_K) != k or len(num_tokens_K) != k:
        raise ValueError(f"counts have {len(num_docs_K)}/{len(num_tokens_K)} clusters, the fit has {k}")
    if len(num_docs_D) != n_dom or len(num_tokens_D) != n_dom:
        raise ValueError(f"counts have {len(num_docs_D)}/{len(num_tokens_D)} domains, the fit has {n_dom}")
    if not len(sample_cluster_ids_S) == len(sample_domain_ids_S) == len(sample_ids_S) == len(sample_texts_S):
        raise ValueError("sample_cluster_ids_S, sample_domain_ids_S, sample_ids_S and sample_texts_S differ in length")
    domain_K = fit.domain_of_cluster_K
    num_docs_K, num_tokens_K = np.asarray(num_docs_K, np.int64), np.asarray(num_tokens_K, np.int64)

    # Per-group sample: a seeded shuffle, then the first rows of each group in that order.
    order = np.random.default_rng(seed).permutation(len(sample_cluster_ids_S))
    picked = _pick(np.asarray(sample_cluster_ids_S), k, docs_per_cluster, order)
    cluster_texts = [" ".join(sample_texts_S[r][:chars_per_doc] for r in rows) for rows in picked]
    cluster_terms = top_terms(cluster_texts, num_terms)

    clusters = []
    for c in range(k):
        domain = None if domain_K[c] == PRUNED else int(domain_K[c])
        quality = None if fit.quality_mean_K is None or np.isnan(fit.quality_mean_K[c]) \
            else round(float(fit.quality_mean_K[c]), 3)
        examples = [{"id": str(sample_ids_S[r]), "snippet": " ".join(sample_texts_S[r][:snippet_chars].split())}
                    for r in picked[c][:num_examples]]
        clusters.append({"cluster_id": c, "domain_id": domain, "num_docs": int(num_docs_K[c]),
                         "num_tokens": int(num_tokens_K[c]), "quality_mean": quality,
                         "top_terms": cluster_terms[c], "examples": examples})

    members_D = [np.flatnonzero(domain_K == d) for d in range(n_dom)]
    picked_D = _pick(np.asarray(sample_domain_ids_S), n_dom, docs_per_domain, order)
    domain_terms = top_terms([" ".join(sample_texts_S[r][:chars_per_doc] for r in rows) for rows in picked_D],
                             num_terms)
    domains = [{"domain_id": d, "cluster_ids": members.tolist(), "num_docs": int(num_docs_D[d]),
                "num_tokens": int(num_tokens_D[d]), "top_terms": domain_terms[d]}
               for d, members in enumerate(members_D)]

    pruned = domain_K == PRUNED
    return {"format": 1, "token_unit": token_unit,
            "num_docs": int(num_docs_K.sum()), "num_tokens": int(num_tokens_K.sum()),
            "num_clusters": k, "num_domains": n_dom,
            "num_docs_pruned": int(num_docs_K[pruned].sum()), "num_tokens_pruned": int(num_tokens_K[pruned].sum()),
            "min_quality": fit.min_quality, "merge": fit.merge, "clusters": clusters, "domains": domains}
