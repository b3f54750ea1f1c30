"""What a class operator is, and the column check every operator uses.

A class operator (`Tokenize`, `DocumentEmbedder`, `QualityScorer`, `ClusterAssigner`,
`TokenScorer`) is built by a stage's worker, once per worker process: a cheap `__init__`
that only stores settings, `setup()` that loads the model or tokenizer (idempotent), then
`__call__(table) -> table` per batch. `reads` / `adds` name the columns (operators/schema.py)
it needs and appends; a stage declares them as its own (`reads = Tokenize.reads`) so the
runner can check the chain of stages before Ray starts. Functions over tables or arrays
(`fit_clusters`, `pack_*`, the mixture search) need no base. Operators never import ray or
pipeline, and report bad input by raising; rows to quarantine are the readers' concern.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa


class Operator:
    """Base for class operators: `setup()` once per worker, then `__call__` per table."""
    reads: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()

    def setup(self) -> None:  # load heavy state; idempotent
        pass

    def __call__(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError


def check_columns(table: pa.Table, needed: tuple[str, ...], who: str) -> None:
    """Raise KeyError naming `who` and the missing columns unless `table` has all of `needed`."""
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise KeyError(f"{who} needs columns {missing}; the table has {table.column_names}")
