"""Readers: source files -> document tables (operators.schema.DOC_SCHEMA).

Formats, one module each:
  jsonl.py    JSON Lines (.jsonl/.json/.ndjson), plain, .gz or .zst; Arrow's JSON reader
              with column-wise checks, per line only for blocks it cannot take exactly
  parquet.py  Parquet, batches of 4096 rows checked column-wise
  text.py     .txt/.md: one document per file (`text_unit: file`) or per line (`line`)
  hf.py       HF datasets: `save_to_disk` directories and `load_dataset` specs `hf:<name>`
Shared: blocks.py (one block reader for plain, multi-frame zstd and multi-member gzip,
raising TruncatedInput on a truncated or corrupt stream), lines.py (blocks of whole lines),
validate.py (the per-row checks and reasons, the chunk builder), columns.py (the same
checks with Arrow compute), ranges.py (byte ranges of plain line files).

Chunking: `read_file` yields bounded chunks, so memory stays flat however large the file.
A JSON Lines chunk is a block of whole lines cut at the last newline before
`read.chunk_bytes` bytes; a text-line, Parquet or HF chunk ends once its kept text reaches
`read.chunk_bytes` characters (after a line, resp. a batch). The cut points depend on the
content only, so a file always gives the same chunks. Ids without an id field:
`<file>:<line>` (1-based, blank lines counted) or `<file>:<row>` (0-based); a text file's id
is `<file>`. A UTF-8 byte order mark at the start of a JSON Lines or text file is skipped.

Quarantine: rows that cannot be read become records {source, line|row, reason, raw?}
instead of being dropped (reasons listed in validate.py; malformed JSON, invalid UTF-8 and
the unreadable tail of a truncated .zst/.gz add theirs); rows_in = rows_out +
rows_quarantined in every chunk.

Ranges: `read_range(source, path, read_cfg, start, end)` reads the lines that start in
bytes [start, end) of a plain .jsonl or text-line file, with global line numbers; reading
every range of `plan_ranges(path, size, range_bytes)` in order gives what reading the
file whole gives. See ranges.py for the cost of line numbering.
"""
from __future__ import annotations

from collections.abc import Iterator

from pipeline import storage
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers.blocks import TruncatedInput, byte_blocks
from pipeline.readers.hf import read_hf
from pipeline.readers.jsonl import read_jsonl
from pipeline.readers.parquet import read_parquet
from pipeline.readers.ranges import newlines_before, plan_ranges, read_range
from pipeline.readers.text import read_text
from pipeline.readers.validate import Chunk

__all__ = ["Chunk", "READERS", "TruncatedInput", "byte_blocks", "expand_source", "newlines_before",
           "plan_ranges", "read_file", "read_range"]

READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text,
           "hf_disk": read_hf, "hf": read_hf}


def expand_source(source: SourceConfig) -> list[str]:
    """The input files of a source, sorted (HF specs are one input)."""
    if source.resolved_format == "hf":
        return [source.path]
    if not source.is_glob and source.resolved_format == "hf_disk":
        return [source.path] if storage.exists(source.path) else []
    return storage.glob(source.path)


def read_file(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    """Chunks of one input file (or HF dataset), in order."""
    return READERS[source.format_of(path)](source, path, read_cfg)
