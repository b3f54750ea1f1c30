"""Row validation shared by every format: the per-row checks and the chunk builder.

A row becomes a document (operators.schema.DOC_SCHEMA) or a quarantine record
`{source, line|row, reason, raw?}`. The reasons, in the order they are checked:

    row is a JSON <type>, expected an object            (JSON Lines only)
    missing field '<id>' / field '<id>' has type <t>, expected string or integer / field '<id>' is empty
    missing field '<f>' / field '<f>' has type <t>, expected string     (text, or prompt then response)
    empty text / empty response                          (nothing but whitespace)
    document too long: <n> characters > read.max_doc_chars=<max>    (n = len(text) or len(prompt)+len(response))

`<t>` names the JSON type of the value (object, array, boolean, integer, number, null).
columns.py applies the same checks column-wise with Arrow compute and must produce the same
words; tests/unit/test_readers_columns.py compares the two.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from operators import schema as S
from pipeline.config import ReadConfig, SourceConfig

TYPE_NAMES = {dict: "object", list: "array", bool: "boolean", int: "integer", float: "number", type(None): "null"}


@dataclasses.dataclass
class Chunk:
    """One bounded piece of an input file: its documents and its rejected rows."""
    docs: pa.Table                      # DOC_SCHEMA
    quarantine: list[dict]              # one record per rejected row
    rows_in: int                        # = docs.num_rows + len(quarantine)
    text_bytes: int = 0                 # characters of text kept (the part's work, roughly)


def type_name(value) -> str:
    return TYPE_NAMES.get(type(value), type(value).__name__)


def wrong_type(field: str, value_type: str, expected: str = "string") -> str:
    return f"field '{field}' has type {value_type}, expected {expected}"


def too_long(size: int, max_chars: int) -> str:
    return f"document too long: {size} characters > read.max_doc_chars={max_chars}"


def string_field(obj: dict, field: str) -> tuple[str | None, str | None]:
    """(value, reason-if-invalid) for a required string field."""
    if field not in obj:
        return None, f"missing field '{field}'"
    value = obj[field]
    if not isinstance(value, str):
        return None, wrong_type(field, type_name(value))
    return value, None


def id_value(obj: dict, field: str) -> tuple[str | None, str | None]:
    """(id as a string, reason-if-invalid): a non-empty string or an integer (not a boolean)."""
    if field not in obj:
        return None, f"missing field '{field}'"
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, wrong_type(field, type_name(value), "string or integer")
    value = str(value)
    return (value, None) if value else (None, f"field '{field}' is empty")


def body_fields(source: SourceConfig) -> list[str]:
    """The string fields a row needs: [text] or [prompt, response]."""
    return [source.prompt_field, source.response_field] if source.is_sft else [source.text_field or "text"]


class DocBuilder:
    """Collects validated documents and quarantine records for one chunk.

    Rows arrive either one at a time (`add_object`, `add`, `reject`) or as tables already
    validated column-wise (`add_table`); documents keep their arrival order.
    """

    def __init__(self, source: SourceConfig, path: str, read_cfg: ReadConfig):
        self.src, self.path, self.max_chars = source, path, read_cfg.max_doc_chars
        self.cols = {k: [] for k in (S.ID, S.TEXT, S.PROMPT, S.RESPONSE, S.SOURCE_LINE)}
        self.tables: list[pa.Table] = []  # accepted rows, in order: per-row lists are flushed here
        self.quarantine: list[dict] = []
        self.rows_in = 0
        self.text_bytes = 0

    def reject(self, where: int, reason: str, raw: str | None, key: str = "line") -> None:
        self.rows_in += 1
        rec = {"source": self.path, key: where, "reason": reason}
        if raw is not None:
            rec["raw"] = raw
        self.quarantine.append(rec)

    def add_object(self, obj, where: int, raw: str | None, key: str = "line") -> None:
        """Validate one decoded record (a dict) and keep or quarantine it."""
        if not isinstance(obj, dict):
            return self.reject(where, f"row is a JSON {type_name(obj)}, expected an object", raw, key)
        if self.src.id_field:
            doc_id, why = id_value(obj, self.src.id_field)
            if why:
                return self.reject(where, why, raw, key)
        else:
            doc_id = f"{self.path}:{where}"
        values = []
        for field in body_fields(self.src):
            value, why = string_field(obj, field)
            if why:
                return self.reject(where, why, raw, key)
            values.append(value)
        if self.src.is_sft:
            self.add(doc_id, None, values[0], values[1], where, raw, key)
        else:
            self.add(doc_id, values[0], None, None, where, raw, key)

    def add(self, doc_id, text, prompt, response, where, raw, key="line") -> None:
        """Keep one document whose fields are strings, unless it is empty or too long."""
        body = text if text is not None else response
        if not body or not body.strip():
            return self.reject(where, "empty response" if text is None else "empty text", raw, key)
        size = len(body) + len(prompt or "")
        if size > self.max_chars:
            return self.reject(where, too_long(size, self.max_chars), raw, key)
        self.rows_in += 1
        self.text_bytes += size
        c = self.cols
        c[S.ID].append(doc_id), c[S.TEXT].append(text), c[S.PROMPT].append(prompt)
        c[S.RESPONSE].append(response), c[S.SOURCE_LINE].append(where)

    def _flush(self) -> None:
        n = len(self.cols[S.ID])
        if n:
            self.tables.append(pa.table({**{k: self.cols[k] for k in (S.ID, S.TEXT, S.PROMPT, S.RESPONSE)},
                                         S.SOURCE: pa.array([self.path] * n, pa.string()),
                                         S.SOURCE_LINE: self.cols[S.SOURCE_LINE]}, schema=S.DOC_SCHEMA))
            self.cols = {k: [] for k in self.cols}

    def add_table(self, table: pa.Table, text_bytes: int) -> None:
        """Rows validated column-wise, already in DOC_SCHEMA; `text_bytes`: their characters."""
        self._flush()
        self.tables.append(table)
        self.rows_in += table.num_rows
        self.text_bytes += text_bytes

    def take(self) -> Chunk:
        """The chunk collected so far; the builder starts a new one."""
        self._flush()
        table = pa.concat_tables(self.tables) if self.tables else S.DOC_SCHEMA.empty_table()
        chunk = Chunk(table, self.quarantine, self.rows_in, self.text_bytes)
        self.__init__(self.src, self.path, ReadConfig(max_doc_chars=self.max_chars))
        return chunk
