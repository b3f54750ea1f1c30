"""Byte ranges of plain line files, so one large input can be read as parallel pieces.

For uncompressed JSON Lines (.jsonl/.json/.ndjson) and text read with `text_unit: line`.
A range [start, end) reads the lines that START in it: a line that starts before `start`
belongs to the previous range, and a range reads past `end` to finish its last line.
Reading every range of `plan_ranges` in order gives exactly the documents, ids,
source_line values and quarantine records of reading the whole file, in the same order
(tests/unit/test_readers_ranges.py checks every split point of small files); only the chunk
boundaries differ, since each range chunks on its own.

Line numbers: a range that does not start at 0 needs the number of newlines before it.
Without `lines_before`, `read_range` counts them itself by reading [0, start) in 1 MiB
blocks with `bytes.count(b"\\n")`, measured 0.8-1.1 GB/s from the page cache on the 2-core
dev machine (benchmarks/bench_readers.py): about 1 s per GB before `start`. Reading all N
ranges of a file that way reads about N/2 times the file. `newlines_before(path, starts)`
counts them for every range in one sequential pass; pass each as `lines_before` and every
range reads only its own bytes.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from pipeline import storage
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers.blocks import BLOCK_BYTES, codec_of, without_bom
from pipeline.readers.jsonl import read_jsonl_stream
from pipeline.readers.text import read_text_lines
from pipeline.readers.validate import Chunk


def _check_plain(path: str) -> None:
    if codec_of(path):
        raise ValueError(f"{path}: byte ranges need an uncompressed file (a compressed stream "
                         f"cannot be entered in the middle); read it whole with read_file")


def plan_ranges(path: str, size: int, range_bytes: int) -> list[tuple[int, int]]:
    """[(start, end)] byte ranges of `range_bytes` covering a plain file of `size` bytes
    ([] for an empty file). Raises ValueError for a compressed file."""
    _check_plain(path)
    if range_bytes < 1:
        raise ValueError(f"range_bytes must be at least 1, got {range_bytes}")
    return [(s, min(s + range_bytes, size)) for s in range(0, size, range_bytes)]


def newlines_before(path: str, offsets: Sequence[int]) -> list[int]:
    """The number of b"\\n" bytes in [0, offset) for each offset, in one pass over the file."""
    counts: dict[int, int] = {}
    pos = num = 0
    with storage.open_input(path) as f:
        for target in sorted(set(offsets)):
            while pos < target and (data := f.read(min(BLOCK_BYTES, target - pos))):
                num += data.count(b"\n")
                pos += len(data)
            counts[target] = num
    return [counts[o] for o in offsets]


def _count_newlines(f, stop: int) -> int:
    f.seek(0)
    num = pos = 0
    while pos < stop and (data := f.read(min(BLOCK_BYTES, stop - pos))):
        num += data.count(b"\n")
        pos += len(data)
    return num


def _first_line_start(f, start: int, lines_before: int | None) -> tuple[int, int]:
    """(offset of the first line starting at or after `start`, its 1-based line number)."""
    if start == 0:
        return 0, 1
    if lines_before is None:
        before = _count_newlines(f, start - 1)  # newlines in [0, start - 1)
    else:
        f.seek(start - 1)
        before = lines_before - (f.read(1) == b"\n")
    f.seek(start - 1)
    pos = start - 1
    while data := f.read(BLOCK_BYTES):
        k = data.find(b"\n")
        if k >= 0:  # the line after this newline is the first one that starts in the range
            return pos + k + 1, before + 2
        pos += len(data)
    return pos, before + 1  # no newline after start - 1: no line starts in the range


def _range_blocks(f, first: int, end: int) -> Iterator[bytes]:
    """Bytes from `first` through the newline that ends the line holding byte end - 1."""
    f.seek(first)
    pos = first
    while data := f.read(BLOCK_BYTES):
        if pos + len(data) >= end:  # holds byte end - 1, or lies past it
            k = data.find(b"\n", max(end - 1 - pos, 0))
            if k >= 0:
                yield data[:k + 1]
                return
        yield data
        pos += len(data)


def read_range(source: SourceConfig, path: str, read_cfg: ReadConfig, start: int, end: int, *,
               lines_before: int | None = None) -> Iterator[Chunk]:
    """Chunks of the lines that start in bytes [start, end) of a plain line file.

    `lines_before`: the number of newlines in [0, start) if known (`newlines_before`);
    otherwise this counts them by reading [0, start). Raises ValueError for a compressed
    file or a format that is not one record per line.
    """
    fmt = source.format_of(path)
    _check_plain(path)
    if fmt == "jsonl":
        reader = read_jsonl_stream
    elif fmt == "text" and source.text_unit == "line":
        reader = read_text_lines
    else:
        raise ValueError(f"{path}: byte ranges read one record per line (JSON Lines, or text "
                         f"with text_unit: line), not format {fmt!r} with text_unit {source.text_unit!r}")
    if not 0 <= start <= end:
        raise ValueError(f"{path}: bad byte range [{start}, {end})")

    def chunks() -> Iterator[Chunk]:
        with storage.open_random_access(path) as f:
            first, first_line = _first_line_start(f, start, lines_before)
            if first < end:
                blocks = _range_blocks(f, first, end)
                yield from reader(source, path, read_cfg, without_bom(blocks) if first == 0 else blocks, first_line)

    return chunks()
