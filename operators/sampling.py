"""A seeded uniform sample of documents spread over parts (the k-means fit sample, report examples)."""
from __future__ import annotations

import numpy as np


def sample_rows(part_rows: list[int], size: int, seed: int) -> dict[int, np.ndarray]:
    """{part index: sorted row indices in that part} for `size` documents drawn uniformly without
    replacement from all parts (every document when there are at most `size`)."""
    counts = np.asarray(part_rows, dtype=np.int64)
    total = int(counts.sum())
    chosen = np.arange(total) if total <= size else np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
    starts = np.r_[0, np.cumsum(counts)]
    part_of = np.searchsorted(starts, chosen, side="right") - 1
    return {int(i): chosen[part_of == i] - starts[i] for i in np.unique(part_of)}
