"""CLIMB clustering: k-means on a sample, quality pruning, Ward merge to domains, refinement, assignment.

algorithms.md, "CLIMB: preprocessing". The runner uses it as one fit/apply pair:

1. global fit (one Ray task, on a sample of `cluster.sample_size` embeddings)::

       fit = fit_clusters(sample_embeddings_SD, config.cluster, quality_N=scores_or_None)
       fit.save(run_dir / "cluster")   # centroids.npy float32 [K, D], cluster_fit.json and,
                                       # refined, domain_centroids.npy float32 [domains, D]

   `quality_N` (QualityScorer on the same sample rows) is needed only when
   `cluster.prune` is set.
2. apply (map over every document): `operators.cluster_assign.ClusterAssigner(fit_dir=...)` adds `cluster_id`
   (int32, nearest centroid) and `domain_id` (int32; null when the cluster was pruned;
   else the nearest refined domain centroid, or the cluster's Ward domain when
   `merge.refine` is off).
3. report: `cluster_report.build_cluster_report` -> the dict written to clusters.json.

Distances are Euclidean. Embeddings are L2-normalised, so the nearest centroid by
Euclidean distance is also the one that k-means' own objective assigns; centroids are
left unnormalised (they are means), and Ward runs on them as they are.

Why refine: a Ward cut makes every domain a union of k_init clusters, and a cluster that
straddles two topics drags half of its documents into the wrong domain. Seeding Lloyd
iterations over the documents with the merged domains lets the boundary move through
such clusters; on AG News, 20 Newsgroups and DBpedia that turns 0.86-0.95 of plain
k-means' NMI into parity (benchmarks/bench_cluster_quality.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np

from operators.cluster_config import ClusterConfig

PRUNED = -1  # domain index of a pruned cluster in numpy arrays; null in Arrow and JSON


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return x


def kmeans_fit(embeddings_ND: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 100,
               n_init: int = 1, minibatch_above: int = 100_000, backend: str = "auto") -> np.ndarray:
    """k-means centroids, float32 [k, D], of `embeddings_ND` (float32 [N, D]).

    k larger than N is clamped to N with a warning. backend "auto": up to
    `minibatch_above` rows scikit-learn KMeans (k-means++ init); above, faiss when it is
    importable (full Lloyd steps, multi-threaded/GPU), else MiniBatchKMeans (one Lloyd
    step over 200k x 1000 x 1024 is ~2e11 FLOPs). faiss is not the small-N default:
    its random init left 0.5-1% more within-cluster SSE than k-means++ on 3000 AG News
    embeddings (k = 4, 50, 200; faiss-cpu 1.15).
    """
    x = _as_matrix(embeddings_ND, "embeddings_ND")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > len(x):
        warnings.warn(f"k-means: k={k} > {len(x)} sample rows; using k={len(x)}", stacklevel=2)
        k = len(x)
    if backend == "auto":
        backend = "sklearn"
        if len(x) > minibatch_above:
            try:
                import faiss  # noqa: F401
                backend = "faiss"
            except ImportError:
                pass
    if backend == "faiss":
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=max_iter, nredo=n_init, seed=seed, verbose=False)
        km.train(x)
        return np.ascontiguousarray(km.centroids, dtype=np.float32)
    if backend != "sklearn":
        raise ValueError(f"backend must be 'auto', 'faiss' or 'sklearn', got {backend!r}")
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(x) > minibatch_above:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=n_init, max_iter=max_iter,
                                batch_size=max(4096, 4 * k))
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=n_init, max_iter=max_iter)
    return model.fit(x).cluster_centers_.astype(np.float32)


def kmeans_assign(embeddings_ND: np.ndarray, centroids_KD: np.ndarray, *,
                  max_chunk_bytes: int = 64 << 20) -> np.ndarray:
    """Index of the nearest centroid (Euclidean), int32 [N].

    Works in row chunks so the [chunk, K] float32 distance block stays under
    `max_chunk_bytes` (64 MiB: 16k rows at K=1000).
    """
    x = _as_matrix(embeddings_ND, "embeddings_ND")
    c = _as_matrix(centroids_KD, "centroids_KD")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"embedding width {x.shape[1]} != centroid width {c.shape[1]}")
    sq_norms_K = np.einsum("kd,kd->k", c, c)
    rows = max(1, max_chunk_bytes // (4 * len(c)))
    out = np.empty(len(x), np.int32)
    for start in range(0, len(x), rows):
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every c of a row.
        dist = x[start:start + rows] @ c.T
        dist *= -2.0
        dist += sq_norms_K
        out[start:start + rows] = dist.argmin(axis=1)
    return out


def cluster_quality_means(cluster_ids_N: np.ndarray, quality_N: np.ndarray, k: int) -> np.ndarray:
    """Mean quality per cluster, float64 [k]; NaN for clusters with no document."""
    sums_K = np.bincount(cluster_ids_N, weights=np.asarray(quality_N, np.float64), minlength=k)
    counts_K = np.bincount(cluster_ids_N, minlength=k)
    with np.errstate(invalid="ignore"):
        return sums_K / counts_K


def merge_ward(centroids_KD: np.ndarray, keep_K: np.ndarray, *, num_domains: int | None = None,
               distance: float | None = None) -> np.ndarray:
    """Domain of each cluster, int32 [K]: Ward linkage over the kept centroids, then a cut.

    Cut at exactly `num_domains` groups (clamped to the number of kept clusters, with a
    warning) or at Ward merge height `distance` (scipy fcluster criterion "distance").
    Pruned clusters (keep_K False) get PRUNED (-1). Domains are numbered 0.. in order of
    their lowest cluster index, so equal inputs give equal ids.
    """
    from scipy.cluster.hierarchy import cut_tree, fcluster, linkage

    if (num_domains is None) == (distance is None):
        raise ValueError("merge_ward: give exactly one of num_domains or distance")
    kept = np.flatnonzero(keep_K)
    if len(kept) == 0:
        raise ValueError("merge_ward: every cluster is pruned; nothing to merge")
    if len(kept) == 1:
        labels = np.zeros(1, np.int64)
    elif num_domains is not None:
        if num_domains > len(kept):
            warnings.warn(f"merge: num_domains={num_domains} > {len(kept)} kept clusters; "
                          f"using {len(kept)}", stacklevel=2)
            num_domains = len(kept)
        labels = cut_tree(linkage(centroids_KD[kept].astype(np.float64), "ward"),
                          n_clusters=num_domains).ravel()
    else:
        labels = fcluster(linkage(centroids_KD[kept].astype(np.float64), "ward"),
                          t=distance, criterion="distance")
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # label -> its order of first appearance
    domain_K = np.full(len(keep_K), PRUNED, np.int32)
    domain_K[kept] = rank[inverse]
    assert num_domains is None or len(uniq) == num_domains, (len(uniq), num_domains)
    return domain_K


def _domain_means(cluster_sums_KD: np.ndarray, cluster_counts_K: np.ndarray, centroids_KD: np.ndarray,
                  domain_K: np.ndarray, n: int) -> np.ndarray:
    """Mean document of each domain 0..n-1, float32 [n, D], from per-cluster document sums.

    A domain none of whose clusters holds a sample row gets the mean of its centroids.
    """
    kept = domain_K != PRUNED
    sums = np.zeros((n, cluster_sums_KD.shape[1]))
    np.add.at(sums, domain_K[kept], cluster_sums_KD[kept])
    counts = np.bincount(domain_K[kept], weights=cluster_counts_K[kept], minlength=n)
    for d in np.flatnonzero(counts == 0):
        sums[d], counts[d] = centroids_KD[domain_K == d].mean(axis=0), 1
    return (sums / counts[:, None]).astype(np.float32)


def refine_domains(x_ND: np.ndarray, cluster_ids_N: np.ndarray, centroids_KD: np.ndarray,
                   domain_K: np.ndarray, *, restarts: int = 10, seed: int = 0,
                   max_iter: int = 300) -> np.ndarray:
    """Domain centroids, float32 [n, D]: Lloyd iterations over documents seeded by Ward merges.

    `x_ND` / `cluster_ids_N`: the fit sample and its clusters, all in kept clusters (the
    caller drops pruned rows). `domain_K`: the Ward merge (n domains, PRUNED for pruned
    clusters). Candidate seeds: the merge itself, then restarts-1 Ward merges of seeded
    80% subsets of the kept centroids (each left-out centroid joins the nearest merged
    mean), each cut at the same n. Every candidate is refined with k-means (k = n) over
    the documents; the lowest within-domain sum of squares is kept (ties: the earliest),
    so the result is never worse by that objective than the plain merge.
    """
    from scipy.sparse import csr_matrix
    from sklearn.cluster import KMeans

    n = int(domain_K.max()) + 1
    kept = np.flatnonzero(domain_K != PRUNED)
    seeds = [domain_K]
    rng = np.random.default_rng(seed)
    for _ in range(restarts - 1):
        subset = np.zeros(len(domain_K), bool)
        subset[kept[rng.random(len(kept)) < 0.8]] = True
        if subset.sum() <= n:  # too few clusters to cut a subset into n domains
            break
        d_K = merge_ward(centroids_KD, subset, num_domains=n)
        means = np.stack([centroids_KD[d_K == d].mean(axis=0) for d in range(n)])
        rest = np.flatnonzero(~subset & (domain_K != PRUNED))
        if len(rest):
            d_K[rest] = kmeans_assign(centroids_KD[rest], means)
        seeds.append(d_K)
    # Per-cluster sums once ([K, D]); each seed's domain means are then sums over its clusters.
    one_hot = csr_matrix((np.ones(len(cluster_ids_N)), (cluster_ids_N, np.arange(len(cluster_ids_N)))),
                         shape=(len(centroids_KD), len(cluster_ids_N)))
    cluster_sums_KD = np.asarray(one_hot @ x_ND.astype(np.float64))
    cluster_counts_K = np.bincount(cluster_ids_N, minlength=len(centroids_KD)).astype(np.float64)
    best = None
    for d_K in seeds:
        init = _domain_means(cluster_sums_KD, cluster_counts_K, centroids_KD, d_K, n)
        km = KMeans(n_clusters=n, init=init, n_init=1, max_iter=max_iter, random_state=seed).fit(x_ND)
        if best is None or km.inertia_ < best.inertia_:
            best = km
    return best.cluster_centers_.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ClusterFit:
    """The fitted artifact: centroids, cluster -> domain map (pruned -> PRUNED), domain centroids.

    With refined domains a document's domain is its nearest domain centroid (unless its
    cluster is pruned), and `domain_of_cluster_K` is each kept cluster's home domain: the
    one nearest its centroid, used for reporting. Without them it is the Ward map itself.
    """
    centroids_KD: np.ndarray           # float32 [K, D]
    domain_of_cluster_K: np.ndarray    # int32 [K]; PRUNED (-1) for pruned clusters
    quality_mean_K: np.ndarray | None  # float64 [K] on the fit sample; None without pruning
    min_quality: float | None          # the pruning threshold used, None without pruning
    merge: dict                        # {"num_domains": n} or {"distance": d}, plus refine/restarts
    domain_centroids: np.ndarray | None = None  # float32 [num_domains, D] when refined

    @property
    def num_clusters(self) -> int:
        return len(self.centroids_KD)

    @property
    def num_domains(self) -> int:
        if self.domain_centroids is not None:
            return len(self.domain_centroids)
        return int(self.domain_of_cluster_K.max()) + 1

    def save(self, directory: str | Path) -> list[str]:
        """Write the fit's files (each via temp file + atomic rename); returns their names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"centroids.npy": self.centroids_KD}
        if self.domain_centroids is not None:
            arrays["domain_centroids.npy"] = self.domain_centroids
        for name, array in arrays.items():
            with open(directory / f"{name}.tmp", "wb") as f:
                np.save(f, array)
            os.replace(directory / f"{name}.tmp", directory / name)
        meta = {
            "format": 1, "num_clusters": self.num_clusters, "num_domains": self.num_domains,
            "dim": int(self.centroids_KD.shape[1]), "min_quality": self.min_quality, "merge": self.merge,
            "refined": self.domain_centroids is not None,
            "domain_of_cluster": [None if d == PRUNED else int(d) for d in self.domain_of_cluster_K],
            "quality_mean": None if self.quality_mean_K is None else
            [None if np.isnan(q) else round(float(q), 4) for q in self.quality_mean_K],
        }
        (directory / "cluster_fit.json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(directory / "cluster_fit.json.tmp", directory / "cluster_fit.json")
        return [*arrays, "cluster_fit.json"]

    @staticmethod
    def files(meta: dict) -> list[str]:
        """Names of the files a fit with this cluster_fit.json consists of."""
        return ["centroids.npy", "cluster_fit.json"] + (["domain_centroids.npy"] if meta.get("refined") else [])

    @classmethod
    def load(cls, directory: str | Path) -> ClusterFit:
        directory = Path(directory)
        if not (directory / "cluster_fit.json").is_file():
            raise FileNotFoundError(f"cluster fit incomplete: {directory / 'cluster_fit.json'} is missing")
        meta = json.loads((directory / "cluster_fit.json").read_text())
        for name in cls.files(meta):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"cluster fit incomplete: {directory / name} is missing")
        q = meta["quality_mean"]
        return cls(
            centroids_KD=np.load(directory / "centroids.npy"),
            domain_of_cluster_K=np.array([PRUNED if d is None else d for d in meta["domain_of_cluster"]], np.int32),
            quality_mean_K=None if q is None else np.array([np.nan if v is None else v for v in q]),
            min_quality=meta["min_quality"], merge=meta["merge"],
            domain_centroids=np.load(directory / "domain_centroids.npy") if meta.get("refined") else None)


def fit_clusters(embeddings_ND: np.ndarray, config: ClusterConfig, *,
                 quality_N: np.ndarray | None = None) -> ClusterFit:
    """The global fit: k-means, optional pruning by mean quality, Ward merge, refinement.

    `embeddings_ND` float32 [N, D] (L2-normalised); if N > config.sample_size a seeded
    uniform subsample is used. `quality_N` float32 [N] on 0-5 is required iff
    config.prune is set; a cluster's mean is taken over its sample rows.
    """
    x = _as_matrix(embeddings_ND, "embeddings_ND")
    if config.prune is not None and quality_N is None:
        raise ValueError("cluster.prune is set: pass quality_N (QualityScorer scores of the sample rows)")
    if quality_N is not None and len(quality_N) != len(x):
        raise ValueError(f"quality_N has {len(quality_N)} rows, embeddings_ND {len(x)}")
    if len(x) > config.sample_size:
        rows = np.sort(np.random.default_rng(config.seed).choice(len(x), config.sample_size, replace=False))
        x = x[rows]
        quality_N = None if quality_N is None else np.asarray(quality_N)[rows]
    centroids_KD = kmeans_fit(x, config.k_init, seed=config.seed)
    cluster_ids_N = kmeans_assign(x, centroids_KD)
    keep_K = np.ones(len(centroids_KD), bool)
    quality_mean_K = None
    if config.prune is not None:
        quality_mean_K = cluster_quality_means(cluster_ids_N, quality_N, len(centroids_KD))
        keep_K = quality_mean_K >= config.prune.min_quality  # NaN (empty cluster) -> pruned
        if not keep_K.any():
            raise ValueError(f"cluster.prune.min_quality={config.prune.min_quality} prunes every cluster "
                             f"(highest cluster mean: {np.nanmax(quality_mean_K):.2f})")
    m = config.merge
    cut = {"num_domains": m.num_domains} if m.num_domains is not None else {"distance": m.distance}
    domain_K = merge_ward(centroids_KD, keep_K, **cut)
    domain_centroids = None
    if m.refine:
        rows = keep_K[cluster_ids_N]
        domain_centroids = refine_domains(x[rows], cluster_ids_N[rows], centroids_KD, domain_K,
                                          restarts=m.restarts, seed=config.seed)
        home_K = kmeans_assign(centroids_KD, domain_centroids)
        domain_K = np.where(keep_K, home_K, PRUNED).astype(np.int32)
    merge = {**cut, "refine": m.refine} | ({"restarts": m.restarts} if m.refine else {})
    return ClusterFit(centroids_KD=centroids_KD, domain_of_cluster_K=domain_K, quality_mean_K=quality_mean_K,
                      min_quality=None if config.prune is None else config.prune.min_quality, merge=merge,
                      domain_centroids=domain_centroids)


def assign_domains(embeddings_ND: np.ndarray, fit: ClusterFit) -> tuple[np.ndarray, np.ndarray]:
    """(cluster_id int32 [N], domain_id int32 [N] with PRUNED where the cluster was pruned)."""
    cluster_ids_N = kmeans_assign(embeddings_ND, fit.centroids_KD)
    domain_ids_N = fit.domain_of_cluster_K[cluster_ids_N]
    kept = domain_ids_N != PRUNED
    if fit.domain_centroids is not None and kept.any():
        domain_ids_N[kept] = kmeans_assign(np.asarray(embeddings_ND)[kept], fit.domain_centroids)
    return cluster_ids_N, domain_ids_N
