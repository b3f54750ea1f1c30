"""JSON Lines (.jsonl/.json/.ndjson; plain, .gz or .zst): one object per line.

Each block of whole lines (lines.py, about `read.chunk_bytes` bytes) is one chunk. A block
takes the fast path when it can: Arrow's JSON reader parses it, columns.py validates it
column-wise, and only rejected rows are parsed again in Python to get their exact reason
(Arrow reads a missing field and an explicit null alike). Blocks the fast path cannot
take exactly (a blank line, invalid UTF-8, malformed JSON, mixed id types) go line by line.
Line numbers are 1-based and count blank lines; without an id field the id is `<file>:<line>`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from operators import schema as S
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers.blocks import text_blocks
from pipeline.readers.columns import validate_columns
from pipeline.readers.lines import line_blocks
from pipeline.readers.validate import Chunk, DocBuilder, body_fields


# A JSON escape of a UTF-16 surrogate: alone it decodes to a str that is not Unicode text.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_BRACE = ord("{")


def parse_json_line(raw: str):
    """(object, None) or (None, quarantine reason). Never raises: besides malformed JSON, Python's
    parser refuses integers over 4300 digits (ValueError) and nesting deeper than the recursion
    limit (RecursionError)."""
    try:
        return json.loads(raw), None
    except json.JSONDecodeError as e:
        return None, json_error_reason(e)
    except RecursionError:
        return None, "invalid JSON: nested deeper than the parser's recursion limit"
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion ..."
        return None, f"invalid JSON: {str(e).split(';')[0]}"


def lone_surrogate(obj, fields: list[str]) -> str | None:
    """The reason a row is not Unicode text, when a field it keeps holds a lone surrogate."""
    for field in fields:
        value = obj.get(field) if isinstance(obj, dict) else None
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"field '{field}' holds a lone surrogate \\u{ord(value[e.start]):04x} at character {e.start}"
    return None


def json_error_reason(e: json.JSONDecodeError) -> str:
    """'invalid JSON: <what> at column <n>'. Some of json's messages already end in 'at'
    ('Unterminated string starting at', 'Invalid control character at'): not twice."""
    msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg
    return f"invalid JSON: {msg} at column {e.colno}"


def _is_utf8(block: bytes) -> bool:
    """Whether the block is valid UTF-8: Arrow's check (a cast of the bytes, no copy), ~10x
    faster than decoding the block into a str only to drop it."""
    one = pa.Array.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, len(block)], np.int64)),
                                                       pa.py_buffer(block)])
    try:
        one.cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _parse_block(block: bytes, src: SourceConfig) -> pa.Table | None:
    """The block as a table of the source's fields (strings; the id a string or an integer)."""
    fields = body_fields(src)
    read_options = pajson.ReadOptions(block_size=max(1 << 20, len(block) + 1))
    for id_type in ((pa.string(), pa.int64()) if src.id_field else (None,)):
        cols = [(f, pa.string()) for f in fields] + ([(src.id_field, id_type)] if id_type else [])
        parse_options = pajson.ParseOptions(explicit_schema=pa.schema(cols), unexpected_field_behavior="ignore")
        try:
            return pajson.read_json(pa.BufferReader(block), read_options=read_options, parse_options=parse_options)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            continue
    return None


def _fast_jsonl(block: bytes, first_line: int, b: DocBuilder) -> bool:
    """Parse a block of whole lines with Arrow's JSON reader; False = use the slow path.

    Only blocks of valid UTF-8 (Arrow replaces bad UTF-8) whose every line starts with "{" take this
    path, and only when Arrow finds one row per line. Arrow skips blank and whitespace-only lines and
    reads two objects on one line as two rows, so the count alone could balance a skipped line with
    an extra row; a line starting with "{" is never skipped, so there the count proves the mapping.
    A first row that is not an object (`null`) would also crash Arrow's JSON reader (pyarrow 26.0.1:
    SIGSEGV; found by tests/unit/test_fuzz_readers.py). Indented lines go the per-line way.
    """
    data = np.frombuffer(block, np.uint8)
    line_starts = np.flatnonzero(data == 10) + 1   # every "\n" in one vectorised pass
    lines = len(line_starts) + (0 if block.endswith(b"\n") else 1)
    if not len(data) or data[0] != _BRACE or (data[line_starts[:lines - 1]] != _BRACE).any():
        return False
    if not _is_utf8(block):
        return False
    t = _parse_block(block, b.src)
    if t is None or t.num_rows != lines:
        return False
    n = t.num_rows
    v = validate_columns(t, b.src, b.path, b.max_chars, np.arange(first_line, first_line + n, dtype=np.int64))
    if v.rejected:
        # A null column value is either a missing field or an explicit null: the per-row
        # checks tell which, and give every rejected row its exact reason.
        lines = block.split(b"\n")
        probe = DocBuilder(b.src, b.path, ReadConfig(max_doc_chars=b.max_chars))
        for i, _ in v.rejected:
            raw = lines[i].decode("utf-8")
            obj, why = parse_json_line(raw)
            if why:
                probe.reject(first_line + i, why, raw)
            else:
                probe.add_object(obj, first_line + i, raw)
        if probe.cols[S.ID]:  # the per-row checks kept a row the column checks did not: per-row for all
            return False
        b.quarantine.extend(probe.quarantine)
        b.rows_in += probe.rows_in
    if v.docs is not None:  # rejected rows only go to quarantine, so the kept ones stay in line order
        b.add_table(v.docs, v.text_bytes)
    return True


def _slow_jsonl(block: bytes, first_line: int, b: DocBuilder) -> None:
    for i, raw_bytes in enumerate(block.split(b"\n")):
        if not raw_bytes.strip():
            continue  # blank lines hold no row
        where = first_line + i
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            b.reject(where, f"invalid UTF-8 at byte {e.start}", raw_bytes.decode("utf-8", "backslashreplace"))
            continue
        obj, why = parse_json_line(raw)
        if why is None and _SURROGATE_ESCAPE.search(raw_bytes):
            why = lone_surrogate(obj, body_fields(b.src) + ([b.src.id_field] if b.src.id_field else []))
        if why:
            b.reject(where, why, raw)
            continue
        b.add_object(obj, where, raw)


def read_jsonl_stream(source: SourceConfig, path: str, read_cfg: ReadConfig, blocks: Iterator[bytes],
                      first_line: int = 1) -> Iterator[Chunk]:
    """Chunks of a JSON Lines byte stream whose first byte starts line `first_line`.

    A truncated stream keeps every whole line before the damage; the rest is one
    quarantined row, 'unreadable from this line on: <why>'.
    """
    b = DocBuilder(source, path, read_cfg)
    for lb in line_blocks(blocks, read_cfg.chunk_bytes, first_line):
        if lb.damage is not None:
            if lb.data is not None:
                _slow_jsonl(lb.data, lb.first_line, b)
            b.reject(lb.tail_line, f"unreadable from this line on: {lb.damage}",
                     lb.tail.decode("utf-8", "backslashreplace") or None)
            break
        if not _fast_jsonl(lb.data, lb.first_line, b):
            _slow_jsonl(lb.data, lb.first_line, b)
        if lb.cut:
            yield b.take()
    if b.rows_in or b.quarantine:
        yield b.take()


def read_jsonl(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    return read_jsonl_stream(source, path, read_cfg, text_blocks(path))
