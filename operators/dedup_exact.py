"""Exact dedup: one document per normalised-text hash, the lowest order key kept.

    A  per read part:  rows = exact_rows(order_keys(part_index, n), docs[ID], document_texts(docs))
                       write exact/<part>.arrow: the batches of partition_by_bucket(rows, HASH_LO,
                           dedup_config.buckets), in bucket order (operators/minhash.py)
    B  per bucket b:   removals = exact_duplicates(batch b of every exact/<part>.arrow, as one table)
    D  per read part:  keep = ~removal_mask(keys, all removals' ORDER_KEY)   (dedup_graph.py)

Normalisation (text_norm.normalize_exact): NFKC, lowercase, whitespace runs -> one
space, trimmed; punctuation is kept. The hash is xxh3-128 of the normalised UTF-8 bytes
(hash_hi, hash_lo): a chance collision needs about 2^64 documents. SFT rows hash
`prompt + "\\n\\n" + response`. A bucket holds every row of its hashes, so a group never
spans two tasks; its keeper is the lowest order key, whatever the bucket count.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import xxhash

from operators import schema as S
from operators.dedup_graph import REMOVALS_SCHEMA, removals_table
from operators.text_norm import normalize_exact

EXACT_ROWS_SCHEMA = pa.schema([
    pa.field(S.HASH_HI, pa.uint64(), nullable=False),
    pa.field(S.HASH_LO, pa.uint64(), nullable=False),
    pa.field(S.ORDER_KEY, pa.int64(), nullable=False),
    pa.field(S.ID, pa.string(), nullable=False),
])


def order_keys(part_index: int, num_rows: int) -> np.ndarray:
    """int64 [num_rows]: (part_index << 32) | row. Parts numbered in source order make
    "lowest key" mean "first by source order, then part, then row"."""
    if not 0 <= part_index < 1 << 31 or not 0 <= num_rows <= 1 << 32:
        raise ValueError(f"part index {part_index} / {num_rows} rows do not fit an order key")
    return (np.int64(part_index) << np.int64(32)) | np.arange(num_rows, dtype=np.int64)


def exact_hashes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(hash_hi, hash_lo), uint64 [N] each: xxh3-128 of each normalised text."""
    norm = normalize_exact(texts)
    offsets = np.frombuffer(norm.buffers()[1], np.int64)[norm.offset: norm.offset + len(norm) + 1]
    data = memoryview(norm.buffers()[2] or b"")
    digests = [xxhash.xxh3_128_intdigest(data[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    hi = np.fromiter((d >> 64 for d in digests), np.uint64, len(digests))
    lo = np.fromiter((d & 0xFFFFFFFFFFFFFFFF for d in digests), np.uint64, len(digests))
    return hi, lo


def exact_rows(order_keys: np.ndarray, ids: pa.Array, texts: pa.Array) -> pa.Table:
    """Step A: (hash_hi, hash_lo, order_key, id), one row per document."""
    hi, lo = exact_hashes(texts)
    if len(order_keys) != len(hi) or len(ids) != len(hi):
        raise ValueError(f"{len(order_keys)} order keys and {len(ids)} ids for {len(hi)} texts")
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return pa.table({S.HASH_HI: hi, S.HASH_LO: lo, S.ORDER_KEY: np.asarray(order_keys, np.int64),
                     S.ID: ids.cast(pa.string())}, schema=EXACT_ROWS_SCHEMA)


def exact_duplicates(rows: pa.Table) -> pa.Table:
    """Step B: every row whose hash an earlier (lower order key) row has, pointing at that
    group's lowest key; REMOVALS_SCHEMA with method "exact", similarity 1.0, sorted by key."""
    if rows.num_rows == 0:
        return REMOVALS_SCHEMA.empty_table()
    hi, lo = rows[S.HASH_HI].to_numpy(), rows[S.HASH_LO].to_numpy()
    key = rows[S.ORDER_KEY].to_numpy()
    order = np.lexsort((key, lo, hi))
    hi, lo, key = hi[order], lo[order], key[order]
    first = np.r_[True, (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])]
    if (np.diff(key)[~first[1:]] == 0).any():
        raise ValueError("exact_duplicates: an order key appears twice in one hash group")
    head = np.flatnonzero(first)[np.cumsum(first) - 1]      # row of each row's group keeper
    ids = rows[S.ID].combine_chunks().take(pa.array(order))
    removed = np.flatnonzero(~first)
    return removals_table(
        key[removed], ids.take(pa.array(removed)), key[head[removed]], ids.take(pa.array(head[removed])),
        np.ones(len(removed), np.float32), "exact")
