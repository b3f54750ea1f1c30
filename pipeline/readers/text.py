"""Plain text (.txt/.md; plain, .gz or .zst): one document per file or per line.

`text_unit: line` streams: blocks of whole lines (lines.py) are split, checked and kept
column-wise with Arrow; each non-blank line is a document with id `<file>:<line>` (1-based,
blank lines counted), and a chunk ends after the line that brings its kept text to
`read.chunk_bytes` characters. A line ends at "\n" or "\r\n" (the "\r" of a CRLF ending is not
text, nor one "\r" ending the file; a "\r" elsewhere is). A block with invalid UTF-8 goes line by line, so only its bad
lines are quarantined. Python heap: about 3 x chunk_bytes (pending bytes, the block, one
read) plus the longest line; measured 26 MB at the 8 MiB default, the same for 17 and 50 MB files.

`text_unit: file` holds one document, the whole file, id `<file>`: it reads at most
4 * read.max_doc_chars bytes (+ one read block) before deciding, because a longer file
cannot decode to max_doc_chars characters or fewer (UTF-8 uses at most 4 bytes a character).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers.blocks import TruncatedInput, text_blocks
from pipeline.readers.lines import line_blocks
from pipeline.readers.validate import Chunk, DocBuilder, too_long


def _split_lines(data: bytes) -> pa.Array | None:
    """The lines of `data` as a string array; None when it is not valid UTF-8 (or over 2 GiB)."""
    if len(data) >= 1 << 31:
        return None
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64))
    whole = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])  # no copy
    lines = pc.list_flatten(pc.split_pattern(whole, b"\n"))
    if b"\r" in data:  # a CRLF file (data holds no line's "\n": its "\r" is each line's last byte)
        lines = pc.replace_substring_regex(lines, "\r$", "", max_replacements=1)
    try:
        return lines.cast(pa.string())  # validates UTF-8
    except pa.ArrowInvalid:
        return None


def _add_lines(data: bytes, first_line: int, b: DocBuilder, chunk_bytes: int) -> Iterator[Chunk]:
    """Keep the non-blank lines of a block, yielding a chunk whenever kept text reaches chunk_bytes."""
    lines = _split_lines(data)
    if lines is None:
        yield from _add_lines_one_by_one(data, first_line, b, chunk_bytes)
        return
    n = len(lines)
    where = np.arange(first_line, first_line + n, dtype=np.int64)
    size = pc.utf8_length(lines).to_numpy().astype(np.int64)
    nonblank = (size > 0) & ~pc.utf8_is_space(lines).to_numpy(zero_copy_only=False)  # as Python's line.strip()
    long_ = nonblank & (size > b.max_chars)
    kept = nonblank & ~long_
    cum = np.cumsum(np.where(kept, size, 0))
    pos, done = 0, 0  # next row; kept characters before it
    while pos < n:
        # the row after which the chunk reaches chunk_bytes (n: not in this block)
        end = int(np.searchsorted(cum, done + chunk_bytes - b.text_bytes, side="left"))
        stop = min(end + 1, n)
        for i in np.flatnonzero(long_[pos:stop]).tolist():
            b.reject(int(where[pos + i]), too_long(int(size[pos + i]), b.max_chars), lines[pos + i].as_py())
        keep = kept[pos:stop]
        if keep.any():
            ln = pa.array(where[pos:stop])
            docs = pa.table({S.ID: pc.binary_join_element_wise(b.path, pc.cast(ln, pa.string()), ":"),
                             S.TEXT: lines[pos:stop], S.PROMPT: pa.nulls(stop - pos, pa.string()),
                             S.RESPONSE: pa.nulls(stop - pos, pa.string()),
                             S.SOURCE: pa.array([b.path] * (stop - pos), pa.string()), S.SOURCE_LINE: ln},
                            schema=S.DOC_SCHEMA)
            b.add_table(docs.filter(pa.array(keep)), int(size[pos:stop][keep].sum()))
        if end < n:
            yield b.take()
        done, pos = int(cum[stop - 1]), stop


def _add_lines_one_by_one(data: bytes, first_line: int, b: DocBuilder, chunk_bytes: int) -> Iterator[Chunk]:
    for i, raw in enumerate(data.split(b"\n"), start=first_line):
        raw = raw.removesuffix(b"\r")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            b.reject(i, f"invalid UTF-8 at byte {e.start}", raw.decode("utf-8", "backslashreplace"))
            continue
        if line.strip():
            b.add(f"{b.path}:{i}", line, None, None, i, line)
            if b.text_bytes >= chunk_bytes:
                yield b.take()


def read_text_lines(source: SourceConfig, path: str, read_cfg: ReadConfig, blocks: Iterator[bytes],
                    first_line: int = 1) -> Iterator[Chunk]:
    """Chunks of a text byte stream, one document per non-blank line; its first byte starts
    line `first_line`. A truncated stream keeps the whole lines before the damage; the rest
    is one quarantined row, 'unreadable from this line on: <why>'."""
    b = DocBuilder(source, path, read_cfg)
    for lb in line_blocks(blocks, read_cfg.chunk_bytes, first_line):
        if lb.data is not None:
            yield from _add_lines(lb.data, lb.first_line, b, read_cfg.chunk_bytes)
        if lb.damage is not None:
            b.reject(lb.tail_line, f"unreadable from this line on: {lb.damage}",
                     lb.tail.decode("utf-8", "backslashreplace") or None)
    if b.rows_in:
        yield b.take()


def _read_text_file(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    b = DocBuilder(source, path, read_cfg)
    limit = 4 * read_cfg.max_doc_chars
    parts, num_bytes = [], 0
    blocks = text_blocks(path)
    try:
        for data in blocks:
            parts.append(data)
            num_bytes += len(data)
            if num_bytes > limit:
                break
    except TruncatedInput as e:
        b.reject(1, str(e), None)
        yield b.take()
        return
    finally:
        blocks.close()
    if num_bytes > limit:
        b.reject(1, f"document too long: over {limit} bytes, so more than read.max_doc_chars="
                    f"{read_cfg.max_doc_chars} characters", None)
        yield b.take()
        return
    data = b"".join(parts)
    del parts
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        b.reject(1, f"invalid UTF-8 at byte {e.start}", data.decode("utf-8", "backslashreplace"))
        yield b.take()
        return
    b.add(path, text, None, None, 1, text)
    yield b.take()


def read_text(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    if source.text_unit == "line":
        return read_text_lines(source, path, read_cfg, text_blocks(path))
    return _read_text_file(source, path, read_cfg)
