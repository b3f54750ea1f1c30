"""Typed configs for CLIMB embedding and clustering (the `embed:` and `cluster:` YAML blocks).

    embed:
      model: /models/my-sentence-transformer   # optional; default: the shipped MiniLM
      max_seq_length: 256
    cluster:
      k_init: 1000
      sample_size: 200000
      prune: {min_quality: 3.0}                 # optional; also {classifier: path.joblib}
      merge: {num_domains: 20}                  # or {distance: 1.5}; optional, default distance 1.5
                                                # also refine: true, restarts: 10 (the defaults)

Defaults are the paper's full-scale values (algorithms.md); dry runs pass smaller ones.
Frozen, keyword-only dataclasses validate on construction; `from_dict` additionally
rejects unknown keys, naming the key path ("cluster.merge.foo: unknown key").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


def _check_keys(data: Any, cls: type, path: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ValueError(f"{path}.{key}: unknown key (known: {sorted(known)})")
    return dict(data)


def _int(value: Any, path: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{path}: expected an integer >= {minimum}, got {value!r}")


def _number(value: Any, path: str, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{path}: expected a number in [{low}, {high}], got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """`embed:` block; the fields are `DocumentEmbedder` keyword arguments."""
    model: str | None = None   # local directory; None = shipped all-MiniLM-L6-v2
    max_seq_length: int = 256  # tokens; longer inputs are truncated (paper: 512)
    batch_size: int = 64       # texts per forward pass

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"embed.model: expected a directory path, got {self.model!r}")
        _int(self.max_seq_length, "embed.max_seq_length", 1)
        _int(self.batch_size, "embed.batch_size", 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "embed") -> EmbedConfig:
        return cls(**_check_keys(data, cls, path))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """`cluster.prune`: drop clusters whose mean quality (0-5) is below `min_quality`."""
    min_quality: float = 3.0       # paper: 3.0 on the 0-5 scale
    classifier: str | None = None  # joblib file (quality.ClassifierScorer); None = heuristics

    def __post_init__(self) -> None:
        _number(self.min_quality, "cluster.prune.min_quality", 0.0, 5.0)
        if self.classifier is not None and (not isinstance(self.classifier, str) or not self.classifier):
            raise ValueError(f"cluster.prune.classifier: expected a file path, got {self.classifier!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "cluster.prune") -> PruneConfig:
        return cls(**_check_keys(data, cls, path))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """`cluster.merge`: Ward linkage on kept centroids, cut at exactly one of the two.

    With `refine` (the default) the merged domains then seed Lloyd iterations over the
    documents of the fit sample, so a domain boundary can cut through a k-means cluster;
    `restarts` Ward merges (the first over every kept centroid, the others over seeded 80%
    subsets) are refined and the one with the lowest within-domain sum of squares is kept.
    Without it a domain is exactly a union of clusters, as in the paper; that loses 5-15%
    NMI against the topic labels (benchmarks/bench_cluster_quality.py).
    """
    num_domains: int | None = None  # target number of domains (paper found 21)
    distance: float | None = None   # Ward merge-height threshold (paper: 1.5)
    refine: bool = True             # document-level Lloyd refinement of the merged domains
    restarts: int = 10              # Ward merges refined when refine is on; lowest SSE wins

    def __post_init__(self) -> None:
        if (self.num_domains is None) == (self.distance is None):
            raise ValueError("cluster.merge: give exactly one of num_domains or distance, "
                             f"got num_domains={self.num_domains!r}, distance={self.distance!r}")
        if self.num_domains is not None:
            _int(self.num_domains, "cluster.merge.num_domains", 1)
        else:
            _number(self.distance, "cluster.merge.distance", 0.0)
            if self.distance == 0:
                raise ValueError("cluster.merge.distance: must be > 0")
        if not isinstance(self.refine, bool):
            raise ValueError(f"cluster.merge.refine: expected true or false, got {self.refine!r}")
        _int(self.restarts, "cluster.merge.restarts", 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "cluster.merge") -> MergeConfig:
        return cls(**_check_keys(data, cls, path))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """`cluster:` block: k-means on a sample, optional pruning, Ward merge into domains."""
    k_init: int = 1000          # k-means clusters (paper: 1000)
    sample_size: int = 200_000  # documents the k-means fit sees; all are then assigned
    seed: int = 0               # sampling and k-means initialisation
    prune: PruneConfig | None = None
    merge: MergeConfig = dataclasses.field(default_factory=lambda: MergeConfig(distance=1.5))

    def __post_init__(self) -> None:
        _int(self.k_init, "cluster.k_init", 1)
        _int(self.sample_size, "cluster.sample_size", 1)
        _int(self.seed, "cluster.seed", 0)
        if self.sample_size < self.k_init:
            raise ValueError(f"cluster.sample_size ({self.sample_size}) must be >= cluster.k_init "
                             f"({self.k_init}): k-means needs at least one document per cluster")
        if self.prune is not None and not isinstance(self.prune, PruneConfig):
            raise ValueError("cluster.prune: expected a PruneConfig (use ClusterConfig.from_dict for mappings)")
        if not isinstance(self.merge, MergeConfig):
            raise ValueError("cluster.merge: expected a MergeConfig (use ClusterConfig.from_dict for mappings)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "cluster") -> ClusterConfig:
        values = _check_keys(data, cls, path)
        if values.get("prune") is not None:
            values["prune"] = PruneConfig.from_dict(values["prune"], f"{path}.prune")
        if values.get("merge") is not None:
            values["merge"] = MergeConfig.from_dict(values["merge"], f"{path}.merge")
        else:
            values.pop("merge", None)
        return cls(**values)
