"""HF datasets: `datasets.save_to_disk` directories and `load_dataset` specs (`hf:<name>`).

A DatasetDict is read split by split, in sorted split order, as one input with rows numbered
from 0 across splits. Batches of 4096 rows come out of the dataset as Arrow tables and are
validated column-wise (columns.py), like Parquet.
"""
from __future__ import annotations

from collections.abc import Iterator

from pipeline.config import ReadConfig, SourceConfig
from pipeline.readers.columns import read_records, wanted_columns
from pipeline.readers.validate import Chunk

BATCH_ROWS = 4096


def _hf_dataset(source: SourceConfig, path: str) -> list:
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
    cols = wanted_columns(source)

    def batches():
        for ds in parts:
            keep = [c for c in cols if c in ds.column_names]  # absent ones become 'missing field'
            yield from ds.select_columns(keep).with_format("arrow").iter(batch_size=BATCH_ROWS)

    yield from read_records(source, path, read_cfg, batches())
