"""plain: the fused fast path, read → validate → tokenize → pack → write in one task per input range.

Runs instead of read, tokenize and pack when no stage between reading and packing needs the
documents as a whole (no filters, embed, cluster, mixture or select; `fused: false` turns it
off). No intermediate file is written: each task streams its input through the readers in
`read.chunk_bytes` chunks, tokenizes every chunk for every tokenizer, and packs and writes a
shard whenever a tokenizer has gathered `output.shard_bytes` of packed data (or
`output.shard_rows` rows), so shard size is set by the output, not by the work unit.

Items: an uncompressed JSON Lines or text-line file is cut into `read.range_bytes` byte ranges
at line boundaries (pipeline/readers/ranges.py; global line numbers come from one newline count
in the driver); a compressed, Parquet or HF input is one item. Shards are named
`shard-<item>-<k>.arrow` (item = the range's index in input order, k = its k-th shard), so a
re-run or a resume writes the same files with the same bytes.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from pipeline import readers, sink, storage
from pipeline.config import ConfigError
from pipeline.layout import reason_key
from pipeline.readers.blocks import codec_of
from pipeline.stages.base import Context, Item, Result, Run, Stage, report_quarantine
from pipeline.tokenizer_cache import get_tokenizer

PACKED_BYTES_PER_TOKEN = 10  # input_ids 4 + position_ids 4 + two masks 1 + 1, before compression


@dataclasses.dataclass(frozen=True)
class InputRange(Item):
    index: int            # position in input order: names the shards
    source: int
    path: str
    start: int = 0
    end: int | None = None  # None: the whole file
    lines_before: int = 0


class _ShardWriter:
    """Gathers one tokenizer's tokenized documents and writes a shard per `output.shard_*`."""

    def __init__(self, ctx: Context, tokenizer: str, pad_id: int, index: int):
        self.ctx, self.tokenizer, self.pad_id, self.index = ctx, tokenizer, pad_id, index
        out = ctx.config.output
        seq_len = ctx.config.pack.seq_len
        self.budget = out.shard_rows * seq_len if out.shard_rows else max(seq_len, out.shard_bytes // PACKED_BYTES_PER_TOKEN)
        self.tables: list[pa.Table] = []
        self.tokens = 0
        self.shards: list[dict] = []

    def add(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.tokens += int(pc.sum(table.column(S.NUM_TOKENS)).as_py() or 0)
        if self.tokens >= self.budget:
            self.flush()

    def flush(self) -> None:
        if not self.tables:
            return
        docs = pa.concat_tables(self.tables)
        self.tables, self.tokens = [], 0
        c = self.ctx.config
        file = f"shard-{self.index:05d}-{len(self.shards):04d}.arrow"
        record = sink.write_shard(self.ctx.layout.shard_dir(self.tokenizer), file, docs, pack=c.pack,
                                  output=c.output, pad_id=self.pad_id)
        self.shards.append(record)


def _chunks(ctx: Context, item: InputRange):
    source = ctx.config.sources[item.source]
    if item.end is None:
        return readers.read_file(source, item.path, ctx.config.read)
    return readers.read_range(source, item.path, ctx.config.read, item.start, item.end,
                              lines_before=item.lines_before)


class Plain(Stage):
    name = "plain"
    adds = tuple(S.DOC_SCHEMA.names) + (S.INPUT_IDS, S.TARGET_MASK, S.NUM_TOKENS)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.plain_path

    def plan(self, run: Run) -> list[InputRange]:
        items = []
        for s, src in enumerate(self.config.sources):
            paths = readers.expand_source(src)
            if not paths:
                raise ConfigError(f"sources.{s}.path: no input matches {src.path!r}")
            for path in paths:
                fmt = src.format_of(path)
                lines = fmt == "jsonl" or (fmt == "text" and src.text_unit == "line")
                size = storage.file_size(path) if lines and not codec_of(path) else None
                if size is None or size <= self.config.read.range_bytes:
                    items.append(InputRange(f"r{len(items):05d}", len(items), s, path))
                    continue
                pieces = -(-size // self.config.read.range_bytes)  # equal ranges: no straggler at the end
                ranges = readers.plan_ranges(path, size, -(-size // pieces))
                before = readers.newlines_before(path, [a for a, _ in ranges])
                for (a, b), n in zip(ranges, before):
                    items.append(InputRange(f"r{len(items):05d}", len(items), s, path, a, b, n))
        # Largest first: the last tasks are then small, and no core idles long at the end.
        return sorted(items, key=lambda it: -((it.end or 0) - it.start))

    @staticmethod
    def work(ctx: Context, item: InputRange) -> Result:
        config, layout = ctx.config, ctx.layout
        tokenizers = [(t.name, get_tokenizer(config, i, ctx.verified)) for i, t in enumerate(config.tokenize.tokenizers)]
        writers = [_ShardWriter(ctx, name, op.tok.pad_id, item.index) for name, op in tokenizers]
        quarantine, rows_in, rows_out, text_bytes = [], 0, 0, 0
        n = config.tokenize.docs_per_batch
        for chunk in _chunks(ctx, item):
            rows_in += chunk.rows_in
            rows_out += chunk.docs.num_rows
            text_bytes += chunk.text_bytes
            quarantine.extend(chunk.quarantine)
            for (_, op), writer in zip(tokenizers, writers):
                for start in range(0, chunk.docs.num_rows, n):
                    writer.add(op(chunk.docs.slice(start, n)))
        for w in writers:
            w.flush()
        layout.write_quarantine(f"plain-{item.name}", quarantine)
        no_tokens = max(rows_out - sum(s["stats"]["docs"] for s in w.shards) for w in writers) if writers else 0
        return Result(item.name, rows_in=rows_in, rows_out=rows_out - no_tokens, rows_filtered=no_tokens,
                      rows_quarantined=len(quarantine),
                      reasons=dict(Counter(reason_key(q["reason"]) for q in quarantine)),
                      data={"path": item.path, "bytes_in": text_bytes,
                            "shards": {w.tokenizer: w.shards for w in writers}})

    def finish(self, run: Run, results: list[Result]) -> None:
        report_quarantine(run, results)
        for t in self.config.tokenize.tokenizers:
            run.shards[t.name] = [{"item": r.item, **s} for r in results for s in r.data["shards"][t.name]]
        if not any(r.rows_in for r in results):
            run.say("warning: no documents were read from the sources "
                    f"({', '.join(s.path for s in self.config.sources)}); the shards are empty")
