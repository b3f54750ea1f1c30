"""dedup: exact and MinHash near-duplicate removal, four steps on Ray tasks (operators/dedup_*.py).

    dedup/hash       per part     dedup/hash/parts/{exact,bands,sig}-<part>.arrow: the exact-hash rows
                                  and LSH band rows, each split into `dedup.buckets` record batches
                                  (batch b = bucket b), and the MinHash signatures
    dedup/buckets    per bucket   dedup/buckets/parts/{exact,pairs}-b<bucket>.arrow: the exact
                                  duplicates and the candidate pairs found in bucket b of every part
    dedup/components one task     dedup/removals.arrow (every removed document, sorted by order key)
                                  and dedup/removed.jsonl (operators.dedup_graph.removal_log)
    dedup            per part     dedup/parts/<part>.arrow: the documents not removed; removed rows
                                  are counted as filtered, `duplicate_exact` / `duplicate_near`

Order keys are `(part index << 32) | row` with parts numbered in `run.parts` order (source order,
then read chunk), so the kept document of every group is the first in source order, whatever the
number of workers, parts or buckets, and a resumed run writes the same bytes. Memory per task:
one part (hash, apply), one bucket of every part (buckets), the pairs and their members'
signatures (components). Once `dedup` is committed the hash and bucket files are removed
(`keep_intermediate: true` keeps them; pipeline/integrity.py makes them again if a step that read
them is re-run). Rows in the markers are documents: every document for `dedup/hash` and `dedup`;
for `dedup/buckets`, each document once, in the bucket of its exact hash (of its first band in a
near-only run; `index_rows` in each item's data counts the hash and band rows); the removed ones
for `dedup/components`.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pyarrow as pa

from operators import schema as S
from operators.dedup_exact import EXACT_ROWS_SCHEMA, exact_duplicates, exact_rows, order_keys
from operators.dedup_graph import (REMOVALS_SCHEMA, near_duplicates, pair_members, removal_log,
                                   select_rows)
from operators.minhash import (BAND_ROWS_SCHEMA, PAIRS_SCHEMA, band_rows, candidate_pairs, minhash_signatures,
                               partition_by_bucket, signature_table)
from operators.text_norm import document_texts
from pipeline import sink, storage
from pipeline.layout import INTERMEDIATE_COMPRESSION, RunLayout
from pipeline.stages.base import Context, Item, Resources, Result, Run, Stage

REASONS = {"exact": "duplicate_exact", "near": "duplicate_near"}
_SCRATCH = ("dedup/hash", "dedup/buckets")   # part directories no one reads once `dedup` is committed


@dataclasses.dataclass(frozen=True)
class Part(Item):
    index: int          # position in run.parts: the high half of the part's order keys
    input_stage: str


@dataclasses.dataclass(frozen=True)
class Bucket(Item):
    bucket: int
    parts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Components(Item):
    buckets: tuple[str, ...]
    parts: tuple[str, ...]


def _bucket_name(b: int) -> str:
    return f"b{b:05d}"


def write_buckets(path: str, batches: list[pa.RecordBatch]) -> None:
    """One IPC file whose record batch b is bucket b (empty batches included)."""
    out = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec(INTERMEDIATE_COMPRESSION))
    with pa.ipc.new_file(out, batches[0].schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)
    storage.write_atomic(path, out.getvalue().to_pybytes())


def read_bucket(layout: RunLayout, kind: str, parts: tuple[str, ...], bucket: int, schema: pa.Schema) -> pa.Table:
    """Record batch `bucket` of every part's `<kind>-<part>.arrow`, as one table."""
    batches = []
    for part in parts:
        path = layout.part("dedup/hash", f"{kind}-{part}")
        with storage.open_random_access(path) as f:
            reader = pa.ipc.open_file(f)
            if bucket >= reader.num_record_batches:
                raise ValueError(f"{path}: {reader.num_record_batches} buckets, expected more than {bucket} "
                                 f"(written with another dedup.buckets?)")
            batches.append(reader.get_batch(bucket))
    return pa.Table.from_batches(batches, schema=schema).combine_chunks()


def hash_part(ctx: Context, item: Part) -> Result:
    """Step A: exact-hash rows, MinHash signatures and band rows of one part."""
    cfg, layout = ctx.config.dedup, ctx.layout
    docs = sink.read_table(layout.part(item.input_stage, item.name))
    keys, texts = order_keys(item.index, docs.num_rows), document_texts(docs)
    data = {"rows": docs.num_rows}
    if cfg.exact:
        rows = exact_rows(keys, docs[S.ID], texts)
        write_buckets(layout.part("dedup/hash", f"exact-{item.name}"),
                      partition_by_bucket(rows, S.HASH_LO, cfg.buckets))
    if cfg.near is not None:
        sig, ok = minhash_signatures(texts, cfg.near)
        bands = band_rows(keys, sig, ok, cfg.near)
        write_buckets(layout.part("dedup/hash", f"bands-{item.name}"),
                      partition_by_bucket(bands, S.BAND_HASH, cfg.buckets))
        sink.write_table(layout.part("dedup/hash", f"sig-{item.name}"), signature_table(keys, docs[S.ID], sig, ok),
                         compression=INTERMEDIATE_COMPRESSION, rows_per_batch=1 << 16)
        data["without_shingles"] = int((~ok).sum())
    return Result(item.name, rows_in=docs.num_rows, rows_out=docs.num_rows, data=data)


def bucket_duplicates(ctx: Context, item: Bucket) -> Result:
    """Step B: exact duplicates and candidate pairs among the rows of one bucket."""
    cfg, layout = ctx.config.dedup, ctx.layout
    data, docs = {"index_rows": 0}, 0
    if cfg.exact:
        rows = read_bucket(layout, "exact", item.parts, item.bucket, EXACT_ROWS_SCHEMA)
        removed = exact_duplicates(rows)
        sink.write_table(layout.part("dedup/buckets", f"exact-{item.name}"), removed,
                         compression=INTERMEDIATE_COMPRESSION, rows_per_batch=1 << 16)
        docs = rows.num_rows                       # one exact row per document
        data["index_rows"] += rows.num_rows
        data["exact_removed"] = removed.num_rows
    if cfg.near is not None:
        rows = read_bucket(layout, "bands", item.parts, item.bucket, BAND_ROWS_SCHEMA)
        pairs = candidate_pairs(rows)
        sink.write_table(layout.part("dedup/buckets", f"pairs-{item.name}"), pairs,
                         compression=INTERMEDIATE_COMPRESSION, rows_per_batch=1 << 16)
        if not cfg.exact:                          # one band-0 row per document with shingles
            docs = int((rows[S.BAND].to_numpy() == 0).sum())
        data["index_rows"] += rows.num_rows
        data["pairs"] = pairs.num_rows
    return Result(item.name, rows_in=docs, rows_out=docs, data=data)


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()


def find_removals(ctx: Context, item: Components) -> Result:
    """Step C: near-duplicate components over all pairs; every removal, and the log."""
    cfg, layout = ctx.config.dedup, ctx.layout
    exact = REMOVALS_SCHEMA.empty_table()
    if cfg.exact:
        exact = _concat([sink.read_table(layout.part("dedup/buckets", f"exact-{b}")) for b in item.buckets],
                        REMOVALS_SCHEMA)
    near, num_pairs = REMOVALS_SCHEMA.empty_table(), 0
    if cfg.near is not None:
        pairs = _concat([sink.read_table(layout.part("dedup/buckets", f"pairs-{b}")) for b in item.buckets],
                        PAIRS_SCHEMA)
        num_pairs = pairs.num_rows
        if num_pairs:
            members = pair_members(pairs)
            sigs = pa.concat_tables([select_rows(sink.read_table(layout.part("dedup/hash", f"sig-{p}")), members)
                                     for p in item.parts]).combine_chunks()
            near = near_duplicates(pairs, sigs, exclude=exact[S.ORDER_KEY].to_numpy(),
                                   min_similarity=cfg.near.min_similarity)
    removals = pa.concat_tables([exact, near]).sort_by(S.ORDER_KEY).combine_chunks()
    sink.write_table(layout.path("dedup", "removals.arrow"), removals, compression=INTERMEDIATE_COMPRESSION,
                     rows_per_batch=1 << 16)
    storage.write_text_atomic(layout.path("dedup", "removed.jsonl"), removal_log(removals))
    return Result(item.name, rows_in=removals.num_rows, rows_out=removals.num_rows,
                  data={"exact": exact.num_rows, "near": near.num_rows, "pairs": num_pairs})


def apply_removals(ctx: Context, item: Part) -> Result:
    """Step D: one part without its removed documents."""
    layout = ctx.layout
    docs = sink.read_table(layout.part(item.input_stage, item.name))
    removals = sink.read_table(layout.path("dedup", "removals.arrow"))
    # removals are sorted by order key, and this part's keys are [index << 32, (index + 1) << 32)
    all_keys = removals[S.ORDER_KEY].to_numpy()
    lo, hi = np.searchsorted(all_keys, [item.index << 32, (item.index + 1) << 32])
    mine = removals.slice(lo, hi - lo)
    rows = mine[S.ORDER_KEY].to_numpy() - (item.index << 32)
    if len(rows) and rows.max() >= docs.num_rows:
        raise ValueError(f"dedup/removals.arrow names row {int(rows.max())} of part {item.name}, which has "
                         f"{docs.num_rows} rows: the removals come from other parts (delete dedup/ to redo it)")
    keep = np.ones(docs.num_rows, bool)
    keep[rows] = False
    kept = docs.filter(pa.array(keep))
    sink.write_table(layout.part("dedup", item.name), kept, compression=INTERMEDIATE_COMPRESSION,
                     rows_per_batch=1 << 16)
    reasons = Counter(REASONS[m] for m in mine[S.METHOD].to_pylist())
    return Result(item.name, rows_in=docs.num_rows, rows_out=kept.num_rows, rows_filtered=len(rows),
                  reasons=dict(sorted(reasons.items())), data={"rows": kept.num_rows})


class Dedup(Stage):
    name = "dedup"
    reads = tuple(S.DOC_SCHEMA.names)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.dedup is not None

    def plan(self, run: Run) -> list[Part]:
        return [Part(p["name"], i, run.doc_stage) for i, p in enumerate(run.parts)]

    def execute(self, run: Run, executor) -> list[Result]:
        parts = self.plan(run)
        names = tuple(p.name for p in parts)
        buckets = tuple(_bucket_name(b) for b in range(self.config.dedup.buckets))
        executor.run_stage("dedup/hash", parts, hash_part, Resources())
        executor.run_stage("dedup/buckets", [Bucket(n, b, names) for b, n in enumerate(buckets)],
                           bucket_duplicates, Resources())
        executor.run_stage("dedup/components", [Components("components", buckets, names)], find_removals,
                           Resources())
        results = executor.run_stage("dedup", parts, apply_removals, Resources())
        if not self.config.keep_intermediate:
            from pipeline.integrity import remove_intermediates
            remove_intermediates(run.layout, set(_SCRATCH))
        self.finish(run, results)
        return results

    def finish(self, run: Run, results: list[Result]) -> None:
        rows = {r.item: r.data["rows"] for r in results}
        run.documents_now_in("dedup", rows)
        removed = Counter()
        for r in results:
            removed.update(r.reasons)
        run.say(f"dedup: removed {removed['duplicate_exact']} exact and {removed['duplicate_near']} near duplicates "
                f"of {sum(r.rows_in for r in results)} documents (dedup/removed.jsonl)")
