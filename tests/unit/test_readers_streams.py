"""Block reader (plain, zstd, gzip), JSON error wording, and text read as a stream."""
import gzip
import json
import random
import tracemalloc

import pyarrow as pa
import pytest
import zstandard

from operators import schema as S
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers import TruncatedInput, byte_blocks, read_file

BODY = b"".join(b"line %d of the stream\n" % i for i in range(50_000))


def _compress(data: bytes, suffix: str) -> bytes:
    half = len(data) // 2  # two frames / members back to back, as `cat a.zst b.zst` makes
    if suffix == ".zst":
        c = zstandard.ZstdCompressor()
        return c.compress(data[:half]) + c.compress(data[half:])
    return gzip.compress(data[:half]) + gzip.compress(data[half:])


@pytest.mark.parametrize("suffix", [".zst", ".gz", ""])
def test_blocks_read_every_frame(tmp_path, suffix):
    path = tmp_path / f"f.txt{suffix}"
    path.write_bytes(_compress(BODY, suffix) if suffix else BODY)
    assert b"".join(byte_blocks(str(path))) == BODY


@pytest.mark.parametrize("suffix", [".zst", ".gz"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_streams_raise_after_the_good_bytes(tmp_path, suffix, damage):
    blob = _compress(BODY, suffix)
    blob = blob[:-100] if damage == "truncated" else blob + b"\x00garbage that is no frame" * 10
    path = tmp_path / f"f.txt{suffix}"
    path.write_bytes(blob)
    got = []
    with pytest.raises(TruncatedInput, match="truncated" if damage == "truncated" else "corrupt"):
        for block in byte_blocks(str(path)):
            got.append(block)
    data = b"".join(got)
    assert BODY.startswith(data) and len(data) >= (len(BODY) // 2 if damage == "truncated" else len(BODY))


def test_invalid_json_reason_names_the_column_once(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "text": "unterminated}\n{"a": "tab\there"}\n')
    chunks = list(read_file(SourceConfig(path=str(path), id_field="id"), str(path), ReadConfig()))
    reasons = [q["reason"] for c in chunks for q in c.quarantine]
    assert reasons == ["invalid JSON: Unterminated string starting at column 19",
                       "invalid JSON: Invalid control character at column 11"]
    assert not any("at at" in r for r in reasons)


def _peak_python_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_text_file_longer_than_max_doc_chars_is_quarantined_without_reading_it_all(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        for _ in range(24):
            f.write(b"a" * (1 << 20))
    result = []
    peak = _peak_python_bytes(lambda: result.extend(read_file(SourceConfig(path=str(path)), str(path),
                                                              ReadConfig(max_doc_chars=1000))))
    [chunk] = result
    assert chunk.docs.num_rows == 0 and chunk.rows_in == 1
    assert chunk.quarantine[0]["reason"].startswith("document too long: over 4000 bytes")
    assert peak < 4 << 20  # the file is 24 MiB: at most one 1 MiB block is read
    path.write_text("é" * 1000)  # 2000 bytes but 1000 characters: kept
    [chunk] = read_file(SourceConfig(path=str(path)), str(path), ReadConfig(max_doc_chars=1000))
    assert chunk.docs.column(S.ID).to_pylist() == [str(path)] and chunk.text_bytes == 1000


def test_text_lines_stream_in_bounded_chunks(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    text = "\n".join(" ".join(rng.choices(words, k=rng.randint(1, 30))) for _ in range(80_000)).encode()
    assert len(text) > 8_000_000
    path = tmp_path / "lines.txt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(text))  # about 3x smaller, like real text
    chunks = []
    peak = _peak_python_bytes(lambda: chunks.extend(
        c.quarantine for c in read_file(SourceConfig(path=str(path), text_unit="line"), str(path),
                                        ReadConfig(chunk_bytes=1 << 16))))
    assert len(chunks) > 100 and not any(chunks)
    assert peak < 4 << 20  # 1 MiB read block + pieces; the old reader held all 8 MB twice (bytes, str)


def test_text_line_chunks_end_at_chunk_bytes_characters(tmp_path):
    path = tmp_path / "t.txt"
    lines = [("é" * (i % 50 + 1)) if i % 9 else "" for i in range(5000)]
    path.write_text("\n".join(lines))
    chunk_bytes = 1 << 10
    chunks = list(read_file(SourceConfig(path=str(path), text_unit="line"), str(path),
                            ReadConfig(chunk_bytes=chunk_bytes, max_doc_chars=45)))
    docs = pa.concat_tables([c.docs for c in chunks])
    kept = [(i + 1, line) for i, line in enumerate(lines) if line and len(line) <= 45]
    assert docs.column(S.SOURCE_LINE).to_pylist() == [i for i, _ in kept]
    assert docs.column(S.TEXT).to_pylist() == [line for _, line in kept]
    for c in chunks[:-1]:  # each chunk stops at the first line that reaches chunk_bytes characters
        sizes = [len(t) for t in c.docs.column(S.TEXT).to_pylist()]
        assert sum(sizes) >= chunk_bytes > sum(sizes[:-1]) and c.text_bytes == sum(sizes)
    quarantine = [q for c in chunks for q in c.quarantine]
    assert {q["reason"] for q in quarantine} == {f"document too long: {n} characters > read.max_doc_chars=45"
                                                 for n in range(46, 51)}
    assert sum(c.rows_in for c in chunks) == len(kept) + len(quarantine) == sum(1 for line in lines if line)


def test_text_lines_quarantine_only_their_bad_lines(tmp_path):
    path = tmp_path / "mixed.txt.gz"
    path.write_bytes(gzip.compress(b"good one\nbad \xff here\n\ngood two\r\n"))
    chunks = list(read_file(SourceConfig(path=str(path), text_unit="line"), str(path), ReadConfig()))
    docs = pa.concat_tables([c.docs for c in chunks])
    assert docs.column(S.TEXT).to_pylist() == ["good one", "good two"]  # a CRLF ending is not text
    assert docs.column(S.ID).to_pylist() == [f"{path}:1", f"{path}:4"]
    [q] = [q for c in chunks for q in c.quarantine]
    assert q == {"source": str(path), "line": 2, "reason": "invalid UTF-8 at byte 4", "raw": "bad \\xff here"}


@pytest.mark.parametrize("bad_line", [False, True], ids=["column-wise", "line by line"])
def test_text_lines_end_at_crlf_and_keep_any_other_carriage_return(tmp_path, bad_line):
    """Windows line endings: the "\r" of "\r\n" ends the line as the "\n" does (Python's
    splitlines(), HF datasets' text loader), and so does one ending the file; a "\r" inside a line,
    or a second one before the "\n", is the document's own. Both paths: a block with invalid
    UTF-8 goes line by line."""
    body = b"one\r\nin\rside\r\n\r\n \r\ntwo \r\r\nlast\r" + (b"\n\xff\r\n" if bad_line else b"")
    path = tmp_path / "crlf.txt"
    path.write_bytes(body)
    chunks = list(read_file(SourceConfig(path=str(path), text_unit="line"), str(path), ReadConfig()))
    docs = pa.concat_tables([c.docs for c in chunks])
    assert docs.column(S.TEXT).to_pylist() == ["one", "in\rside", "two \r", "last"]
    assert docs.column(S.SOURCE_LINE).to_pylist() == [1, 2, 5, 6]
    assert [q["line"] for c in chunks for q in c.quarantine] == ([7] if bad_line else [])


def test_truncated_text_lines_keep_the_lines_before_the_damage(tmp_path):
    blob = zstandard.ZstdCompressor().compress(BODY)
    path = tmp_path / "cut.txt.zst"
    path.write_bytes(blob[: len(blob) // 2])
    chunks = list(read_file(SourceConfig(path=str(path), text_unit="line"), str(path), ReadConfig()))
    docs = pa.concat_tables([c.docs for c in chunks])
    quarantine = [q for c in chunks for q in c.quarantine]
    assert docs.num_rows > 1000 and docs.column(S.TEXT)[-1].as_py() == f"line {docs.num_rows - 1} of the stream"
    assert len(quarantine) == 1 and quarantine[0]["line"] == docs.num_rows + 1
    assert quarantine[0]["reason"].startswith("unreadable from this line on: zstd stream ends inside a frame")
    assert json.dumps(quarantine)  # records stay JSON-serialisable


def _read(path, **source):
    src = SourceConfig(path=str(path), **source)
    chunks = list(read_file(src, str(path), ReadConfig(chunk_bytes=1 << 12)))
    return pa.concat_tables([c.docs for c in chunks]), [q for c in chunks for q in c.quarantine]


@pytest.mark.parametrize("suffix", ["", ".zst", ".gz"])
def test_a_byte_order_mark_at_the_start_is_not_read_and_one_elsewhere_is(tmp_path, suffix):
    """Windows tools start files with a UTF-8 BOM: JSON Lines read as without it (its first row is
    not quarantined), nor do text documents begin with U+FEFF. Only the file's start is special."""
    from pipeline.readers import plan_ranges, read_range
    bom = b"\xef\xbb\xbf"
    rows = b"".join(b'{"id": %d, "text": "row %d"}\n' % (i, i) for i in range(300))
    for name, body in (("rows.jsonl", rows), ("lines.txt", b"first line\nsecond\n"), ("doc.txt", b"one document")):
        path = tmp_path / (name + suffix)
        data = bom + body
        path.write_bytes(_compress(data, suffix) if suffix else data)
        plain = tmp_path / f"plain-{name}"
        plain.write_bytes(body)
        source = {"text_field": "text", "id_field": "id"} if name.endswith("jsonl") else \
            {"text_unit": "line" if name == "lines.txt" else "file"}
        docs, quarantine = _read(path, **source)
        expected, _ = _read(plain, **source)
        assert not quarantine and docs.column(S.TEXT).equals(expected.column(S.TEXT))
        assert docs.column(S.SOURCE_LINE).equals(expected.column(S.SOURCE_LINE))
        if name == "rows.jsonl" and not suffix:   # the same file read as byte ranges
            src = SourceConfig(path=str(path), **source)
            got = [c.docs for a, b in plan_ranges(str(path), path.stat().st_size, 1000)
                   for c in read_range(src, str(path), ReadConfig(), a, b)]
            assert pa.concat_tables(got).column(S.TEXT).equals(expected.column(S.TEXT))
    inner = tmp_path / "inner.jsonl"   # a BOM inside a file (here starting line 2) is a broken row
    first = rows.index(b"\n") + 1
    inner.write_bytes(rows[:first] + bom + rows[first:])
    docs, quarantine = _read(inner, text_field="text", id_field="id")
    assert docs.num_rows == 299 and [q["line"] for q in quarantine] == [2]
