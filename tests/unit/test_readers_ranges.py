"""Byte ranges: reading a plain file as ranges gives exactly what reading it whole gives."""
import json

import pyarrow as pa
import pytest

from operators import schema as S
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers import newlines_before, plan_ranges, read_file, read_range

JSONL = (b'{"id": 1, "text": "alpha"}\n'
         b'\n'                                              # blank: no row, but a line number
         b'{"id": 2, "text": "unterminated}\n'              # malformed
         b'{"id": 3, "text": "bad \xff utf8"}\n'
         b'{"id": 4, "text": "   "}\n'
         b'{"id": 5, "text": "' + b"long " * 12 + b'"}\n'   # over max_doc_chars
         b'{"id": 6, "text": "caf\xc3\xa9"}\n'
         b'{"id": 7, "text": "last, no newline"}')
TEXT = b"first line\n\n   \nsecond \xe2\x80\x94 line\nthird line " + b"x" * 40 + b"\nbad \xff byte\nend"
CASES = {
    "mixed.jsonl": (JSONL, dict(text_field="text", id_field="id")),
    "crlf.jsonl": (JSONL.replace(b"\n", b"\r\n"), dict(text_field="text", id_field="id")),
    "noid.jsonl": (JSONL + b"\n", dict()),
    "lines.txt": (TEXT, dict(text_unit="line")),
    "crlf.txt": (TEXT.replace(b"\n", b"\r\n") + b"\r\n", dict(text_unit="line")),
}
CFG = ReadConfig(max_doc_chars=40, chunk_bytes=1 << 10)


def _collect(chunks):
    chunks = list(chunks)
    docs = pa.concat_tables([c.docs for c in chunks]) if chunks else S.DOC_SCHEMA.empty_table()
    return docs, [q for c in chunks for q in c.quarantine], sum(c.rows_in for c in chunks)


def _read_ranges(src, path, ranges, counted):
    before = newlines_before(path, [s for s, _ in ranges]) if counted else [None] * len(ranges)
    parts = [_collect(read_range(src, path, CFG, s, e, lines_before=n)) for (s, e), n in zip(ranges, before)]
    docs = pa.concat_tables([p[0] for p in parts]) if parts else S.DOC_SCHEMA.empty_table()
    return docs, [q for p in parts for q in p[1]], sum(p[2] for p in parts)


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    data, fields = CASES[request.param]
    path = tmp_path / request.param
    path.write_bytes(data)
    return SourceConfig(path=str(path), **fields), str(path), len(data)


def test_every_two_way_split_matches_the_whole_file(case):
    src, path, size = case
    whole = _collect(read_file(src, path, CFG))
    assert whole[0].num_rows >= 3 and whole[1]  # the case has both documents and quarantine
    for k in range(size + 1):  # at 0, inside a line, at a newline, at the end
        got = _read_ranges(src, path, [(0, k), (k, size)], counted=k % 2 == 0)
        assert got[0].equals(whole[0]), k
        assert got[1] == whole[1] and got[2] == whole[2], k


@pytest.mark.parametrize("range_bytes", [1, 2, 3, 7, 16, 50, 1000])
def test_planned_ranges_match_the_whole_file(case, range_bytes):
    src, path, size = case
    whole = _collect(read_file(src, path, CFG))
    ranges = plan_ranges(path, size, range_bytes)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for counted in (False, True):
        docs, quarantine, rows_in = _read_ranges(src, path, ranges, counted)
        assert docs.equals(whole[0]) and quarantine == whole[1] and rows_in == whole[2]
        assert docs.column(S.SOURCE_LINE).to_pylist() == whole[0].column(S.SOURCE_LINE).to_pylist()


def test_range_line_numbers_are_global(tmp_path):
    path = tmp_path / "n.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(100)]
    path.write_text("\n".join(lines) + "\n")
    start = sum(len(line) + 1 for line in lines[:40])  # exactly at the start of line 41
    docs, _, _ = _collect(read_range(SourceConfig(path=str(path)), str(path), CFG, start, start + 1))
    assert docs.column(S.SOURCE_LINE).to_pylist() == [41] and docs.column(S.ID).to_pylist() == [f"{path}:41"]
    docs, _, _ = _collect(read_range(SourceConfig(path=str(path)), str(path), CFG, start + 1, start + 2))
    assert docs.num_rows == 0  # line 41 started before the range: it belongs to the previous one
    assert newlines_before(str(path), [start, 0, start]) == [40, 0, 40]


def test_ranges_refuse_compressed_and_whole_document_inputs(tmp_path):
    with pytest.raises(ValueError, match="uncompressed"):
        plan_ranges("x.jsonl.zst", 100, 10)
    path = tmp_path / "doc.txt"
    path.write_text("one document")
    with pytest.raises(ValueError, match="text_unit"):
        read_range(SourceConfig(path=str(path)), str(path), CFG, 0, 5)
    with pytest.raises(ValueError, match="bad byte range"):
        read_range(SourceConfig(path=str(path), text_unit="line"), str(path), CFG, 5, 2)
    assert plan_ranges(str(path), 0, 10) == []
