"""MinHash signatures, LSH band rows and candidate pairs: near dedup steps A and B.

The near-dedup flow, in four steps that a Ray stage runs in bounded memory
(`operators/dedup_graph.py` has steps C and D):

    A  per read part:  sig, ok = minhash_signatures(document_texts(docs), config)
                       rows = band_rows(order_keys, sig, ok, config)
                       write bands/<part>.arrow: the batches of partition_by_bucket(rows, BAND_HASH,
                           dedup_config.buckets), in bucket order
                       write signatures/<part>.arrow = signature_table(order_keys, ids, sig, ok)
    B  per bucket b:   pairs = candidate_pairs(batch b of every bands/<part>.arrow, as one table)
    C  one task:       near_duplicates(all pairs, signatures of the pairs' members) -> removals
    D  per read part:  keep = ~removal_mask(order_keys, removals[ORDER_KEY])

Memory: step A holds one part; step B one bucket, about 18 bytes x bands x documents /
buckets (14 bands, 64 buckets: 4 bytes per document); step C the pairs (16 bytes each)
and the signatures of the documents in them (4 x num_perm bytes each).

Signature math (DataTrove's and datasketch's): shingle = `shingle` consecutive words of
`normalize_words`, hashed to 64 bits (text_norm.ngram_hashes), of which the low 32 bits x
go through num_perm hash functions h_i(x) = ((a_i * x + b_i) mod (2^61 - 1)) mod 2^32, a_i in
[1, 2^32), b_i in [0, 2^32) from numpy's RandomState(seed) (the product fits in uint64, so
the arithmetic is exact); the signature is each function's minimum: uint32 [N, P].
A band hash is splitmix64 rounds over the band's r values, seeded with the band index.
Measured on 2 shared cores: 8.5 MB of 20 Newsgroups (5,000 documents) in about 2 s (the
(a*x+b) mod p block is 2/3 of it); steps A-D run at 1,400 docs/s on one core, 8.3x
DataTrove 0.10.1 (benchmarks/bench_dedup.py).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from operators.dedup_config import NearDedupConfig
from operators.text_norm import hash_strings, ngram_hashes, normalize_words, split_words, splitmix64

MERSENNE_61 = np.uint64((1 << 61) - 1)
_LOW32 = np.uint64(0xFFFFFFFF)
_CHUNK_SHINGLES = 8192   # shingles per permutation block: 8192 x 112 x 8 B = 7 MB, cache-sized

BAND_ROWS_SCHEMA = pa.schema([
    pa.field(S.BAND, pa.uint16(), nullable=False),
    pa.field(S.BAND_HASH, pa.uint64(), nullable=False),
    pa.field(S.ORDER_KEY, pa.int64(), nullable=False),
])
PAIRS_SCHEMA = pa.schema([pa.field(S.KEY_A, pa.int64(), nullable=False),
                          pa.field(S.KEY_B, pa.int64(), nullable=False)])


def permutation_parameters(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): uint64 [num_perm] each, a in [1, 2^32), b in [0, 2^32)."""
    rng = np.random.RandomState(seed)
    a = rng.randint(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.randint(0, 1 << 32, size=num_perm, dtype=np.uint64)
    return a, b


def signatures_from_shingles(shingles: np.ndarray, shingle_offsets: np.ndarray,
                             num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MinHash of each document's shingle set.

    shingles: uint64 [G] grouped by document; shingle_offsets: int64 [N+1].
    Returns (signatures uint32 [N, num_perm], has_shingles bool [N]); a document without
    shingles has an all-0xFFFFFFFF row and must not enter the LSH index.
    """
    n_docs = len(shingle_offsets) - 1
    sig = np.full((n_docs, num_perm), 0xFFFFFFFF, np.uint32)
    has = np.diff(shingle_offsets) > 0
    a, b = permutation_parameters(num_perm, seed)
    x = shingles & _LOW32
    doc_of = np.repeat(np.arange(n_docs), np.diff(shingle_offsets))
    for start in range(0, len(x), _CHUNK_SHINGLES):
        stop = min(start + _CHUNK_SHINGLES, len(x))
        v = np.multiply.outer(x[start:stop], a)   # < 2^64 - 2^33: no overflow
        v += b
        v %= MERSENNE_61
        v &= _LOW32           # the hash is the low 32 bits: mins of chunks then compare right
        docs = doc_of[start:stop]
        seg = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        mins = np.minimum.reduceat(v, seg, axis=0).astype(np.uint32)
        rows = docs[seg]
        np.minimum(sig[rows], mins, out=mins)
        sig[rows] = mins
    return sig, has


def minhash_signatures(texts: pa.Array, config: NearDedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Signatures of raw texts (normalised here): (uint32 [N, permutations], bool [N]).
    Documents of 1..shingle-1 words get one shingle of all their words; empty ones none."""
    words, offsets = split_words(normalize_words(texts))
    shingles, shingle_offsets, _ = ngram_hashes(hash_strings(words), offsets, config.shingle)
    return signatures_from_shingles(shingles, shingle_offsets, config.permutations, config.seed)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [N, bands]: band j hashes signature columns j*rows .. (j+1)*rows - 1."""
    n, width = signatures.shape
    if bands * rows > width:
        raise ValueError(f"bands x rows = {bands * rows} needs that many permutations; signatures have {width}")
    view = signatures[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    h = np.broadcast_to(splitmix64(np.arange(bands, dtype=np.uint64)), (n, bands)).copy()
    for j in range(rows):
        h = splitmix64(h ^ view[:, :, j])
    return h


def band_rows(order_keys: np.ndarray, signatures: np.ndarray, has_shingles: np.ndarray,
              config: NearDedupConfig) -> pa.Table:
    """Step A's index rows: (band uint16, band_hash uint64, order_key int64), one per band
    of every document with shingles, in (document, band) order."""
    order_keys = np.asarray(order_keys, np.int64)
    if len(order_keys) != len(signatures):
        raise ValueError(f"{len(order_keys)} order keys for {len(signatures)} signatures")
    bands, rows = config.bands_rows
    keep = np.asarray(has_shingles, bool)
    h = band_hashes(signatures[keep], bands, rows)
    n = h.shape[0]
    return pa.table({
        S.BAND: np.tile(np.arange(bands, dtype=np.uint16), n),
        S.BAND_HASH: h.reshape(-1),
        S.ORDER_KEY: np.repeat(order_keys[keep], bands),
    }, schema=BAND_ROWS_SCHEMA)


def partition_by_bucket(table: pa.Table, hash_column: str, num_buckets: int) -> list[pa.RecordBatch]:
    """Split rows by `hash_column % num_buckets` (a uint64 column): exactly `num_buckets`
    record batches (empty ones included), rows in input order within each. Written in order
    as the batches of one Arrow IPC file per part, bucket b is `open_file(f).get_batch(b)`:
    two files per part instead of parts x buckets small ones."""
    h = table[hash_column].to_numpy()
    bucket = (h % np.uint64(num_buckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(num_buckets + 1))
    batch = table.take(pa.array(order)).combine_chunks().to_batches()
    whole = batch[0] if batch else pa.RecordBatch.from_pylist([], schema=table.schema)
    return [whole.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(num_buckets)]


def candidate_pairs(rows: pa.Table) -> pa.Table:
    """Step B: documents sharing a (band, band_hash). Every member of a group is paired
    with the group's lowest order key (a star, so a group of m costs m - 1 pairs and the
    components are the same as with all m(m-1)/2). Returns (key_a < key_b) int64 pairs,
    unique, sorted."""
    if rows.num_rows == 0:
        return PAIRS_SCHEMA.empty_table()
    band = rows[S.BAND].to_numpy()
    h = rows[S.BAND_HASH].to_numpy()
    key = rows[S.ORDER_KEY].to_numpy()
    order = np.lexsort((key, h, band))
    band, h, key = band[order], h[order], key[order]
    new_group = np.r_[True, (band[1:] != band[:-1]) | (h[1:] != h[:-1])]
    group_min = key[np.flatnonzero(new_group)][np.cumsum(new_group) - 1]
    member = key != group_min
    return unique_pairs(group_min[member], key[member])


def unique_pairs(key_a: np.ndarray, key_b: np.ndarray) -> pa.Table:
    """(min, max) of each pair, without self-pairs and repeats, sorted: the PAIRS table."""
    lo = np.minimum(key_a, key_b).astype(np.int64)
    hi = np.maximum(key_a, key_b).astype(np.int64)
    keep = lo != hi
    both = np.unique(np.stack([lo[keep], hi[keep]], axis=1), axis=0) if keep.any() else np.zeros((0, 2), np.int64)
    return pa.table({S.KEY_A: both[:, 0], S.KEY_B: both[:, 1]}, schema=PAIRS_SCHEMA)


def signature_table(order_keys: np.ndarray, ids: pa.Array, signatures: np.ndarray,
                    has_shingles: np.ndarray) -> pa.Table:
    """Step A's signature file: (order_key, id, signature fixed_size_list<uint32>[P]) for the
    documents that have shingles; step C reads back only the rows its pairs name."""
    keep = np.asarray(has_shingles, bool)
    sig = np.ascontiguousarray(signatures[keep])
    width = signatures.shape[1]
    flat = pa.array(sig.reshape(-1), pa.uint32())
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return pa.table({
        S.ORDER_KEY: np.asarray(order_keys, np.int64)[keep],
        S.ID: pc.filter(ids.cast(pa.string()), pa.array(keep)),
        S.SIGNATURE: pa.FixedSizeListArray.from_arrays(flat, width),
    })


def signature_matrix(table: pa.Table) -> np.ndarray:
    """uint32 [rows, P] view of a signature table's `signature` column."""
    col = table[S.SIGNATURE].combine_chunks()
    width = col.type.list_size
    return col.flatten().to_numpy().reshape(-1, width)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """float32 [M]: the fraction of equal signature entries, row by row (standard error
    sqrt(J(1-J)/P): 0.04 at J = 0.8 with 112 permutations)."""
    return (sig_a == sig_b).mean(axis=1, dtype=np.float64).astype(np.float32)
