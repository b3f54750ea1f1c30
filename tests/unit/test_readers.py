"""Readers: every row is kept or quarantined with a reason; nothing is lost silently."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from operators import schema as S
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers import read_file

BAD_LINES = [
    (b'{"id": 1, "text": "good one"}', None),
    (b'{"id": 2, "text": "unterminated}', "invalid JSON"),
    (b'{"id": 3, "text": "bad \xff utf8"}', "invalid UTF-8"),
    (b'{"id": 4}', "missing field 'text'"),
    (b'{"id": 5, "text": 17}', "field 'text' has type integer, expected string"),
    (b'{"id": 6, "text": "   "}', "empty text"),
    (b'[1, 2, 3]', "row is a JSON array"),
    (b'{"id": [7], "text": "x"}', "field 'id' has type array"),
    (b'', None),  # a blank line is not a row
    (b'{"id": "eight", "text": "' + b"x" * 200 + b'"}', "document too long"),
    (b'{"id": 9, "text": "<|endoftext|> stays text"}', None),
]


def read_all(src, path, **cfg):
    chunks = list(read_file(src, str(path), ReadConfig(**cfg)))
    docs = pa.concat_tables([c.docs for c in chunks]) if chunks else None
    return docs, [q for c in chunks for q in c.quarantine], sum(c.rows_in for c in chunks)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_bad_rows_are_quarantined_with_reasons(tmp_path, suffix):
    data = b"\n".join(line for line, _ in BAD_LINES) + b"\n"
    path = tmp_path / f"in{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith("gz") else
                     zstandard.ZstdCompressor().compress(data) if suffix.endswith("zst") else data)
    src = SourceConfig(path=str(path), text_field="text", id_field="id")
    docs, quarantine, rows_in = read_all(src, path, max_doc_chars=100)
    assert docs.column(S.ID).to_pylist() == ["1", "9"]
    assert docs.column(S.TEXT).to_pylist()[1] == "<|endoftext|> stays text"
    expected = {i + 1: why for i, (_, why) in enumerate(BAD_LINES) if why}
    assert {q["line"]: q["reason"] for q in quarantine}.keys() == expected.keys()
    for q in quarantine:
        assert q["reason"].startswith(expected[q["line"]]) and q["source"] == str(path) and "raw" in q
    assert rows_in == docs.num_rows + len(quarantine) == 10


def test_fast_and_slow_paths_agree(tmp_path):
    rows = [{"id": i, "text": f"doc {i} " * (i % 7 + 1)} for i in range(3000)]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixed = tmp_path / "mixed.jsonl"  # one blank line forces the per-line path for its block
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]) + "\n" +
                     "".join(json.dumps(r) + "\n" for r in rows[10:]))
    src = SourceConfig(path=str(good), text_field="text", id_field="id")
    a, qa, _ = read_all(src, good, chunk_bytes=4096)
    b, qb, _ = read_all(src, mixed, chunk_bytes=4096)
    assert a.column(S.TEXT).to_pylist() == b.column(S.TEXT).to_pylist() == [r["text"] for r in rows]
    assert a.column(S.SOURCE_LINE).to_pylist() == list(range(1, 3001))
    assert b.column(S.SOURCE_LINE).to_pylist()[10] == 12  # line numbers count the blank line
    assert not qa and not qb


@pytest.mark.parametrize("skipped", ["", "   ", "\t\r"])
def test_a_skipped_line_cannot_balance_two_objects_on_one_line(tmp_path, skipped):
    """Arrow's JSON reader skips blank and whitespace-only lines and reads `{..} {..}` as two rows:
    together they keep its row count equal to the line count. The rows must still be the per-line
    reading: the two-object line quarantined, the other rows at their own line numbers."""
    rows = [json.dumps({"id": i, "text": f"row {i}"}) for i in range(6)]
    lines = rows[:2] + [rows[2] + " " + rows[3], skipped] + rows[4:]
    path = tmp_path / "two.jsonl"
    path.write_text("\n".join(lines) + "\n")
    docs, quarantine, rows_in = read_all(SourceConfig(path=str(path), text_field="text", id_field="id"), path)
    assert docs.column(S.ID).to_pylist() == ["0", "1", "4", "5"]
    assert docs.column(S.SOURCE_LINE).to_pylist() == [1, 2, 5, 6]
    assert [(q["line"], q["reason"].split(":")[0]) for q in quarantine] == [(3, "invalid JSON")]
    assert rows_in == 5


def test_truncated_zstd_keeps_complete_lines_and_quarantines_the_tail(tmp_path):
    rows = [{"id": i, "text": f"row number {i} " + "y" * 50} for i in range(5000)]
    blob = zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) // 2])
    docs, quarantine, rows_in = read_all(SourceConfig(path=str(path), id_field="id"), path)
    assert 0 < docs.num_rows < 5000
    assert docs.column(S.ID).to_pylist() == [str(i) for i in range(docs.num_rows)]
    assert len(quarantine) == 1 and "truncated" in quarantine[0]["reason"]
    assert quarantine[0]["line"] == docs.num_rows + 1


def test_truncated_gzip_is_reported(tmp_path):
    blob = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(20000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    docs, quarantine, _ = read_all(SourceConfig(path=str(path)), path)
    assert "truncated" in quarantine[-1]["reason"]
    assert docs.column(S.ID).to_pylist()[0] == f"{path}:1"  # deterministic ids when a source has none


def test_chunks_bound_memory_and_keep_order(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": "z" * 100}) + "\n" for _ in range(1000)))
    chunks = list(read_file(SourceConfig(path=str(path)), str(path), ReadConfig(chunk_bytes=10_000)))
    assert len(chunks) > 5
    lines = [l for c in chunks for l in c.docs.column(S.SOURCE_LINE).to_pylist()]
    assert lines == list(range(1, 1001))


def test_sft_fields(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"id": "a", "q": "Why?", "a": "Because."}\n{"id": "b", "q": "Why?", "a": ""}\n'
                    '{"id": "c", "q": "Why?"}\n')
    src = SourceConfig(path=str(path), prompt_field="q", response_field="a", id_field="id")
    docs, quarantine, _ = read_all(src, path)
    assert docs.column(S.PROMPT).to_pylist() == ["Why?"] and docs.column(S.TEXT).to_pylist() == [None]
    assert [q["reason"] for q in quarantine] == ["empty response", "missing field 'a'"]


def test_parquet_text_and_hf_datasets(tmp_path):
    pq.write_table(pa.table({"doc_id": [10, 11, 12], "body": ["alpha", None, "gamma"]}), tmp_path / "a.parquet")
    src = SourceConfig(path=str(tmp_path / "a.parquet"), text_field="body", id_field="doc_id")
    docs, quarantine, _ = read_all(src, tmp_path / "a.parquet")
    assert docs.column(S.ID).to_pylist() == ["10", "12"]
    assert quarantine[0]["row"] == 1 and "body" in quarantine[0]["reason"]

    (tmp_path / "t.txt").write_text("first line\n\nthird line\n")
    docs, _, _ = read_all(SourceConfig(path=str(tmp_path / "t.txt"), text_unit="line"), tmp_path / "t.txt")
    assert docs.column(S.TEXT).to_pylist() == ["first line", "third line"]
    docs, _, _ = read_all(SourceConfig(path=str(tmp_path / "t.txt")), tmp_path / "t.txt")
    assert docs.column(S.TEXT).to_pylist() == ["first line\n\nthird line\n"]

    import datasets
    datasets.Dataset.from_dict({"text": ["one", "two"], "id": ["x1", "x2"]}).save_to_disk(str(tmp_path / "hf"))
    docs, _, _ = read_all(SourceConfig(path=str(tmp_path / "hf"), id_field="id"), tmp_path / "hf")
    assert docs.column(S.TEXT).to_pylist() == ["one", "two"] and docs.column(S.ID).to_pylist() == ["x1", "x2"]

    (tmp_path / "j.jsonl").write_text('{"text": "via load_dataset"}\n')
    src = SourceConfig(path="hf:json", hf_kwargs={"data_files": str(tmp_path / "j.jsonl"), "split": "train"})
    docs, _, _ = read_all(src, "hf:json")
    assert docs.column(S.TEXT).to_pylist() == ["via load_dataset"]


def test_fast_path_with_bad_rows_keeps_order_and_exact_reasons(tmp_path):
    rows = []
    for i in range(200):
        if i % 50 == 7:
            rows.append('{"id": %d}' % i)                       # missing text
        elif i % 50 == 8:
            rows.append('{"id": %d, "text": "   "}' % i)        # empty
        elif i % 50 == 9:
            rows.append('{"id": %d, "text": "%s"}' % (i, "y" * 500))  # too long
        elif i % 50 == 10:
            rows.append('{"id": %d, "text": null}' % i)         # explicit null
        else:
            rows.append('{"id": %d, "text": "doc %d"}' % (i, i))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n")
    docs, quarantine, rows_in = read_all(SourceConfig(path=str(path), id_field="id"), path, max_doc_chars=100)
    kept = [i for i in range(200) if i % 50 not in (7, 8, 9, 10)]
    assert docs.column(S.ID).to_pylist() == [str(i) for i in kept]
    assert docs.column(S.SOURCE_LINE).to_pylist() == [i + 1 for i in kept]
    reasons = {q["line"]: q["reason"] for q in quarantine}
    assert reasons[8] == "missing field 'text'" and reasons[9] == "empty text"
    assert reasons[10].startswith("document too long") and reasons[11] == "field 'text' has type null, expected string"
    assert all("raw" in q for q in quarantine) and rows_in == 200


def test_fast_path_sft_rows_and_generated_ids(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}" if i != 3 else ""}) + "\n"
                            for i in range(10)))
    docs, quarantine, _ = read_all(SourceConfig(path=str(path), prompt_field="q", response_field="a"), path)
    assert docs.column(S.ID).to_pylist() == [f"{path}:{i + 1}" for i in range(10) if i != 3]
    assert docs.column(S.TEXT).null_count == docs.num_rows and docs.column(S.PROMPT).to_pylist()[0] == "question 0"
    assert [q["reason"] for q in quarantine] == ["empty response"]
