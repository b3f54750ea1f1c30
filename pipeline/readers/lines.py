"""Cutting a byte stream into blocks of whole lines (JSON Lines and text, one doc a line).

A block is cut at the last newline before `chunk_bytes` bytes (or, for a line longer than
that, right after it): the cut points depend only on the content, never on how the stream
was split into reads, so the same file always gives the same blocks. JSON Lines makes one
chunk of each block. Lines are split on b"\n" only: a CRLF line keeps its "\r", which JSON
ignores and the text reader drops.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from pipeline.readers.blocks import TruncatedInput


@dataclasses.dataclass
class LineBlock:
    data: bytes | None          # whole lines joined by b"\n", without the last line's "\n"; None: none
    first_line: int             # 1-based line number of data's first line
    cut: bool                   # True: cut at chunk_bytes (more follows); False: the end of the stream
    damage: TruncatedInput | None = None  # the stream broke after `data`: `tail` is unreadable
    tail: bytes = b""           # bytes after the last whole line before the damage
    tail_line: int = 0          # the line `tail` starts


def _copy(buf: bytearray, start: int, stop: int) -> bytes:
    with memoryview(buf) as view:  # one copy (a bytearray slice, then bytes(), would be two)
        return bytes(view[start:stop])


def line_blocks(blocks: Iterator[bytes], chunk_bytes: int, first_line: int = 1) -> Iterator[LineBlock]:
    """Blocks of whole lines from a stream of byte blocks.

    The last block (cut=False) is left out when it holds nothing but whitespace. When the
    stream raises TruncatedInput, the last block carries it in `damage`, with the lines
    before the damage in `data` and the unfinished rest in `tail`.
    """
    pending = bytearray()  # bytes not yet cut start at pending[start]; appends are amortised O(1)
    start = 0
    searched = 0  # no newline in pending[start + chunk_bytes:searched] (a line longer than a chunk)
    line_no = first_line  # line number of the line starting at pending[start]
    while True:
        try:
            data = next(blocks)
        except StopIteration:
            break
        except TruncatedInput as e:
            block = None
            cut = pending.rfind(b"\n", start)
            if cut >= 0:
                block, start = bytes(pending[start:cut]), cut + 1
            tail_line = line_no + (block.count(b"\n") + 1 if block is not None else 0)
            yield LineBlock(block, line_no, False, e, bytes(pending[start:]), tail_line)
            return
        if start:  # drop what was cut: one move per read block, not one per cut
            del pending[:start]
            searched, start = max(searched - start, 0), 0
        pending += data
        while len(pending) - start >= chunk_bytes:
            cut = pending.rfind(b"\n", start, start + chunk_bytes)
            if cut < 0:  # one line longer than a chunk: cut after it
                cut = pending.find(b"\n", max(start + chunk_bytes, searched))
                if cut < 0:
                    searched = len(pending)
                    break
            block, start = _copy(pending, start, cut), cut + 1
            yield LineBlock(block, line_no, True)
            line_no += block.count(b"\n") + 1
    rest = bytes(pending[start:])
    if rest.strip():
        yield LineBlock(rest[:-1] if rest.endswith(b"\n") else rest, line_no, False)
