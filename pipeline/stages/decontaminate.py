"""decontaminate: remove documents that share a word n-gram with an eval set (operators/decontam.py).

    decontaminate/fit    one task   decontaminate/fit/eval.arrow: every row of the eval sources
                                    (read like any source; rows that cannot be read are quarantined
                                    as `quarantine/decontaminate-eval.jsonl`)
    decontaminate        per part   decontaminate/parts/<part>.arrow: the documents without an eval
                                    n-gram; removed rows counted as filtered, reason `contaminated`
    decontaminate/log    one task   decontaminate/removed.jsonl: one line per removed document, in
                                    source order (operators.dedup_graph.removal_log)

Each worker process builds the n-gram index once (`EvalNgramIndex.build`) and reuses it for every
part it is given (keyed by the eval file's sha256). Runs before `dedup`, so a document kept as the
representative of a duplicate group is never one that decontamination removes afterwards:
`duplicate_of` in dedup/removed.jsonl always names a document that is in the output.
Row counts in the markers: eval rows for `decontaminate/fit`, removed documents for the log.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pyarrow as pa

from operators import schema as S
from operators.decontam import DECONTAM_REMOVALS_SCHEMA, EvalNgramIndex, decontam_removals
from operators.dedup_exact import order_keys
from operators.dedup_graph import removal_log
from operators.text_norm import document_texts
from pipeline import readers, sink, storage
from pipeline.config import ConfigError
from pipeline.layout import INTERMEDIATE_COMPRESSION, reason_key
from pipeline.stages.base import Context, Item, Resources, Result, Run, Stage

REASON = "contaminated"
EVAL_COLUMNS = (S.ID, S.SOURCE, S.TEXT, S.PROMPT, S.RESPONSE)

_INDEX: dict[tuple, EvalNgramIndex] = {}   # this worker process's index: (eval file, sha256, n-gram sizes)


@dataclasses.dataclass(frozen=True)
class Part(Item):
    index: int          # position in run.parts: orders the log (order keys)
    input_stage: str
    eval_sha256: str    # of decontaminate/fit/eval.arrow: the cached index is this one's


@dataclasses.dataclass(frozen=True)
class Log(Item):
    parts: tuple[str, ...]   # the parts with removals, in run.parts order


def eval_path(layout) -> str:
    return layout.path("decontaminate", "fit", "eval.arrow")


def read_eval_rows(ctx: Context, item: Item) -> Result:
    """Fit: the eval sources' rows, concatenated in config order, as one small file."""
    config, layout = ctx.config, ctx.layout
    tables, quarantine, rows_in = [], [], 0
    for s, src in enumerate(config.decontaminate.sources):
        paths = readers.expand_source(src)
        if not paths:
            raise ConfigError(f"decontaminate.sources.{s}.path: no input matches {src.path!r}")
        for path in paths:
            for chunk in readers.read_file(src, path, config.read):
                rows_in += chunk.rows_in
                quarantine.extend(chunk.quarantine)
                tables.append(chunk.docs.select(list(EVAL_COLUMNS)))
    empty = S.DOC_SCHEMA.empty_table().select(list(EVAL_COLUMNS))
    rows = pa.concat_tables(tables).combine_chunks() if tables else empty
    written = sink.write_table(eval_path(layout), rows, compression=INTERMEDIATE_COMPRESSION, rows_per_batch=1 << 16)
    layout.write_quarantine("decontaminate-eval", quarantine)
    if rows.num_rows == 0:  # decontaminating against nothing would pass every document silently
        where = " (see quarantine/decontaminate-eval.jsonl)" if quarantine else ""
        raise ValueError(f"decontaminate.sources: no eval rows could be read from "
                         f"{', '.join(s.path for s in config.decontaminate.sources)}: {rows_in} rows in, "
                         f"{len(quarantine)} quarantined{where}")
    index = EvalNgramIndex.build(rows, config.decontaminate)
    return Result(item.name, rows_in=rows_in, rows_out=rows.num_rows, rows_quarantined=len(quarantine),
                  reasons=dict(Counter(reason_key(q["reason"]) for q in quarantine)),
                  data={"sha256": written["sha256"], "ngrams": int(len(index.hashes)),
                        "too_short": index.num_too_short})


def _index(ctx: Context, sha256: str) -> EvalNgramIndex:
    cfg = ctx.config.decontaminate
    key = (eval_path(ctx.layout), sha256, cfg.ngram, cfg.min_ngram)
    if key not in _INDEX:
        _INDEX.clear()
        _INDEX[key] = EvalNgramIndex.build(sink.read_table(eval_path(ctx.layout)), cfg)
    return _INDEX[key]


def remove_contaminated(ctx: Context, item: Part) -> Result:
    """Apply: one part without the documents that share an n-gram with an eval row."""
    layout = ctx.layout
    docs = sink.read_table(layout.part(item.input_stage, item.name))
    found = _index(ctx, item.eval_sha256).find(document_texts(docs))
    removals = decontam_removals(order_keys(item.index, docs.num_rows), docs[S.ID], found)
    keep = pa.array(~_mask(docs.num_rows, found["row"].to_numpy()))
    kept = docs.filter(keep)
    sink.write_table(layout.part("decontaminate", item.name), kept, compression=INTERMEDIATE_COMPRESSION,
                     rows_per_batch=1 << 16)
    if removals.num_rows:
        sink.write_table(layout.part("decontaminate/removals", item.name), removals,
                         compression=INTERMEDIATE_COMPRESSION, rows_per_batch=1 << 16)
    return Result(item.name, rows_in=docs.num_rows, rows_out=kept.num_rows, rows_filtered=removals.num_rows,
                  reasons={REASON: removals.num_rows} if removals.num_rows else {}, data={"rows": kept.num_rows})


def _mask(n: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[rows] = True
    return mask


def write_log(ctx: Context, item: Log) -> Result:
    """decontaminate/removed.jsonl from the parts' removals, in part order."""
    tables = [sink.read_table(ctx.layout.part("decontaminate/removals", p)) for p in item.parts]
    removals = pa.concat_tables(tables).combine_chunks() if tables else DECONTAM_REMOVALS_SCHEMA.empty_table()
    storage.write_text_atomic(ctx.layout.path("decontaminate", "removed.jsonl"), removal_log(removals))
    return Result(item.name, rows_in=removals.num_rows, rows_out=removals.num_rows)


class Decontaminate(Stage):
    name = "decontaminate"
    reads = tuple(S.DOC_SCHEMA.names)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.decontaminate is not None

    def execute(self, run: Run, executor) -> list[Result]:
        fit = executor.run_stage("decontaminate/fit", [Item("eval")], read_eval_rows, Resources())[0]
        if fit.data["too_short"]:
            run.say(f"decontaminate: {fit.data['too_short']} of {fit.rows_out} eval rows have fewer than "
                    f"{self.config.decontaminate.min_ngram} words and are not matched")
        parts = [Part(p["name"], i, run.doc_stage, fit.data["sha256"]) for i, p in enumerate(run.parts)]
        results = executor.run_stage("decontaminate", parts, remove_contaminated, Resources())
        executor.run_stage("decontaminate/log", [Log("log", tuple(r.item for r in results if r.rows_filtered))],
                           write_log, Resources())
        if not self.config.keep_intermediate:
            from pipeline.integrity import remove_intermediates
            remove_intermediates(run.layout, {"decontaminate/removals"})
        self.finish(run, results)
        return results

    def finish(self, run: Run, results: list[Result]) -> None:
        rows = {r.item: r.data["rows"] for r in results}
        run.documents_now_in("decontaminate", rows)
        run.say(f"decontaminate: removed {sum(r.rows_filtered for r in results)} of "
                f"{sum(r.rows_in for r in results)} documents (decontaminate/removed.jsonl)")
