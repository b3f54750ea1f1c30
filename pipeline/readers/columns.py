"""Column-wise validation of Arrow rows (Parquet, HF datasets, the JSON Lines fast path).

`validate_columns` applies validate.py's checks to a whole table with Arrow compute: every
row's first failing check gives its reason, in validate.py's exact words, and only rejected
rows are touched in Python (to format a reason with its size, and to dump `raw`). Kept rows
go out as one DOC_SCHEMA table, in row order.

Types: a string, large_string, string_view or dictionary-of-string column is a string
field; an integer column is a valid id. Any other column type rejects its rows as
`has type <t>`, with <t> the JSON name of the column's Python values (`null` for null
slots), exactly as the per-row check names them.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers.validate import Chunk, DocBuilder, body_fields, too_long, type_name, wrong_type


@dataclasses.dataclass
class Validated:
    docs: pa.Table | None           # kept rows in DOC_SCHEMA, row order; None when none is kept
    text_bytes: int                 # characters of the kept rows (len(text) or len(prompt)+len(response))
    rejected: list[tuple[int, str]]  # (row index in the input table, reason), ascending


def _bools(x) -> np.ndarray:
    return np.asarray(pc.fill_null(x, False).to_numpy(zero_copy_only=False), dtype=bool)


def _is_stringish(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


class _Reasons:
    """The first failing check of every row (None while a row passes everything so far)."""

    def __init__(self, n: int):
        self.reason = np.full(n, None, dtype=object)
        self.open = np.ones(n, dtype=bool)

    def fail(self, mask: np.ndarray, reason: str) -> None:
        hit = mask & self.open
        self.reason[hit] = reason
        self.open &= ~hit


def _field(table: pa.Table, field: str, r: _Reasons, expected: str, int_ok: bool = False):
    """The field as a string column (nulls where its check failed), or None if no row can pass."""
    if field not in table.column_names:
        r.fail(np.ones(table.num_rows, dtype=bool), f"missing field '{field}'")
        return None
    col = table.column(field)
    valid = _bools(pc.is_valid(col))
    r.fail(~valid, wrong_type(field, "null", expected))
    if _is_stringish(col.type) or (int_ok and pa.types.is_integer(col.type)):
        return col.cast(pa.string())
    if valid.any():  # one Python value names the type of the whole column
        r.fail(valid, wrong_type(field, type_name(pc.drop_null(col)[0].as_py()), expected))
    return None


def validate_columns(table: pa.Table, source: SourceConfig, path: str, max_chars: int,
                     where: np.ndarray) -> Validated:
    """Validate every row of `table` (the source's columns; absent ones = missing field).

    `where`: int64 [num_rows], each row's line (JSON Lines) or row index (Parquet, HF): it
    becomes `source_line` and, without an id field, the id `<path>:<where>`.
    """
    n = table.num_rows
    r = _Reasons(n)
    ids = _field(table, source.id_field, r, "string or integer", int_ok=True) if source.id_field else None
    if ids is not None:
        r.fail(_bools(pc.equal(pc.utf8_length(ids), 0)), f"field '{source.id_field}' is empty")
    values = [_field(table, f, r, "string") for f in body_fields(source)]
    body = values[-1]
    size = np.zeros(n, dtype=np.int64)
    if all(v is not None for v in values):
        lengths = [pc.fill_null(pc.utf8_length(v), 0).to_numpy(zero_copy_only=False).astype(np.int64) for v in values]
        size = sum(lengths)
        # utf8_is_space: non-empty and all whitespace, by the same set of characters as
        # Python's str.isspace() (checked over every code point); it stops at the first other one
        blank = (lengths[-1] == 0) | _bools(pc.utf8_is_space(body))
        r.fail(blank, "empty response" if source.is_sft else "empty text")
        for i in np.flatnonzero(r.open & (size > max_chars)).tolist():
            r.reason[i] = too_long(int(size[i]), max_chars)
            r.open[i] = False
    bad = np.flatnonzero(~r.open)
    rejected = [(i, r.reason[i]) for i in bad.tolist()]
    if len(bad) == n:
        return Validated(None, 0, rejected)
    if not source.id_field:
        ids = pc.binary_join_element_wise(path, pc.cast(pa.array(where), pa.string()), ":")
    nulls = pa.nulls(n, pa.string())
    cols = {S.ID: ids, S.TEXT: nulls if source.is_sft else body,
            S.PROMPT: values[0] if source.is_sft else nulls, S.RESPONSE: body if source.is_sft else nulls,
            S.SOURCE: pa.array([path] * n, pa.string()), S.SOURCE_LINE: pa.array(where, pa.int64())}
    docs = pa.table(cols, schema=S.DOC_SCHEMA)
    if len(bad):
        docs = docs.filter(pa.array(r.open))
    return Validated(docs, int(size[r.open].sum()), rejected)


def wanted_columns(source: SourceConfig) -> list[str]:
    """The columns a source reads: its text (or prompt, response) and id fields."""
    return body_fields(source) + ([source.id_field] if source.id_field else [])


def read_records(source: SourceConfig, path: str, read_cfg: ReadConfig,
                 batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[Chunk]:
    """Chunks of Arrow batches (Parquet, HF datasets); rows are numbered from 0 (`row`).

    A chunk ends after the first batch that brings its kept text to `read.chunk_bytes`.
    """
    b = DocBuilder(source, path, read_cfg)
    row = 0
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        n = table.num_rows
        v = validate_columns(table, source, path, read_cfg.max_doc_chars, np.arange(row, row + n, dtype=np.int64))
        if v.rejected:
            idx = [i for i, _ in v.rejected]
            # (a table without columns, when none of the source's is present, takes no rows)
            raws = table.take(idx).to_pylist() if table.num_columns else [{}] * len(idx)
            for (i, reason), obj in zip(v.rejected, raws):
                b.reject(row + i, reason, json.dumps(obj, default=str, ensure_ascii=False), key="row")
        if v.docs is not None:
            b.add_table(v.docs, v.text_bytes)
        row += n
        if b.text_bytes >= read_cfg.chunk_bytes:
            yield b.take()
    if b.rows_in:
        yield b.take()
