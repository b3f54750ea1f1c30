"""Parquet files: batches of 4096 rows, validated column-wise (columns.py).

Only the source's columns are read; one the file lacks makes every row 'missing field'.
Rows are numbered from 0 (`row` in quarantine records, `source_line` in documents); without
an id field the id is `<file>:<row>`.
"""
from __future__ import annotations

from collections.abc import Iterator

from pipeline import storage
from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers.columns import read_records, wanted_columns
from pipeline.readers.validate import Chunk

BATCH_ROWS = 4096


def read_parquet(source: SourceConfig, path: str, read_cfg: ReadConfig) -> Iterator[Chunk]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(storage.open_random_access(path))
    have = set(pf.schema_arrow.names)
    cols = [c for c in wanted_columns(source) if c in have]  # absent ones become 'missing field'
    yield from read_records(source, path, read_cfg, pf.iter_batches(batch_size=BATCH_ROWS, columns=cols))
