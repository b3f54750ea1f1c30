"""filter: user document filters from the config, run as a stage like any other.

    filters:
      - {callable: "my_filters:drop_short", params: {min_chars: 200}}

Each callable is imported from the user's module (PYTHONPATH or the job's working dir), gets
a `pyarrow.Table` of documents (operators.schema.DOC_SCHEMA) plus its params as keyword
arguments, and returns a boolean keep-mask (array or list, one entry per row). Filters run in
config order on one part at a time; a dropped row is counted as filtered with the filter's
name as the reason. Output: `filter/parts/<part>.arrow` (parts left empty are dropped).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections import Counter

import numpy as np
import pyarrow as pa

from operators import schema as S
from pipeline import sink
from pipeline.config import ConfigError
from pipeline.layout import INTERMEDIATE_COMPRESSION
from pipeline.stages.base import Context, Item, Result, Run, Stage


def load_filter(spec: str):
    """`module:function` -> the function; raises ValueError naming what is missing."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # a local run: the user's module sits in the working directory
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} ({e}); put it on PYTHONPATH or in the "
                         f"job's working directory") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no callable {attr!r}")
    return fn


def keep_mask(name: str, fn, docs: pa.Table, params: dict) -> np.ndarray:
    """The filter's keep-mask as a bool array, checked for shape and type."""
    mask = fn(docs, **params)
    if isinstance(mask, (pa.Array, pa.ChunkedArray)):
        mask = mask.to_numpy(zero_copy_only=False)
    mask = np.asarray(mask)
    if mask.shape != (docs.num_rows,) or mask.dtype != np.bool_:
        raise ValueError(f"filter {name}: expected a boolean keep-mask of {docs.num_rows} entries, "
                         f"got {mask.dtype} with shape {mask.shape}")
    return mask


@dataclasses.dataclass(frozen=True)
class Part(Item):
    input_stage: str


class Filter(Stage):
    name = "filter"
    reads = tuple(S.DOC_SCHEMA.names)

    @classmethod
    def enabled(cls, config) -> bool:
        return bool(config.filters)

    def check(self) -> None:
        for i, f in enumerate(self.config.filters):
            try:
                load_filter(f.callable)
            except ValueError as e:
                raise ConfigError(f"filters.{i}.callable: {e}") from None

    def plan(self, run: Run) -> list[Part]:
        return [Part(p["name"], run.doc_stage) for p in run.parts]

    @staticmethod
    def work(ctx: Context, item: Part) -> Result:
        docs = sink.read_table(ctx.layout.part(item.input_stage, item.name))
        rows_in, reasons = docs.num_rows, Counter()
        for f in ctx.config.filters:
            mask = keep_mask(f.label, load_filter(f.callable), docs, dict(f.params))
            if not mask.all():
                reasons[f.label] += int((~mask).sum())
                docs = docs.filter(pa.array(mask))
        sink.write_table(ctx.layout.part("filter", item.name), docs, compression=INTERMEDIATE_COMPRESSION,
                         rows_per_batch=1 << 16)
        return Result(item.name, rows_in=rows_in, rows_out=docs.num_rows, rows_filtered=rows_in - docs.num_rows,
                      reasons=dict(reasons), data={"rows": docs.num_rows})

    def finish(self, run: Run, results: list[Result]) -> None:
        rows = {r.item: r.data["rows"] for r in results}
        run.documents_now_in("filter", rows)
        dropped = Counter()
        for r in results:
            dropped.update(r.reasons)
        if dropped:
            run.say("filter: dropped " + ", ".join(f"{n} by {k}" for k, n in dropped.most_common()))
