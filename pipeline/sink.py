"""Shard sink: Arrow IPC files and manifest.json (shard-format.md, version 1).

The sink is the commit point: each shard is serialised in memory, written to a
temporary name, fsynced and renamed; the manifest is written after every shard
and names each shard's sha256. Output bytes depend only on the rows and the
options (no timestamps, no paths), so the same config and input give
byte-identical shards.
"""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline import storage

FORMAT = "tokenmill.shards"
VERSION = 1


def ipc_bytes(table: pa.Table, *, compression: str | None, rows_per_batch: int = 256,
              level: int | None = None) -> memoryview:
    """Serialise a table as an Arrow IPC file with fixed-size record batches (a view of Arrow's
    buffer: no copy into a Python bytes object, which held a shard's bytes twice)."""
    codec = None if compression in (None, "none") else pa.Codec(compression, compression_level=level)
    options = pa.ipc.IpcWriteOptions(compression=codec)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            writer.write_batch(batch)
    return memoryview(sink.getvalue())


def write_table(path: str, table: pa.Table, *, compression: str | None, rows_per_batch: int = 256,
                level: int | None = None) -> dict:
    """Atomically write one IPC file; returns {bytes, sha256}."""
    if any(c.num_chunks > 1 for c in table.columns):   # the packer's tables are one chunk already
        table = table.combine_chunks()
    data = ipc_bytes(table, compression=compression, rows_per_batch=rows_per_batch, level=level)
    return {"bytes": len(data), "sha256": storage.write_atomic(path, data)}


def read_table(path: str) -> pa.Table:
    with storage.open_random_access(path) as f:
        return pa.ipc.open_file(f).read_all()


def write_manifest(shard_dir: str, manifest: dict) -> None:
    body = {"format": FORMAT, "version": VERSION, **manifest}
    storage.write_text_atomic(storage.join(shard_dir, "manifest.json"),
                              json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_manifest(shard_dir: str) -> dict:
    return json.loads(storage.read_text(storage.join(shard_dir, "manifest.json")))


def write_shard(shard_dir: str, file: str, docs: pa.Table, *, pack, output, pad_id: int) -> dict:
    """Pack tokenized documents into the shard `file`; returns its record (file, bytes, sha256,
    pack statistics) for the manifest. `pack`/`output`: the config sections."""
    from operators.pack import pack_table
    rows, stats = pack_table(docs, seq_len=pack.seq_len, pad_id=pad_id, method=pack.method)
    written = write_table(storage.join(shard_dir, file), rows, compression=output.compression,
                          rows_per_batch=output.rows_per_batch, level=output.compression_level)
    return {"file": file, **written, "stats": stats.__dict__}
