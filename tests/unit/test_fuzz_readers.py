"""Hostile and broken input, fuzzed (hypothesis): the readers never crash or hang, and every row
is accounted for, either a document or a quarantine record with a reason.

Every format gets random bytes, NUL bytes, lone surrogates (as JSON escapes and as raw
surrogate bytes), invalid UTF-8, deeply nested JSON, huge numbers, duplicate keys and wrong
types; compressed files are cut at every frame boundary and inside frames; Parquet files get
wrong schemas. The properties, for each generated file:

* reading it raises nothing, within a deadline;
* every chunk balances, `rows_in = documents + quarantined`;
* JSON Lines / text lines: the documents' `source_line`s and the quarantine's `line`s are
  exactly the file's non-blank lines, each once (Parquet: `row`s 0..n-1);
* a compressed copy reads like the plain file, and a cut one keeps a prefix of its documents.

Bounded (max_examples, deadline) so the file runs in well under a minute; `FUZZ_EXAMPLES=N`
searches deeper (the README's reliability table gives the last deep run).
"""
from __future__ import annotations

import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers import read_file

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))  # FUZZ_EXAMPLES=2000 for a deeper search
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
TEXT_SRC = SourceConfig(path="x", text_field="text", id_field="id")
SFT_SRC = SourceConfig(path="x", prompt_field="prompt", response_field="response", id_field="id")
CASES_RUN = {"count": 0}  # files read by the properties below (the README's table gives a deep run's total)


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    print(f"\nfuzz: {CASES_RUN['count']} generated files read, 0 crashes")  # shown with -s


def _read(src: SourceConfig, path, chunk_bytes: int = 1 << 10, max_doc_chars: int = 50_000_000):
    chunks = list(read_file(src, str(path), ReadConfig(chunk_bytes=chunk_bytes, max_doc_chars=max_doc_chars)))
    CASES_RUN["count"] += 1
    docs, quarantine = [], []
    for c in chunks:
        assert c.rows_in == c.docs.num_rows + len(c.quarantine)
        assert c.docs.schema.names[:2] == ["id", "text"]
        docs += c.docs.to_pylist()
        quarantine += c.quarantine
    for q in quarantine:
        assert q["reason"] and q["source"] == str(path) and ("line" in q or "row" in q)
    return docs, quarantine


# -- JSON Lines ---------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=30), st.integers(min_value=10**30, max_value=10**60))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.text(max_size=5), kids, max_size=3), max_leaves=8)


@st.composite
def hostile_line(draw) -> bytes:
    """One line (no newline inside) of a hostile JSON Lines file."""
    return _hostile_line(draw).replace(b"\n", b" ")


def _hostile_line(draw) -> bytes:
    kind = draw(st.sampled_from(["good", "good_sft_fields", "wrong_types", "random_bytes", "nul", "surrogate_escape",
                                 "raw_surrogate", "invalid_utf8", "nested", "huge_number", "duplicate_keys",
                                 "not_object", "blank", "truncated"]))
    text = draw(st.text(min_size=1, max_size=40))
    doc_id = draw(st.one_of(st.text(max_size=12), st.integers()))
    if kind == "good":
        return json.dumps({"id": doc_id, "text": text}, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "good_sft_fields":
        return json.dumps({"id": doc_id, "prompt": text, "response": text[::-1]}).encode()
    if kind == "wrong_types":
        return json.dumps({"id": draw(json_values), "text": draw(json_values)}).encode()
    if kind == "random_bytes":
        return draw(st.binary(max_size=60)).replace(b"\n", b"")
    if kind == "nul":
        return json.dumps({"id": doc_id, "text": "a\x00b" + text}).encode().replace(b"\\u0000", b"\x00" * draw(st.booleans()) or b"\\u0000")
    if kind == "surrogate_escape":  # valid JSON naming a lone surrogate: not a Unicode string
        return b'{"id": "s", "text": "lone \\ud800 surrogate' + text.encode("utf-8", "surrogatepass") + b'"}'
    if kind == "raw_surrogate":  # a surrogate encoded as if it were a character (CESU/WTF-8): invalid UTF-8
        return b'{"id": "r", "text": "' + "\ud83d".encode("utf-8", "surrogatepass") + b'"}'
    if kind == "invalid_utf8":
        return b'{"id": "u", "text": "' + draw(st.binary(min_size=1, max_size=8)).replace(b"\n", b"") + b'\xff"}'
    if kind == "nested":
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        return b'{"id": "n", "text": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "huge_number":
        digits = draw(st.sampled_from([20, 400, 5000, 100_000]))
        field = draw(st.sampled_from(["id", "text"]))
        other = "text" if field == "id" else "id"
        return f'{{"{field}": {"9" * digits}, "{other}": "x"}}'.encode()
    if kind == "duplicate_keys":
        return b'{"id": "d", "text": "first", "text": ' + json.dumps(draw(json_values)).encode() + b"}"
    if kind == "not_object":
        return json.dumps(draw(json_values)).encode()
    if kind == "blank":
        return draw(st.sampled_from([b"", b"   ", b"\t", b"\r"]))
    return json.dumps({"id": doc_id, "text": text}).encode()[: draw(st.integers(1, 10))]


def _expected_lines(data: bytes) -> list[int]:
    return [i + 1 for i, line in enumerate(data.split(b"\n")) if line.strip()]


def _accounted(docs, quarantine) -> list[int]:
    return sorted([d["source_line"] for d in docs] + [q["line"] for q in quarantine])


@FUZZ
@given(lines=st.lists(hostile_line(), min_size=0, max_size=25), chunk=st.sampled_from([1 << 10, 1 << 16]),
       sft=st.booleans())
def test_jsonl_every_line_is_a_document_or_quarantined(tmp_path_factory, lines, chunk, sft):
    d = tmp_path_factory.mktemp("fz")
    data = b"\n".join(lines) + b"\n"
    src = SFT_SRC if sft else TEXT_SRC
    (d / "a.jsonl").write_bytes(data)
    docs, quarantine = _read(src, d / "a.jsonl", chunk)
    assert _accounted(docs, quarantine) == _expected_lines(data)
    for doc in docs:  # what is kept is valid Unicode, as Arrow strings must be
        for field in ("text", "prompt", "response", "id"):
            if doc[field] is not None:
                doc[field].encode("utf-8")
    # The same bytes compressed read the same.
    (d / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    for name in ("a.jsonl.gz", "a.jsonl.zst"):
        d2, q2 = _read(src, d / name, chunk)
        assert [x["id"] for x in d2] == [x["id"] for x in docs]
        assert [q["reason"] for q in q2] == [q["reason"] for q in quarantine]


def _frames(lines: list[bytes], per_frame: int, codec: str) -> tuple[bytes, list[int]]:
    """A multi-frame (zstd) or multi-member (gzip) stream; the byte offset after each frame."""
    out, ends = b"", []
    for i in range(0, len(lines), per_frame):
        block = b"".join(line + b"\n" for line in lines[i:i + per_frame])
        out += zstandard.ZstdCompressor().compress(block) if codec == ".zst" else gzip.compress(block)
        ends.append(len(out))
    return out, ends


@settings(max_examples=max(15, EXAMPLES // 4), deadline=20000, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lines=st.lists(hostile_line(), min_size=1, max_size=12), per_frame=st.integers(1, 4),
       codec=st.sampled_from([".zst", ".gz"]))
def test_a_compressed_file_cut_anywhere_keeps_a_prefix_and_quarantines_the_rest(tmp_path_factory, lines, per_frame, codec):
    d = tmp_path_factory.mktemp("cut")
    lines = [line for line in lines if line.strip()] or [b'{"id": "x", "text": "y"}']
    stream, ends = _frames(lines, per_frame, codec)
    full, _ = _read(TEXT_SRC, _write(d / f"full.jsonl{codec}", stream))
    cuts = sorted(set(ends) | set(range(1, len(stream), max(1, len(stream) // 40))))
    for cut in cuts:
        docs, quarantine = _read(TEXT_SRC, _write(d / f"cut.jsonl{codec}", stream[:cut]))
        assert [x["id"] for x in docs] == [x["id"] for x in full][: len(docs)]  # a prefix, in order
        if cut in ends:  # a clean frame boundary: whole frames, nothing damaged
            whole = len(lines[: (ends.index(cut) + 1) * per_frame])
            assert not any("unreadable" in q["reason"] for q in quarantine)
            assert len(docs) + len(quarantine) == whole
        elif not any("unreadable" in q["reason"] for q in quarantine):
            pytest.fail(f"cut at byte {cut} of {len(stream)} inside a frame was not reported")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# -- text ---------------------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=400), unit=st.sampled_from(["line", "file"]))
def test_text_files_of_random_bytes(tmp_path_factory, data, unit):
    d = tmp_path_factory.mktemp("tx")
    src = SourceConfig(path="x", text_unit=unit)
    docs, quarantine = _read(src, _write(d / "a.txt", data))
    if unit == "line":  # blank = only Unicode whitespace (as str.strip), once it decodes
        lines = [line.removesuffix(b"\r") for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n")]
        assert _accounted(docs, quarantine) == [i + 1 for i, line in enumerate(lines)   # BOM, CR: not text
                                                if line.decode("utf-8", "replace").strip() or _invalid(line)]
    else:
        assert len(docs) + len(quarantine) == 1


def _invalid(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# -- Parquet ------------------------------------------------------------------------------------

parquet_columns = st.sampled_from([
    pa.array(["a", "b", None]), pa.array([1, 2, 3]), pa.array([1.5, None, 2.0]), pa.array([b"\xff", b"x", b""]),
    pa.array([["x"], [], None]), pa.array([{"t": "x"}, {"t": None}, None]), pa.array([True, False, None]),
    pa.array(["", " ", "\x00"]), pa.array([10**18, -1, 0], pa.int64()), pa.array([None, None, None], pa.null()),
])


@FUZZ
@given(text=parquet_columns, doc_id=parquet_columns, drop=st.sampled_from([None, "text", "id"]))
def test_parquet_with_wrong_schemas(tmp_path_factory, text, doc_id, drop):
    d = tmp_path_factory.mktemp("pq")
    cols = {"text": text, "id": doc_id, "other": pa.array([1, 2, 3])}
    if drop:
        cols.pop(drop)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    docs, quarantine = _read(TEXT_SRC, _write(d / "a.parquet", buf.getvalue()))
    assert sorted([x["source_line"] for x in docs] + [q["row"] for q in quarantine]) == [0, 1, 2]


# -- edge cases worth one example each ----------------------------------------------------------

def test_empty_files_of_every_format_read_as_nothing(tmp_path):
    for name, data in (("a.jsonl", b""), ("b.jsonl.gz", b""), ("c.jsonl.zst", b""), ("d.txt", b""),
                       ("e.jsonl.gz", gzip.compress(b"")), ("f.jsonl.zst", zstandard.ZstdCompressor().compress(b""))):
        src = SourceConfig(path="x", text_unit="line") if name.endswith(".txt") else TEXT_SRC
        docs, quarantine = _read(src, _write(tmp_path / name, data))
        assert (docs, quarantine) == ([], []), name
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "id": pa.array([], pa.string())}), tmp_path / "g.parquet")
    assert _read(TEXT_SRC, tmp_path / "g.parquet") == ([], [])


def test_a_10_mb_single_line_document_is_read_or_quarantined_whole(tmp_path):
    text = ("ten megabytes of one line " * 420_000)[:10_000_000]
    path = _write(tmp_path / "big.jsonl", json.dumps({"id": "big", "text": text}).encode() + b"\n" +
                  b'{"id": "next", "text": "after"}\n')
    docs, quarantine = _read(TEXT_SRC, path, chunk_bytes=1 << 20)
    assert [x["id"] for x in docs] == ["big", "next"] and len(docs[0]["text"]) == 10_000_000
    docs, quarantine = _read(TEXT_SRC, path, chunk_bytes=1 << 20, max_doc_chars=1_000_000)
    assert [x["id"] for x in docs] == ["next"] and quarantine[0]["reason"].startswith("document too long")
