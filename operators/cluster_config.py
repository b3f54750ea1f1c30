"""The `cluster:` block: the one typed config of CLIMB clustering (operators/cluster.py).

    cluster:
      k_init: 1000
      sample_size: 200000
      prune: {min_quality: 3.0}                 # optional; also {classifier: path.skops}
      merge: {num_domains: 20}                  # or {distance: 1.5}; optional, default distance 1.5
                                                # also refine: true, restarts: 10 (the defaults)

`pipeline/config.py` uses `ClusterConfig` as the type of `Config.cluster`, and
`fit_clusters(x, config.cluster, ...)` takes it as it is: every rule lives here, once.
Loaded through `pipeline.config.load_config`, an error names its key path
(`cluster.merge: give exactly one of num_domains or distance`, `cluster.merge.foo: unknown key`).
Defaults are the paper's full-scale values (algorithms.md); dry runs pass smaller ones.
Integers and booleans are strict (`k_init: true` or `refine: "yes"` is an error, not 1 / True).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator


class PruneConfig(BaseModel):
    """`cluster.prune`: drop clusters whose mean quality (0-5) is below `min_quality`."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_quality: float = Field(3.0, ge=0, le=5)         # paper: 3.0 on the 0-5 scale
    classifier: str | None = Field(None, min_length=1)  # .skops file (quality.ClassifierScorer); None = heuristics
    # A joblib/pickle classifier runs code when loaded: refused unless this is set (README, Security).
    trust_pickle: StrictBool = False

    @model_validator(mode="after")
    def _safe_classifier(self) -> PruneConfig:
        from operators.quality import is_pickle_file
        if self.classifier and is_pickle_file(self.classifier) and not self.trust_pickle:
            raise ValueError(f"classifier {self.classifier!r} is a joblib/pickle file, which runs code when "
                             "loaded: save the model with skops (.skops) instead, or set "
                             "cluster.prune.trust_pickle: true if you trust the file")
        return self


class MergeConfig(BaseModel):
    """`cluster.merge`: Ward linkage on kept centroids, cut at exactly one of the two.

    With `refine` (the default) the merged domains then seed Lloyd iterations over the
    documents of the fit sample, so a domain boundary can cut through a k-means cluster;
    `restarts` Ward merges (the first over every kept centroid, the others over seeded 80%
    subsets) are refined and the one with the lowest within-domain sum of squares is kept.
    Without it a domain is exactly a union of clusters, as in the paper; that loses 5-15%
    NMI against the topic labels (benchmarks/bench_cluster_quality.py).
    """
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_domains: StrictInt | None = Field(None, ge=1)  # target number of domains (paper found 21)
    distance: float | None = Field(None, gt=0)        # Ward merge-height threshold (paper: 1.5)
    refine: StrictBool = True                         # document-level Lloyd refinement of the merged domains
    restarts: StrictInt = Field(10, ge=1)             # Ward merges refined when refine is on; lowest SSE wins

    @model_validator(mode="after")
    def _exactly_one_cut(self) -> MergeConfig:
        if (self.num_domains is None) == (self.distance is None):
            raise ValueError("give exactly one of num_domains or distance, "
                             f"got num_domains={self.num_domains!r}, distance={self.distance!r}")
        return self


class ClusterConfig(BaseModel):
    """`cluster:` block: k-means on a sample, optional pruning, Ward merge into domains."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    k_init: StrictInt = Field(1000, ge=1)          # k-means clusters (paper: 1000)
    sample_size: StrictInt = Field(200_000, ge=1)  # documents the k-means fit sees; all are then assigned
    seed: StrictInt = Field(0, ge=0)               # sampling and k-means initialisation
    prune: PruneConfig | None = None
    merge: MergeConfig = MergeConfig(distance=1.5)
    report_sample: StrictInt = Field(20_000, ge=1, description="documents read back for top terms and examples")

    @model_validator(mode="after")
    def _sample_covers_k(self) -> ClusterConfig:
        if self.sample_size < self.k_init:
            raise ValueError(f"sample_size ({self.sample_size}) must be >= k_init ({self.k_init}): "
                             "k-means needs at least one document per cluster")
        return self
