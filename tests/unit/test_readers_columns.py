"""Parquet and HF datasets are validated column-wise with exactly the per-row checks' outcome."""
import itertools
import sys
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import schema as S
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers import read_file
from pipeline.readers.columns import wanted_columns
from pipeline.readers.validate import DocBuilder

N = 10
COLUMNS = {
    "s": pa.array(["doc a", None, "", "  \u3000", "x" * 30, "ok é", "z", "w", "v", "u"]),
    "s2": pa.array(["p", "q", None, "", "r", "s", "t", "u" * 25, "v", "w"], pa.large_string()),
    "sd": pa.array(["k1", "k2", "", None, "k5", "k6", "k1", "k8", "k9", "k10"]).dictionary_encode(),
    "i": pa.array([1, 2, 3, None, 5, -6, 7, 8, 9, 10], pa.int32()),
    "u": pa.array(range(N), pa.uint64()),
    "f": pa.array([1.5, None, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]),
    "b": pa.array([True, False, None] + [True] * 7),
    "st": pa.array([{"a": 1}] * 9 + [None]),
    "ls": pa.array([[1, 2]] * N),
    "nul": pa.nulls(N),
    "bin": pa.array([b"raw"] * N),
}


def _per_row(src, path, table, max_chars):
    """The reference: every row through the per-row checks (the JSON reader's slow path)."""
    b = DocBuilder(src, path, ReadConfig(max_doc_chars=max_chars))
    present = [c for c in wanted_columns(src) if c in table.column_names]
    for row, obj in enumerate(table.select(present).to_pylist()):
        b.add_object(obj, row, json.dumps(obj, default=str, ensure_ascii=False), key="row")
    return b.take()


def _read(src, path, **cfg):
    chunks = list(read_file(src, path, ReadConfig(**cfg)))
    docs = pa.concat_tables([c.docs for c in chunks])
    return docs, [q for c in chunks for q in c.quarantine], sum(c.rows_in for c in chunks)


@pytest.fixture(scope="module")
def parquet_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cols") / "all.parquet"
    pq.write_table(pa.table(COLUMNS), path)
    return str(path)


def _sources(path):
    ids = [None, "s", "sd", "i", "u", "f", "b", "st", "nul", "missing"]
    for id_field, text in itertools.product(ids, ["s", "s2", "sd", "i", "ls", "nul", "bin", "missing"]):
        yield SourceConfig(path=path, id_field=id_field, text_field=text)
    for id_field, (p, r) in itertools.product([None, "i"], itertools.permutations(["s", "s2", "f", "missing"], 2)):
        yield SourceConfig(path=path, id_field=id_field, prompt_field=p, response_field=r)


def test_column_checks_equal_the_per_row_checks(parquet_path):
    table = pq.read_table(parquet_path)
    for src in _sources(parquet_path):
        expected = _per_row(src, parquet_path, table, max_chars=20)
        docs, quarantine, rows_in = _read(src, parquet_path, max_doc_chars=20)
        assert docs.equals(expected.docs), src
        assert quarantine == expected.quarantine, src
        assert rows_in == docs.num_rows + len(quarantine) == N


def test_reasons_match_the_json_wording(parquet_path):
    reasons = lambda **kw: {q["row"]: q["reason"] for q in _read(SourceConfig(path=parquet_path, **kw), parquet_path,
                                                                   max_doc_chars=20)[1]}
    got = reasons(id_field="sd", text_field="s")
    assert got == {1: "field 's' has type null, expected string", 2: "field 'sd' is empty",
                   3: "field 'sd' has type null, expected string or integer",
                   4: "document too long: 30 characters > read.max_doc_chars=20"}
    assert reasons(id_field="i", text_field="s")[3] == "field 'i' has type null, expected string or integer"
    assert set(reasons(id_field="b", text_field="s").values()) == {
        "field 'b' has type boolean, expected string or integer", "field 'b' has type null, expected string or integer"}
    assert set(reasons(text_field="f").values()) == {"field 'f' has type number, expected string",
                                                     "field 'f' has type null, expected string"}
    assert set(reasons(text_field="ls").values()) == {"field 'ls' has type array, expected string"}
    assert set(reasons(text_field="nope").values()) == {"missing field 'nope'"}
    got = reasons(prompt_field="s2", response_field="s")
    assert got[1] == "field 's' has type null, expected string"
    assert got[2] == "field 's2' has type null, expected string"
    assert got[3] == "empty response" and got[7] == "document too long: 26 characters > read.max_doc_chars=20"


def test_chunks_end_after_the_batch_that_fills_them(tmp_path):
    path = tmp_path / "many.parquet"
    pq.write_table(pa.table({"text": [f"document number {i}" for i in range(20_000)]}), path)
    chunks = list(read_file(SourceConfig(path=str(path)), str(path), ReadConfig(chunk_bytes=100_000)))
    assert [c.docs.num_rows for c in chunks] == [8192, 8192, 3616]  # 4096-row batches, ~90 KB each
    assert chunks[0].docs.column(S.ID)[0].as_py() == f"{path}:0"
    assert sum(c.text_bytes for c in chunks) == sum(len(f"document number {i}") for i in range(20_000))


def test_hf_dataset_dict_rows_are_validated_column_wise(tmp_path):
    import datasets
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["one", "", None, "x" * 30], "id": ["a", "b", "c", ""]}),
        "test": datasets.Dataset.from_dict({"text": ["t1", "t2"], "id": ["d", "e"]}),
    }).save_to_disk(str(tmp_path / "hf"))
    docs, quarantine, rows_in = _read(SourceConfig(path=str(tmp_path / "hf"), id_field="id"), str(tmp_path / "hf"),
                                      max_doc_chars=10)
    assert docs.column(S.ID).to_pylist() == ["d", "e", "a"]  # splits in sorted order: test, train
    assert docs.column(S.SOURCE_LINE).to_pylist() == [0, 1, 2]
    assert [(q["row"], q["reason"]) for q in quarantine] == [
        (3, "empty text"), (4, "field 'text' has type null, expected string"),
        (5, "field 'id' is empty")]
    assert json.loads(quarantine[1]["raw"]) == {"text": None, "id": "c"} and rows_in == 6


def test_blank_means_what_python_strip_means(tmp_path):
    """Arrow's utf8_is_space must call a document blank exactly when Python's str.strip() does."""
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    lookalikes = ["\u200b", "\ufeff", "\u180e", "\u2060", "\x00", "\x1b", "a", " a "]
    texts = spaces + lookalikes + ["".join(spaces), " \u3000\u2028 ", ""]
    path = tmp_path / "ws.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    src = SourceConfig(path=str(path))
    expected = _per_row(src, str(path), pq.read_table(path), max_chars=100)
    docs, quarantine, _ = _read(src, str(path))
    assert docs.equals(expected.docs) and quarantine == expected.quarantine
    assert docs.column(S.TEXT).to_pylist() == lookalikes
    line_path = tmp_path / "ws.txt"
    line_path.write_text("\n".join(t for t in texts if "\n" not in t and "\r" not in t), newline="")
    docs, _, _ = _read(SourceConfig(path=str(line_path), text_unit="line"), str(line_path))
    assert docs.column(S.TEXT).to_pylist() == [t for t in lookalikes]  # no line break inside these
