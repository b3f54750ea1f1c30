"""The work of one item of each stage: what a Ray task or actor runs.

Nothing here imports ray. Every item writes its outputs atomically, then a
`done/<item>.json` marker holding its counts; the runner skips items whose
marker exists, which is what makes a killed run resumable without redoing
finished work. Counts balance per item: rows_in = rows_out + rows_filtered +
rows_quarantined.
"""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa

from operators import schema as S
from operators.pack import pack_table
from operators.tokenize import Tokenize
from operators.windows import join_windows, split_long_documents
from pipeline import readers, sink, storage
from pipeline.config import Config

INTERMEDIATE_COMPRESSION = "lz4"  # parts between stages: fast, not the product


class RunLayout:
    """Where each stage keeps its files inside run_dir."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def path(self, *parts: str) -> str:
        return storage.join(self.run_dir, *parts)

    def stage_dir(self, stage: str) -> str:
        return self.path(*stage.split("/"))

    def done_marker(self, stage: str, item: str) -> str:
        return self.path(*stage.split("/"), "done", f"{item}.json")

    def stage_marker(self, stage: str) -> str:
        return self.path(*stage.split("/"), "_SUCCESS.json")

    def part(self, stage: str, name: str) -> str:
        return self.path(*stage.split("/"), "parts", f"{name}.arrow")

    def shard_dir(self, tokenizer: str) -> str:
        return self.path("shards", tokenizer)

    def quarantine(self, name: str) -> str:
        return self.path("quarantine", f"{name}.jsonl")


def write_marker(path: str, result: dict) -> None:
    storage.write_text_atomic(path, json.dumps(result, sort_keys=True) + "\n")


def read_marker(path: str) -> dict:
    return json.loads(storage.read_text(path))


def _write_quarantine(layout: RunLayout, name: str, records: list[dict]) -> None:
    if records:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        storage.write_text_atomic(layout.quarantine(name), body)


# --- read ---------------------------------------------------------------------------

def read_item(config: Config, run_dir: str, item: dict) -> dict:
    """Read one input file into parts `read/parts/<item>-<chunk>.arrow`."""
    layout = RunLayout(run_dir)
    source = config.sources[item["source"]]
    parts, quarantine = [], []
    rows_in = rows_out = 0
    for k, chunk in enumerate(readers.read_file(source, item["path"], config.read)):
        rows_in += chunk.rows_in
        quarantine.extend(chunk.quarantine)
        if chunk.docs.num_rows:
            name = f"{item['name']}-{k:05d}"
            sink.write_table(layout.part("read", name), chunk.docs, compression=INTERMEDIATE_COMPRESSION,
                             rows_per_batch=1 << 16)
            parts.append({"name": name, "rows": chunk.docs.num_rows, "bytes": chunk.text_bytes})
            rows_out += chunk.docs.num_rows
    _write_quarantine(layout, f"read-{item['name']}", quarantine)
    result = {"item": item["name"], "path": item["path"], "parts": parts, "rows_in": rows_in, "rows_out": rows_out,
              "rows_filtered": 0, "rows_quarantined": len(quarantine),
              "quarantine_reasons": dict(Counter(reason_key(q["reason"]) for q in quarantine))}
    write_marker(layout.done_marker("read", item["name"]), result)
    return result


def reason_key(reason: str) -> str:
    """Group reasons for counting: the text before the first detail."""
    return reason.split(":")[0].split(" at ")[0]


# --- tokenize -----------------------------------------------------------------------

_TOKENIZERS: dict[tuple, Tokenize] = {}  # one load per worker process


def get_tokenizer(config: Config, index: int) -> Tokenize:
    t = config.tokenize.tokenizers[index]
    key = (t.spec, t.add_bos, t.add_eos, t.chat_template)
    if key not in _TOKENIZERS:
        op = Tokenize(spec=t.spec, add_bos=t.add_bos, add_eos=t.add_eos, chat_template=t.chat_template,
                      read_bytes=storage.read_bytes, exists=storage.exists)
        op.setup()
        _TOKENIZERS[key] = op
    return _TOKENIZERS[key]


def _documents_for_tokenize(config: Config, layout: RunLayout, part: str) -> tuple[pa.Table, int]:
    """A read part, with cluster_id/domain_id joined when clustering ran; documents of
    pruned clusters (null domain) are left out and counted as filtered."""
    docs = sink.read_table(layout.part("read", part))
    if config.cluster is None:
        return docs, 0
    from pipeline.climb import domain_columns
    for name, column in domain_columns(layout, part).items():
        docs = docs.append_column(name, column)
    kept = docs.filter(pa.compute.is_valid(docs.column(S.DOMAIN_ID)))
    return kept, docs.num_rows - kept.num_rows


def tokenize_item(config: Config, run_dir: str, item: dict) -> dict:
    """Tokenize one read part for each tokenizer still to do; pack it too when `item["pack"]`.

    Reading the part once for every tokenizer, and packing straight from memory
    when no model stage sits between tokenize and pack, keeps the pipeline close
    to the raw tokenizer's speed (benchmarks/bench_tokenize_pack.py).
    """
    layout = RunLayout(run_dir)
    docs = None
    results = {}
    for t in item["tokenizers"]:
        name = config.tokenize.tokenizers[t].name
        tok_marker = layout.done_marker(f"tokenize/{name}", item["name"])
        pack_marker = layout.done_marker(f"pack/{name}", item["name"])
        pack_inline = t in item["pack"]
        if storage.exists(tok_marker) and (not pack_inline or storage.exists(pack_marker)):
            continue
        if docs is None:
            docs, pruned = _documents_for_tokenize(config, layout, item["name"])
        op = get_tokenizer(config, t)
        n = config.tokenize.docs_per_batch
        pieces, rejected = [], []
        for start in range(0, docs.num_rows, n):
            table, rej = op.tokenize(docs.slice(start, n))
            pieces.append(table)
            rejected.extend({"id": i, "reason": r} for i, r in zip(rej.ids, rej.reasons))
        out = pa.concat_tables(pieces) if pieces else op.tokenize(docs.slice(0, 0))[0]
        _write_quarantine(layout, f"tokenize-{name}-{item['name']}", rejected)
        if pack_inline:
            pack_result = pack_docs(config, layout, name, op.tok.pad_id, item, out)
        else:
            sink.write_table(layout.part(f"tokenize/{name}", item["name"]), out,
                             compression=INTERMEDIATE_COMPRESSION, rows_per_batch=1 << 16)
        result = {"item": item["name"], "rows_in": docs.num_rows + pruned, "rows_out": out.num_rows,
                  "rows_filtered": pruned, "rows_quarantined": len(rejected),
                  "tokens": int(pa.compute.sum(out.column(S.NUM_TOKENS)).as_py() or 0)}
        write_marker(tok_marker, result)
        if pack_inline:
            write_marker(pack_marker, pack_result)
        results[name] = result
    return {"item": item["name"], "tokenizers": results}


# --- select -------------------------------------------------------------------------

class SelectWorker:
    """One actor of the select stage: loads the two models once, then scores parts.

    Documents are scored `select.docs_per_batch` at a time, so Rho-1's top-ratio
    is taken over a fixed, deterministic batch of target tokens. Documents
    within the first `select.warmup_docs` (in corpus order) use gamma = 0.
    Documents longer than the models' context are scored in independent windows
    (operators/windows.py) instead of failing the stage.
    """

    def __init__(self, *, config: Config, run_dir: str):
        from operators.score import TokenScorer  # torch is imported only where models run
        c = config.select
        self.config, self.layout = config, RunLayout(run_dir)
        self.scorer = TokenScorer(current_model=c.current_model, other_model=c.other_model, method=c.method,
                                  device=c.device, dtype=c.dtype, batch_tokens=c.batch_tokens,
                                  trust_remote_code=c.trust_remote_code, gamma=c.gamma, ratio=c.ratio)
        self.scorer.setup()

    def __call__(self, item: dict) -> dict:
        import dataclasses
        name, layout, c = item["tokenizer_name"], self.layout, self.config.select
        docs = sink.read_table(layout.part(item.get("input_stage", f"tokenize/{name}"), item["name"]))
        base, warm = self.scorer.config, dataclasses.replace(self.scorer.config, warmup=True)
        pieces = []
        for start in range(0, docs.num_rows, c.docs_per_batch):
            batch = docs.slice(start, c.docs_per_batch)
            n_warm = min(batch.num_rows, max(0, c.warmup_docs - item["first_doc"] - start))
            for sub, cfg in ((batch.slice(0, n_warm), warm), (batch.slice(n_warm), base)):
                if sub.num_rows:
                    self.scorer.config = cfg
                    windows, n_win = split_long_documents(sub, self.scorer.max_len or (1 << 31))
                    pieces.append(join_windows(sub, self.scorer(windows), n_win))
        self.scorer.config = base
        # An empty part (every document pruned or filtered upstream) still gets the columns.
        out = pa.concat_tables(pieces) if pieces else self.scorer(docs)
        sink.write_table(layout.part(f"select/{name}", item["name"]), out, compression=INTERMEDIATE_COMPRESSION,
                         rows_per_batch=1 << 16)
        target = int(pa.compute.sum(pa.compute.list_flatten(out.column(S.TARGET_MASK))).as_py() or 0)
        kept = int(pa.compute.sum(pa.compute.list_flatten(out.column(S.LOSS_MASK))).as_py() or 0)
        from pipeline.climb import worker_identity
        result = {"item": item["name"], "rows_in": docs.num_rows, "rows_out": out.num_rows, "rows_filtered": 0,
                  "rows_quarantined": 0, "target_tokens": target, "loss_tokens": kept, "worker": worker_identity()}
        write_marker(layout.done_marker(f"select/{name}", item["name"]), result)
        return result


# --- pack ---------------------------------------------------------------------------

def pack_docs(config: Config, layout: RunLayout, name: str, pad_id: int, item: dict, docs: pa.Table) -> dict:
    """Pack tokenized documents into `shards/<name>/shard-<index>.arrow`; returns the pack counts."""
    rows, stats = pack_table(docs, seq_len=config.pack.seq_len, pad_id=pad_id, method=config.pack.method)
    shard = f"shard-{item['shard']:05d}.arrow"
    written = sink.write_table(storage.join(layout.shard_dir(name), shard), rows,
                               compression=config.output.compression, rows_per_batch=config.output.rows_per_batch,
                               level=config.output.compression_level)
    return {"item": item["name"], "file": shard, "rows_in": docs.num_rows, "rows_out": stats.docs,
            "rows_filtered": docs.num_rows - stats.docs,  # documents with no token at all
            "rows_quarantined": 0, **written, "stats": stats.__dict__}


def pack_item(config: Config, run_dir: str, item: dict) -> dict:
    """Pack one part of an earlier stage's output (used when a model stage sits before pack)."""
    layout = RunLayout(run_dir)
    docs = sink.read_table(layout.part(item["input_stage"], item["name"]))
    result = pack_docs(config, layout, item["tokenizer_name"], item["pad_id"], item, docs)
    write_marker(layout.done_marker(f"pack/{item['tokenizer_name']}", item["name"]), result)
    return result
