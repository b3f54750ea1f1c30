"""Typed configs of the `dedup:` and `decontaminate:` YAML sections, and the LSH arithmetic.

    dedup:
      exact: true                     # normalised-text hash (operators/dedup_exact.py)
      buckets: 64                     # shuffle partitions of the hash and band rows (memory per task)
      near:                           # MinHash LSH (operators/minhash.py); omit to skip
        threshold: 0.8                # or bands: 14, rows: 8 (the default); not both
        num_perm: 112                 # permutations; bands x rows <= num_perm
        shingle: 5                    # words per shingle
        seed: 1
        min_similarity: null          # drop candidate pairs whose estimated Jaccard is lower
    decontaminate:
      sources: [...]                  # eval sets, given like any source (pipeline/config.py)
      ngram: 13                       # words
      min_ngram: 8                    # eval rows of 8..12 words are matched whole

LSH: two documents with Jaccard similarity J share at least one of b bands of r rows
with probability P(J) = 1 - (1 - J^r)^b, an S-curve whose steepest point is near
t = (1/b)^(1/r). The default 14 x 8 (DataTrove's default) gives t = 0.719:

    J       0.5    0.6    0.7    0.72   0.8    0.85   0.9    0.95
    P(J)    0.053  0.211  0.565  0.650  0.924  0.988  0.9996 1.000

Given `threshold` instead, bands x rows is the pair with b*r <= num_perm that minimises
the area of false positives (P below the threshold) plus false negatives (1 - P above
it), equal weights (datasketch's rule): threshold 0.8 with 112 permutations -> 9 x 12
(steep point 0.83), 0.72 -> 12 x 9.
"""
from __future__ import annotations

import functools

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_BANDS, DEFAULT_ROWS = 14, 8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def lsh_threshold(bands: int, rows: int) -> float:
    """The Jaccard similarity at the S-curve's steep point, (1/b)^(1/r)."""
    return (1.0 / bands) ** (1.0 / rows)


def collision_probability(jaccard: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents with this Jaccard similarity share a band) = 1 - (1 - J^r)^b."""
    return 1.0 - (1.0 - np.asarray(jaccard, dtype=np.float64) ** rows) ** bands


@functools.lru_cache(maxsize=64)
def optimal_bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows), b*r <= num_perm, minimising FP area below + FN area above `threshold`."""
    best, best_err = (1, 1), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            lo = np.linspace(0.0, threshold, 201)
            hi = np.linspace(threshold, 1.0, 201)
            fp = np.trapezoid(collision_probability(lo, b, r), lo)
            fn = np.trapezoid(1.0 - collision_probability(hi, b, r), hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


class NearDedupConfig(_Strict):
    """`dedup.near`: MinHash LSH near-duplicate removal."""
    threshold: float | None = Field(None, gt=0, lt=1, description="Jaccard; picks bands x rows")
    num_perm: int | None = Field(None, ge=1, le=1024, description="default bands*rows, or 112")
    bands: int | None = Field(None, ge=1)
    rows: int | None = Field(None, ge=1)
    shingle: int = Field(5, ge=1, le=64, description="words per shingle")
    seed: int = Field(1, ge=0, lt=2**32)
    min_similarity: float | None = Field(None, ge=0, le=1, description="verify candidate pairs")

    @model_validator(mode="after")
    def _lsh(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give bands and rows together")
        if self.bands is not None and self.threshold is not None:
            raise ValueError("give either threshold or bands + rows, not both")
        if self.bands is not None and self.num_perm is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} is more than num_perm = {self.num_perm}")
        return self

    @property
    def bands_rows(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        if self.threshold is not None:
            return optimal_bands_rows(self.threshold, self.permutations)
        return DEFAULT_BANDS, DEFAULT_ROWS

    @property
    def permutations(self) -> int:
        """Permutations computed per document (the signature's width)."""
        if self.num_perm is not None:
            return self.num_perm
        return self.bands * self.rows if self.bands is not None else DEFAULT_BANDS * DEFAULT_ROWS

    @property
    def implied_threshold(self) -> float:
        return lsh_threshold(*self.bands_rows)


class DedupConfig(_Strict):
    """`dedup:`: exact and/or near-duplicate removal, before embedding."""
    exact: bool = True
    near: NearDedupConfig | None = None
    buckets: int = Field(64, ge=1, le=65536, description="shuffle partitions of the exact-hash and band rows")

    @model_validator(mode="after")
    def _something(self):
        if not self.exact and self.near is None:
            raise ValueError("dedup does nothing: set exact: true or give a near: section")
        return self


class DecontamConfig(_Strict):
    """`decontaminate:` knobs; the pipeline's section adds `sources:` (the eval sets)."""
    ngram: int = Field(13, ge=1, le=64, description="words per n-gram")
    min_ngram: int = Field(8, ge=1, le=64, description="shorter eval rows are matched whole down to this")

    @model_validator(mode="after")
    def _sizes(self):
        if self.min_ngram > self.ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= ngram ({self.ngram})")
        return self
