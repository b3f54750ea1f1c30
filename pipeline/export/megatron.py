"""Megatron-LM / Megatron-Core indexed dataset: `<prefix>.bin` + `<prefix>.idx`, one document per entry.

Layout (megatron/core/datasets/indexed_dataset.py, `_IndexWriter`, version 1):

    .idx  b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence count N |
          <Q document count N+1 | int32 lengths[N] | int64 byte pointers[N] | int64 document_indices[N+1]
    .bin  the tokens of every sequence back to back, in the dtype

dtype follows `DType.optimal_dtype(vocab_size)`: uint16 below 65,500 ids, int32 otherwise.
Each document is one sequence (document_indices = 0..N), whole (split pieces joined), ending
with EOS when the manifest's tokenizer has `add_eos` (Megatron's `eod`). Megatron keeps no
per-token loss mask: target and selection masks are dropped, so the registry refuses the
format on masked shards unless `allow_drop_masks`.

`.bin` streams to disk; lengths spool to an unnamed temporary file (4 bytes a document) and
the `.idx` is assembled from it in chunks at the end, so memory stays flat whatever the size.

`megatron-blend` writes one prefix per CLIMB domain (`domain-00003.bin/.idx`) and the
`--data-path w1 p1 w2 p2 ...` string of the mixture's weights (`data_path.txt`).
"""
from __future__ import annotations

import json
import struct
import tempfile

import numpy as np

from pipeline import storage
from pipeline.export.base import DocumentList, ExportError, ExportFormat, ExportJob, cast_tokens, check_totals
from pipeline.export.documents import iter_document_batches
from pipeline.export.files import BackgroundFile, OutputDir

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}  # megatron DType enum values
_CHUNK = 1 << 20  # index entries per chunk when assembling the .idx


def megatron_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Streams whole documents into `<prefix>.bin`; `close()` writes `<prefix>.idx` and commits both."""

    def __init__(self, out: OutputDir, prefix: str, dtype: type):
        self.out, self.prefix, self.dtype = out, prefix, np.dtype(dtype)
        self.bin_tmp = out.temp(prefix + ".bin")
        self._bin = BackgroundFile(self.bin_tmp)
        self._lengths = tempfile.TemporaryFile()
        self.num_docs = self.num_tokens = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self._bin.write(cast_tokens(ids, self.dtype.type, self.prefix))
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.num_docs += len(lengths)
        self.num_tokens += len(ids)

    def abort(self) -> None:
        """Stop the writer thread after a failure (the temporaries are left for the next run to remove)."""
        try:
            self._bin.close()
        except OSError:
            pass

    def close(self) -> None:
        self._bin.close()
        idx_tmp = self.out.temp(self.prefix + ".idx")
        n = self.num_docs
        with open(idx_tmp, "wb", buffering=1 << 22) as idx:
            idx.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
            self._lengths.seek(0)
            while chunk := self._lengths.read(_CHUNK * 4):
                idx.write(chunk)
            self._lengths.seek(0)
            pointer = 0
            while chunk := self._lengths.read(_CHUNK * 4):
                bytes_ = np.frombuffer(chunk, np.int32).astype(np.int64) * self.dtype.itemsize
                idx.write((np.cumsum(bytes_) - bytes_ + pointer).tobytes())
                pointer += int(bytes_.sum())
            for a in range(0, n + 1, _CHUNK):
                idx.write(np.arange(a, min(a + _CHUNK, n + 1), dtype=np.int64).tobytes())
        self._lengths.close()
        self.out.commit(self.bin_tmp, self.prefix + ".bin")
        self.out.commit(idx_tmp, self.prefix + ".idx")


def write(job: ExportJob) -> dict:
    dtype = megatron_dtype(job.shards.vocab_size)
    writer = IndexedDatasetWriter(job.out, "data", dtype)
    docs = DocumentList(job.out)
    try:
        for batch in iter_document_batches(job.shards, masks=False):
            writer.add(batch.input_ids, batch.lengths)
            docs.add(batch)
        check_totals(job.shards, writer.num_docs, writer.num_tokens)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    docs.close()
    tok = job.shards.manifest["tokenizer"]
    return {"counts": {"docs": writer.num_docs, "tokens": writer.num_tokens},
            "prefix": job.out.path("data"), "dtype": np.dtype(dtype).name,
            "eod_id": tok["eos_id"] if tok.get("add_eos", True) else None}


def mixture_weights(job: ExportJob) -> dict[int, float]:
    """Domain weights: run_dir/mixture/mixture.json, else the shard manifest's mixture block."""
    path = storage.join(job.run_dir, "mixture", "mixture.json")
    weights = json.loads(storage.read_text(path)).get("weights") if storage.exists(path) else None
    weights = weights or job.shards.manifest.get("mixture", {}).get("weights")
    if not weights:
        raise ExportError(f"megatron-blend needs the mixture's domain weights: neither {path} nor the shard "
                          f"manifest's mixture block has them (run with cluster and mixture sections)")
    return {int(d): float(w) for d, w in weights.items()}


def _write_domains(job: ExportJob, weights: dict[int, float], writers: dict, docs: DocumentList, dtype) -> None:
    for batch in iter_document_batches(job.shards, masks=False):
        if batch.domain_ids is None:
            raise ExportError(f"{job.shards.shard_dir}: the shards have no domain_ids column, so there are no "
                              f"domains to split (megatron-blend needs a run with a cluster section)")
        if (batch.domain_ids < 0).any():
            raise ExportError(f"{job.shards.shard_dir}: documents without a domain in the shards")
        for d in np.unique(batch.domain_ids).tolist():
            if d not in weights:
                raise ExportError(f"domain {d} has documents but no weight in the mixture {sorted(weights)}")
            part = batch.take(np.flatnonzero(batch.domain_ids == d))
            if d not in writers:
                writers[d] = IndexedDatasetWriter(job.out, f"domain-{d:05d}", dtype)
            writers[d].add(part.input_ids, part.lengths)
        docs.add(batch)


def write_blend(job: ExportJob) -> dict:
    dtype = megatron_dtype(job.shards.vocab_size)
    weights = mixture_weights(job)
    writers: dict[int, IndexedDatasetWriter] = {}
    docs = DocumentList(job.out)
    try:
        _write_domains(job, weights, writers, docs, dtype)
        num_docs = sum(w.num_docs for w in writers.values())
        num_tokens = sum(w.num_tokens for w in writers.values())
        check_totals(job.shards, num_docs, num_tokens)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for d in sorted(writers):
        writers[d].close()
    docs.close()
    data_path = " ".join(f"{weights[d]:.10g} {job.out.path(writers[d].prefix)}" for d in sorted(writers))
    job.out.write_small("data_path.txt", (data_path + "\n").encode())
    return {"counts": {"docs": num_docs, "tokens": num_tokens, "domains": len(writers)},
            "dtype": np.dtype(dtype).name, "data_path": data_path,
            "weights": {str(d): weights[d] for d in sorted(writers)},
            "domain_docs": {str(d): writers[d].num_docs for d in sorted(writers)},
            "weighted_domains_without_documents": sorted(set(weights) - set(writers))}


MEGATRON = ExportFormat("megatron", keeps_masks=False, write=write,
                        summary="Megatron indexed dataset data.bin/.idx, one document per entry")
MEGATRON_BLEND = ExportFormat("megatron-blend", keeps_masks=False, write=write_blend,
                              summary="one Megatron prefix per domain + the --data-path blend string")
