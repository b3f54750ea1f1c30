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

import pyarrow as pa
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

    def take(self) -> Chunk:
        n = len(self.cols[S.ID])
        table = pa.table({**{k: self.cols[k] for k in (S.ID, S.TEXT, S.PROMPT, S.RESPONSE)},
                          S.SOURCE: pa.array([self.path] * n, pa.string()),
                          S.SOURCE_LINE: self.cols[S.SOURCE_LINE]}, schema=S.DOC_SCHEMA)
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
    # Nulls mean a missing field (or an explicit null): those rows need the slow path's reasons.
    values = {f: t.column(f).to_pylist() for f in t.column_names}
    lines = None
    for i in range(t.num_rows):
        where = first_line + i
        row = {f: values[f][i] for f in values}
        if any(v is None for v in row.values()):
            if lines is None:
                lines = block.split(b"\n")
            raw = lines[i].decode("utf-8")
            b.add_object(json.loads(raw), where, raw)
            continue
        doc_id = str(row[src.id_field]) if src.id_field else f"{b.path}:{where}"
        if src.is_sft:
            b.add(doc_id, None, row[src.prompt_field], row[src.response_field], where, None)
        else:
            b.add(doc_id, row[fields[0]], None, None, where, None)
    # Rejected rows from the fast path carry no raw text yet: attach it.
    missing_raw = [q for q in b.quarantine if "raw" not in q and q.get("line", -1) >= first_line]
    if missing_raw:
        lines = lines or block.split(b"\n")
        for q in missing_raw:
            q["raw"] = lines[q["line"] - first_line].decode("utf-8")
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
