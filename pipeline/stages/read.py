"""read: every input file -> validated document parts `read/parts/<input>-<chunk>.arrow`.

One item per input file. Rows that cannot be read go to `quarantine/read-<input>.jsonl` with
their source location and reason (pipeline/readers); a part holds `read.chunk_bytes` of text.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from operators import schema as S
from pipeline import readers, sink
from pipeline.config import ConfigError
from pipeline.layout import INTERMEDIATE_COMPRESSION, reason_key
from pipeline.stages.base import Context, Item, Result, Run, Stage, report_quarantine


@dataclasses.dataclass(frozen=True)
class InputFile(Item):
    source: int      # index in config.sources
    path: str


class Read(Stage):
    name = "read"
    adds = tuple(S.DOC_SCHEMA.names)

    @classmethod
    def enabled(cls, config) -> bool:
        return not config.plain_path

    def plan(self, run: Run) -> list[InputFile]:
        items = []
        for s, src in enumerate(self.config.sources):
            paths = readers.expand_source(src)
            if not paths:  # checked before Ray started; a file can still vanish in between
                raise ConfigError(f"sources.{s}.path: no input matches {src.path!r}")
            items += [InputFile(f"s{s:03d}-f{f:05d}", s, path) for f, path in enumerate(paths)]
        return items

    @staticmethod
    def work(ctx: Context, item: InputFile) -> Result:
        config, layout = ctx.config, ctx.layout
        parts, quarantine = [], []
        rows_in = rows_out = 0
        for k, chunk in enumerate(readers.read_file(config.sources[item.source], item.path, config.read)):
            rows_in += chunk.rows_in
            quarantine.extend(chunk.quarantine)
            if chunk.docs.num_rows:
                name = f"{item.name}-{k:05d}"
                sink.write_table(layout.part("read", name), chunk.docs, compression=INTERMEDIATE_COMPRESSION,
                                 rows_per_batch=1 << 16)
                parts.append({"name": name, "rows": chunk.docs.num_rows, "bytes": chunk.text_bytes})
                rows_out += chunk.docs.num_rows
        layout.write_quarantine(f"read-{item.name}", quarantine)
        return Result(item.name, rows_in=rows_in, rows_out=rows_out, rows_quarantined=len(quarantine),
                      reasons=dict(Counter(reason_key(q["reason"]) for q in quarantine)),
                      data={"path": item.path, "parts": parts, "bytes_in": sum(p["bytes"] for p in parts)})

    def finish(self, run: Run, results: list[Result]) -> None:
        run.parts = [p for r in results for p in r.data["parts"]]
        report_quarantine(run, results)
        empty = [r.data["path"] for r in results if r.rows_in == 0]
        if empty:
            run.say(f"warning: {len(empty)} input file(s) hold no rows: {', '.join(empty[:5])}")
        if not run.parts:
            run.say("warning: no documents were read from the sources "
                    f"({', '.join(s.path for s in self.config.sources)}); nothing to tokenize")

