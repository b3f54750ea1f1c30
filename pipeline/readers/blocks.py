"""Bytes of an input file in blocks: one reader for plain, zstd and gzip files.

zstd and gzip streams may hold several frames/members back to back (what `cat a.zst b.zst`
or pigz writes); every one is decompressed in order. A stream that ends inside a frame or
member, or holds bytes that are not a valid frame, raises `TruncatedInput` after the bytes
decoded before the damage have been yielded, so the caller keeps them and quarantines the
rest. (zstandard's `stream_reader` returns a short read without error on a truncated file,
which would silently lose the tail: this reader tracks frame ends itself.)

Memory: one input block (`BLOCK_BYTES`) and what one `FEED_BYTES` piece of it decompresses to.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import zstandard

from pipeline import storage

BLOCK_BYTES = 1 << 20  # compressed (or plain) bytes read per call
# Compressed bytes per decompress call: the output of one call is this times the
# compression ratio (about 4x for text: 64 KiB), not the whole file of a well-compressed block.
FEED_BYTES = 1 << 14


class TruncatedInput(Exception):
    """A compressed stream ended inside a frame/member, or is corrupt."""


# name in messages, a new decompression object per frame, the errors a corrupt frame raises
_CODECS: dict[str, tuple[str, Callable, tuple[type[Exception], ...]]] = {
    ".zst": ("zstd", lambda: zstandard.ZstdDecompressor().decompressobj(), (zstandard.ZstdError,)),
    ".gz": ("gzip", lambda: zlib.decompressobj(wbits=31), (zlib.error,)),
}


def codec_of(path: str) -> str | None:
    """'.zst', '.gz' or None (plain), by the file name's extension."""
    return next((ext for ext in _CODECS if path.endswith(ext)), None)


def decompressed_blocks(raw, codec: str, block: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Decompress a multi-frame/multi-member stream read from `raw` (`.read(n)`).

    `codec`: '.zst' or '.gz'. Raises TruncatedInput when the stream ends inside a frame or
    holds corrupt data; every byte decoded before that has been yielded.
    """
    name, new_frame, errors = _CODECS[codec]
    dobj = new_frame()
    unit = "frame" if codec == ".zst" else "member"
    in_frame = False
    while data := raw.read(block):
        for at in range(0, len(data), FEED_BYTES):
            piece = data[at:at + FEED_BYTES]
            while piece:
                try:
                    out = dobj.decompress(piece)
                except errors as e:
                    raise TruncatedInput(f"{name} stream is corrupt: {e}") from None
                in_frame = not dobj.eof
                if out:
                    yield out
                if not dobj.eof:
                    break
                piece = dobj.unused_data  # the next frame starts in this piece
                dobj = new_frame()
                in_frame = False
    if in_frame:
        raise TruncatedInput(f"{name} stream ends inside a {unit} (truncated or corrupt file)")


UTF8_BOM = b"\xef\xbb\xbf"


def without_bom(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """`blocks` less a UTF-8 byte order mark at the stream's start. Windows tools write one; JSON
    forbids it (the first row would be quarantined) and a text document would begin with U+FEFF."""
    head = b""
    for data in blocks:
        head += data
        if len(head) >= len(UTF8_BOM):
            break
    else:   # the stream is shorter than a BOM
        if head:
            yield head
        return
    yield head[len(UTF8_BOM):] if head.startswith(UTF8_BOM) else head
    yield from blocks


def text_blocks(path: str, block: int = BLOCK_BYTES) -> Iterator[bytes]:
    """byte_blocks of a text file (JSON Lines, text), less a leading UTF-8 byte order mark."""
    return without_bom(byte_blocks(path, block))


def byte_blocks(path: str, block: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Decompressed bytes of a file, by extension (.zst, .gz, or plain), in blocks."""
    codec = codec_of(path)
    with storage.open_input(path) as raw:
        if codec:
            yield from decompressed_blocks(raw, codec, block)
        else:
            while data := raw.read(block):
                yield data
