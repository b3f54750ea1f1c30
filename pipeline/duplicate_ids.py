"""Duplicate document ids: counted once the sources are read, reported, never silently merged.

Two sources (or two rows of one) may carry the same `id`. Nothing downstream needs ids to be
unique, but a trainer or an export keyed by id would conflate them, so the run says so: one
console line and `<reading stage>/duplicate_ids.json` (`read/` or, on the fused path, `plain/`):

    {"documents": N, "duplicate_ids": D, "extra_copies": C, "across_sources": X,
     "examples": [{"id", "count", "sources": [...]}, ...]}

D ids occur more than once (C rows beyond the first of each), X of them in more than one input
file. The ids come from the read stage's parts (only the `id` and `source` columns are
decoded), or on the fused path from the first tokenizer's shards (`doc_ids` at token start 0,
each item's input file as the source). Memory: an 8-byte xxh3 hash and a 4-byte part index per
document (96 MB per 8M documents), plus the ids of the few parts that hold an example; time:
about 1 µs per document in the driver. Written once per run_dir, with zero counts when no id
repeats (the reading stage's output is deterministic, so a resume does not recount).
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import xxhash

from operators import schema as S
from pipeline import storage
from pipeline.layout import RunLayout

EXAMPLES = 20


def _columns(path: str, names: list[str]) -> pa.Table:
    """Only `names` of an Arrow IPC file, the other columns left compressed on disk."""
    with storage.open_random_access(path) as f:
        reader = pa.ipc.open_file(f)
        fields = [reader.schema.get_field_index(n) for n in names]
        reader = pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=fields))
        return reader.read_all()


def _read_stage_ids(layout: RunLayout, parts: list[dict]) -> Iterator[tuple[list[str], list[str]]]:
    for p in parts:
        t = _columns(layout.part("read", p["name"]), [S.ID, S.SOURCE])
        yield t.column(S.ID).to_pylist(), t.column(S.SOURCE).to_pylist()


def _shard_ids(layout: RunLayout, tokenizer: str, shards: list[dict], sources: dict[str, str]):
    for s in shards:
        t = _columns(storage.join(layout.shard_dir(tokenizer), s["file"]), [S.DOC_IDS, S.DOC_TOKEN_STARTS])
        ids = [i for row, starts in zip(t.column(S.DOC_IDS).to_pylist(), t.column(S.DOC_TOKEN_STARTS).to_pylist())
               for i, start in zip(row, starts) if start == 0]
        yield ids, [sources.get(s.get("item"), s.get("item", "?"))] * len(ids)


def count_duplicates(batches) -> dict:
    """The report above from (ids, sources) batches; `batches` is a callable returning the
    iterator (it is walked twice: hashes first, then the examples' ids)."""
    hashes, owners = [], []
    for k, (ids, _) in enumerate(batches()):
        hashes.append(np.fromiter((xxhash.xxh3_64_intdigest(i.encode("utf-8", "surrogatepass")) for i in ids), np.uint64, len(ids)))
        owners.append(np.full(len(ids), k, np.uint32))
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    uniq, counts = np.unique(h, return_counts=True)
    dup = uniq[counts > 1]
    report = {"documents": int(len(h)), "duplicate_ids": int(len(dup)), "extra_copies": int(counts[counts > 1].sum() - len(dup)),
              "across_sources": 0, "examples": []}
    if not len(dup):
        return report
    where: dict[str, dict] = {}
    wanted_parts = set(np.concatenate(owners)[np.isin(h, dup)].tolist())
    lookup = set(dup.tolist())
    for k, (ids, sources) in enumerate(batches()):
        if k not in wanted_parts:
            continue
        for doc_id, source in zip(ids, sources):
            if xxhash.xxh3_64_intdigest(doc_id.encode("utf-8", "surrogatepass")) in lookup:
                entry = where.setdefault(doc_id, {"id": doc_id, "count": 0, "sources": set()})
                entry["count"] += 1
                entry["sources"].add(source)
    across = [e for e in where.values() if len(e["sources"]) > 1]
    report["across_sources"] = len(across)
    shown = sorted(where.values(), key=lambda e: (-len(e["sources"]), -e["count"], e["id"]))[:EXAMPLES]
    report["examples"] = [{**e, "sources": sorted(e["sources"])} for e in shown]
    return report


def report_duplicate_ids(run, stage: str, results: list, say) -> dict | None:
    """Count duplicate ids after the reading stage (`stage`: read or plain; `results`: its items'
    Results); write and announce the report."""
    layout = run.layout
    path = layout.path(stage, "duplicate_ids.json")
    if storage.exists(path):
        return json.loads(storage.read_text(path))
    if run.shards:  # the fused path: the first tokenizer's shards hold every document's id once
        tokenizer = next(iter(run.shards))
        sources = {r.item: r.data.get("path", r.item) for r in results}
        batches = lambda: _shard_ids(layout, tokenizer, run.shards[tokenizer], sources)  # noqa: E731
    elif run.parts:
        batches = lambda: _read_stage_ids(layout, run.parts)  # noqa: E731
    else:
        return None
    try:
        report = count_duplicates(batches)
    except FileNotFoundError:  # parts removed by a run before this report existed: nothing to count
        return None
    storage.write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    if report["duplicate_ids"]:
        ex = ", ".join(f"{e['id']!r} x{e['count']}" for e in report["examples"][:3])
        say(f"warning: {report['duplicate_ids']} document ids occur more than once ({report['extra_copies']} extra rows, "
            f"{report['across_sources']} across input files), e.g. {ex}: see {stage}/duplicate_ids.json")
    return report
