"""What every exporter shares: the format record, the job it gets, the document list it writes."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from pipeline.export.documents import DocumentBatch, ShardSet
from pipeline.export.files import OutputDir


class ExportError(ValueError):
    """An export that cannot be done as asked (the message says why and what to change)."""


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One registry entry.

    keeps_masks: whether the written files hold the per-token loss mask. A format that does
    not is refused on shards whose masks say more than "every token but each document's
    first" (a selection ran, or SFT prompts are masked) unless `allow_drop_masks` is given.
    write(job) streams the files into job.out and returns {"counts": {...}, **extra}.
    """
    name: str
    keeps_masks: bool
    write: Callable[["ExportJob"], dict]
    summary: str


@dataclasses.dataclass
class ExportJob:
    shards: ShardSet
    out: OutputDir
    tokenizer: str
    run_dir: str


def unsigned_token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (vocab <= 65,536), else uint32: DataTrove's and OLMo-core's rule."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def cast_tokens(ids: np.ndarray, dtype: type, where: str) -> np.ndarray:
    """int32 ids as `dtype`, refusing ids that do not fit (a manifest whose vocab_size is too small)."""
    if np.dtype(dtype).itemsize >= ids.dtype.itemsize:  # widening or same: only a negative id cannot fit
        if np.dtype(dtype).kind == "u" and len(ids) and int(ids.min()) < 0:
            raise ExportError(f"{where}: negative token id {int(ids.min())}")
        same = np.dtype(dtype).itemsize == ids.dtype.itemsize
        return ids.view(dtype) if same else ids.astype(dtype)  # int32 -> uint32: the same bits, no copy
    if len(ids) and (int(ids.max()) > np.iinfo(dtype).max or int(ids.min()) < 0):
        raise ExportError(f"{where}: token id {int(ids.max())} does not fit {np.dtype(dtype).name} "
                          f"(manifest vocab_size is too small)")
    return ids.astype(dtype, copy=False)


class DocumentList:
    """`documents.arrow`: entry i of a document-level export is document doc_id[i] (num_tokens, domain_id).

    Arrow IPC file, one record batch per DocumentBatch, so a trainer's sample can be traced back
    to the source document id.
    """
    NAME = "documents.arrow"

    def __init__(self, out: OutputDir, name: str = NAME):
        self.out, self.name = out, name
        self.tmp = out.temp(name)
        self._schema = pa.schema([("doc_id", pa.string()), ("num_tokens", pa.int32()), ("domain_id", pa.int32())])
        self._file = pa.OSFile(self.tmp, "wb")
        self._writer = pa.ipc.new_file(self._file, self._schema)

    def add(self, batch: DocumentBatch) -> None:
        domains = (pa.nulls(batch.num_docs, pa.int32()) if batch.domain_ids is None
                   else pa.array(batch.domain_ids, pa.int32(), mask=batch.domain_ids < 0))
        self._writer.write_batch(pa.record_batch(
            [batch.doc_ids, pa.array(batch.lengths.astype(np.int32)), domains], schema=self._schema))

    def close(self) -> None:
        self._writer.close()
        self._file.close()
        self.out.commit(self.tmp, self.name)


def check_totals(shards: ShardSet, docs: int, tokens: int, loss_tokens: int | None = None) -> None:
    """The export holds exactly the manifest's documents, tokens (and loss tokens), or it is not committed."""
    c = shards.manifest["counts"]
    got = (docs, tokens) + (() if loss_tokens is None else (loss_tokens,))
    want = (c["docs"], c["tokens"]) + (() if loss_tokens is None else (c["loss_tokens"],))
    if got != want:
        raise ExportError(f"{shards.shard_dir}: exported documents/tokens/loss tokens {got} but the manifest "
                          f"counts {want}")
