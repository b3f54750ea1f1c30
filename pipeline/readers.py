"""Readers: source files -> document tables (operators.schema.DOC_SCHEMA).

One call reads one input file and yields bounded chunks (`chunk_bytes` of text
each), so memory stays flat however large the file. Rows that cannot be read
become quarantine records (`source`, `line` or `row`, `reason`, `raw`) instead
of being dropped; rows_in = rows_out + rows_quarantined per file.

Formats: JSON Lines (.jsonl/.json, optionally .gz or .zst), Parquet, plain text
(one document per file or per line), HF datasets (`save_to_disk` directories
and `load_dataset` specs written `hf:<name or builder>`).
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import zstandard

from operators import schema as S
from pipeline import storage
from pipeline.config import ReadConfig, SourceConfig


class TruncatedInput(Exception):
    """A compressed stream ended before its end-of-frame marker."""


@dataclasses.dataclass
class Chunk:
    docs: pa.Table                      # DOC_SCHEMA
    quarantine: list[dict]              # one record per rejected row
    rows_in: int
    text_bytes: int = 0                 # characters of text kept (the part's work, roughly)


# --- decompression ------------------------------------------------------------

def _zstd_blocks(raw, block: int = 1 << 20) -> Iterator[bytes]:
    """Decompress a (possibly multi-frame) zstd stream; raise on truncation.

    zstandard's stream_reader returns a short read without error on a truncated
    file, which would silently lose the tail: track frame ends ourselves.
    """
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False
    while True:
        data = raw.read(block)
        if not data:
            break
        while data:
            out = dobj.decompress(data)
            in_frame = not dobj.eof
            if out:
                yield out
            data = dobj.unused_data if dobj.eof else b""
            if dobj.eof:
                dobj = dctx.decompressobj()
                in_frame = False
    if in_frame:
        raise TruncatedInput("zstd stream ends inside a frame (truncated or corrupt file)")


def _gzip_blocks(raw, block: int = 1 << 20) -> Iterator[bytes]:
    """Decompress a (possibly multi-member) gzip stream; raise on truncation or corruption."""
    dobj = zlib.decompressobj(wbits=31)
    in_member = False
    while data := raw.read(block):
        while data:
            try:
                out = dobj.decompress(data)
            except zlib.error as e:
                raise TruncatedInput(f"gzip stream is corrupt: {e}") from None
            in_member = not dobj.eof
            if out:
                yield out
            data = dobj.unused_data if dobj.eof else b""
            if dobj.eof:
                dobj = zlib.decompressobj(wbits=31)
                in_member = False
    if in_member:
        raise TruncatedInput("gzip stream ends inside a member (truncated or corrupt file)")


def byte_blocks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of a file, by extension (.zst, .gz, or plain)."""
    with storage.open_input(path) as raw:
        if path.endswith(".zst"):
            yield from _zstd_blocks(raw)
        elif path.endswith(".gz"):
            yield from _gzip_blocks(raw)
        else:
            while data := raw.read(1 << 20):
                yield data


# --- field validation -----------------------------------------------------------

_TYPE_NAMES = {dict: "object", list: "array", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def _string_field(obj: dict, field: str) -> tuple[str | None, str | None]:
    """(value, reason-if-invalid) for a required string field."""
    if field not in obj:
        return None, f"missing field '{field}'"
    value = obj[field]
    if not isinstance(value, str):
        return None, f"field '{field}' has type {_TYPE_NAMES.get(type(value), type(value).__name__)}, expected string"
    return value, None


def _id_value(obj: dict, field: str) -> tuple[str | None, str | None]:
    if field not in obj:
        return None, f"missing field '{field}'"
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"field '{field}' has type {_TYPE_NAMES.get(type(value), type(value).__name__)}, expected string or integer"
    value = str(value)
    return (value, None) if value else (None, f"field '{field}' is empty")


class _DocBuilder:
    """Collects validated documents and quarantine records for one chunk."""

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
            return self.reject(where, f"row is a JSON {_TYPE_NAMES.get(type(obj), type(obj).__name__)}, expected an object", raw, key)
        if self.src.id_field:
            doc_id, why = _id_value(obj, self.src.id_field)
            if why:
                return self.reject(where, why, raw, key)
        else:
            doc_id = f"{self.path}:{where}"
        if self.src.is_sft:
            prompt, why = _string_field(obj, self.src.prompt_field)
            if why:
                return self.reject(where, why, raw, key)
            response, why = _string_field(obj, self.src.response_field)
            if why:
                return self.reject(where, why, raw, key)
            self.add(doc_id, None, prompt, response, where, raw, key)
        else:
            text, why = _string_field(obj, self.src.text_field or "text")
            if why:
                return self.reject(where, why, raw, key)
            self.add(doc_id, text, None, None, where, raw, key)

    def add(self, doc_id, text, prompt, response, where, raw, key="line") -> None:
        body = text if text is not None else response
        if not body or not body.strip():
            return self.reject(where, "empty response" if text is None else "empty text", raw, key)
        size = len(body) + len(prompt or "")
        if size > self.max_chars:
            return self.reject(where, f"document too long: {size} characters > read.max_doc_chars={self.max_chars}", raw, key)
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
        """Rows validated column-wise (the JSON fast path), already in DOC_SCHEMA."""
        self._flush()
        self.tables.append(table)
        self.rows_in += table.num_rows
        self.text_bytes += text_bytes

    def take(self) -> Chunk:
        self._flush()
        table = pa.concat_tables(self.tables) if self.tables else S.DOC_SCHEMA.empty_table()
        chunk = Chunk(table, self.quarantine, self.rows_in, self.text_bytes)
        self.__init__(self.src, self.path, ReadConfig(max_doc_chars=self.max_chars))
        return chunk


# --- JSON Lines -------------------------------------------------------------------

def _fast_jsonl(block: bytes, first_line: int, b: _DocBuilder) -> bool:
    """Parse a block of complete lines with Arrow's JSON reader; False = use the slow path.

    Only blocks where every line is non-blank valid UTF-8 take this path
    (Arrow skips blank lines and replaces bad UTF-8, which would lose data).
    """
    if b"\n\n" in block or block.startswith(b"\n"):
        return False
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return False
    src = b.src
    fields = [src.prompt_field, src.response_field] if src.is_sft else [src.text_field or "text"]
    for id_type in ((pa.string(), pa.int64()) if src.id_field else (None,)):
        cols = [(f, pa.string()) for f in fields] + ([(src.id_field, id_type)] if id_type else [])
        try:
            t = pajson.read_json(pa.BufferReader(block), read_options=pajson.ReadOptions(block_size=max(1 << 20, len(block) + 1)),
                                 parse_options=pajson.ParseOptions(explicit_schema=pa.schema(cols),
                                                                   unexpected_field_behavior="ignore"))
            break
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            t = None
    if t is None or t.num_rows != block.count(b"\n") + (0 if block.endswith(b"\n") else 1):
        return False
    # Rows that pass every check column-wise are kept as Arrow columns; the others (null =
    # missing field or explicit null, empty, too long, empty id) go through the per-row
    # validation, which quarantines them with their exact reason.
    n = t.num_rows
    body = t.column(src.response_field if src.is_sft else fields[0])
    size = pc.utf8_length(body)
    if src.is_sft:
        size = pc.add(size, pc.utf8_length(t.column(src.prompt_field)))
    ok = pc.and_(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(body)), 0), pc.less_equal(size, b.max_chars))
    for f in t.column_names:
        ok = pc.and_(ok, pc.is_valid(t.column(f)))
    line_no = pa.array(np.arange(first_line, first_line + n, dtype=np.int64))
    if src.id_field:
        ids = t.column(src.id_field).cast(pa.string())
        ok = pc.and_(ok, pc.greater(pc.utf8_length(ids), 0))
    else:
        ids = pc.binary_join_element_wise(b.path, pc.cast(line_no, pa.string()), ":")
    ok = pc.fill_null(ok, False)
    bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
    if len(bad) == 0 or len(bad) < n:
        keep = ok if len(bad) else None
        cols = {S.ID: ids, S.TEXT: None if src.is_sft else body,
                S.PROMPT: t.column(src.prompt_field) if src.is_sft else None,
                S.RESPONSE: t.column(src.response_field) if src.is_sft else None}
        table = pa.table({k: v if v is not None else pa.nulls(n, pa.string()) for k, v in cols.items()}
                         | {S.SOURCE: pa.array([b.path] * n, pa.string()), S.SOURCE_LINE: line_no}, schema=S.DOC_SCHEMA)
        if keep is not None:
            table = table.filter(keep)
        kept_size = pc.sum(size.filter(keep) if keep is not None else size).as_py() or 0
    if len(bad):
        lines = block.split(b"\n")
        probe = _DocBuilder(src, b.path, ReadConfig(max_doc_chars=b.max_chars))
        for i in bad.tolist():
            raw = lines[i].decode("utf-8")
            probe.add_object(json.loads(raw), first_line + i, raw)
        if probe.cols[S.ID]:  # the per-row checks kept a row the column checks did not: per-row for all
            return False
        b.quarantine.extend(probe.quarantine)
        b.rows_in += probe.rows_in
    if len(bad) < n:  # rejected rows only go to quarantine, so the kept ones stay in line order
        b.add_table(table, int(kept_size))
    return True


def _slow_jsonl(block: bytes, first_line: int, b: _DocBuilder) -> None:
    for i, raw_bytes in enumerate(block.split(b"\n")):
        if not raw_bytes.strip():
            continue  # blank lines hold no row
        where = first_line + i
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            b.reject(where, f"invalid UTF-8 at byte {e.start}", raw_bytes.decode("utf-8", "backslashreplace"))
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            b.reject(where, f"invalid JSON: {e.msg} at column {e.colno}", raw)
            continue
        b.add_object(obj, where, raw)


def read_jsonl(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    b = _DocBuilder(source, path, read_cfg)
    pending = b""
    line_no = 1  # line number of the first line in `pending`
    blocks = byte_blocks(path)
    while True:
        try:
            data = next(blocks)
        except StopIteration:
            break
        except TruncatedInput as e:
            # Keep every complete line before the damage; the tail is one quarantined row.
            if pending.count(b"\n"):
                cut = pending.rindex(b"\n")
                block, pending = pending[:cut], pending[cut + 1:]
                _slow_jsonl(block, line_no, b)
                line_no += block.count(b"\n") + 1
            b.reject(line_no, f"unreadable from this line on: {e}", pending.decode("utf-8", "backslashreplace") or None)
            pending = b""
            break
        pending += data
        while len(pending) >= read_cfg.chunk_bytes:
            cut = pending.rfind(b"\n", 0, read_cfg.chunk_bytes)
            if cut < 0:  # one line longer than a chunk: cut after it
                cut = pending.find(b"\n", read_cfg.chunk_bytes)
                if cut < 0:
                    break
            block, pending = pending[:cut], pending[cut + 1:]
            if not _fast_jsonl(block, line_no, b):
                _slow_jsonl(block, line_no, b)
            line_no += block.count(b"\n") + 1
            yield b.take()
    if pending.strip():
        block = pending[:-1] if pending.endswith(b"\n") else pending
        if not _fast_jsonl(block, line_no, b):
            _slow_jsonl(block, line_no, b)
    if b.rows_in or b.quarantine:
        yield b.take()


# --- Parquet, text, HF datasets ---------------------------------------------------

def _read_records(source: SourceConfig, path: str, read_cfg: ReadConfig, batches) -> Iterator[Chunk]:
    """Shared by Parquet and HF datasets: batches of Arrow rows, 0-based row index."""
    b = _DocBuilder(source, path, read_cfg)
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            b.add_object(obj, row, json.dumps(obj, default=str, ensure_ascii=False), key="row")
            row += 1
        if b.text_bytes >= read_cfg.chunk_bytes:
            yield b.take()
    if b.rows_in:
        yield b.take()


def _wanted_columns(source: SourceConfig) -> list[str]:
    cols = [source.prompt_field, source.response_field] if source.is_sft else [source.text_field or "text"]
    return cols + ([source.id_field] if source.id_field else [])


def read_parquet(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(storage.open_random_access(path))
    have = set(pf.schema_arrow.names)
    cols = [c for c in _wanted_columns(source) if c in have]  # absent ones become 'missing field'
    yield from _read_records(source, path, read_cfg, pf.iter_batches(batch_size=4096, columns=cols))


def read_text(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    b = _DocBuilder(source, path, read_cfg)
    try:
        data = b"".join(byte_blocks(path))
        text = data.decode("utf-8")
    except TruncatedInput as e:
        b.reject(1, str(e), None)
        yield b.take()
        return
    except UnicodeDecodeError as e:
        b.reject(1, f"invalid UTF-8 at byte {e.start}", data.decode("utf-8", "backslashreplace"))
        yield b.take()
        return
    if source.text_unit == "file":
        b.add(path, text, None, None, 1, text)
    else:
        for i, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                b.add(f"{path}:{i}", line, None, None, i, line)
            if b.text_bytes >= read_cfg.chunk_bytes:
                yield b.take()
    if b.rows_in:
        yield b.take()


def _hf_dataset(source: SourceConfig, path: str):
    import datasets
    if source.format_of(path) == "hf":
        spec = path[3:] if path.startswith("hf:") else path
        ds = datasets.load_dataset(spec, **source.hf_kwargs)
    else:
        ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        return [ds[k] for k in sorted(ds)]
    return [ds]


def read_hf(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    parts = _hf_dataset(source, path)
    cols = _wanted_columns(source)

    def batches():
        for ds in parts:
            keep = [c for c in cols if c in ds.column_names]
            yield from ds.select_columns(keep).with_format("arrow").iter(batch_size=4096)

    yield from _read_records(source, path, read_cfg, batches())


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text,
           "hf_disk": read_hf, "hf": read_hf}


def expand_source(source: SourceConfig) -> list[str]:
    """The input files of a source, sorted (HF specs are one input)."""
    if source.resolved_format == "hf":
        return [source.path]
    if not source.is_glob and source.resolved_format == "hf_disk":
        return [source.path] if storage.exists(source.path) else []
    return storage.glob(source.path)


def read_file(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    return READERS[source.format_of(path)](source, path, read_cfg)
