"""The operator protocol that `pipeline/adapter.py` runs on Ray.

Two shapes, both pure (no ray import):

* a **function** `fn(table: pa.Table, **params) -> pa.Table` runs as Ray tasks;
* a **class** with `__init__(**params)` (cheap, picklable), `setup()` (loads models
  or tokenizers once per actor) and `__call__(table) -> pa.Table` runs as an actor
  pool; `num_gpus` / `num_cpus` per actor come from the stage config.

Every operator declares `reads` (columns it needs) and `adds` (columns it
appends), so the runner can check a chain of stages before Ray starts.
Rows an operator cannot process are returned through `Rejected` rather than
dropped, so that rows_in = rows_out + rows_filtered + rows_quarantined holds.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pyarrow as pa


@dataclasses.dataclass
class Rejected:
    """Rows an operator refused, with one human-readable reason per row."""
    ids: list[str] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)

    def add(self, doc_id: str, reason: str) -> None:
        self.ids.append(doc_id)
        self.reasons.append(reason)

    def __len__(self) -> int:
        return len(self.ids)


class Operator:
    """Base for class operators: `setup()` once per actor, then `__call__` per table."""
    reads: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()

    def setup(self) -> None:  # load heavy state; called once per actor
        pass

    def __call__(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError


def check_columns(table: pa.Table, needed: tuple[str, ...], who: str) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise KeyError(f"{who} needs columns {missing}; the table has {table.column_names}")
