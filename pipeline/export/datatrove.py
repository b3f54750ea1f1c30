"""DataTrove tokenized files (read by DataTrove's `DatatroveFolderDataset` and by nanotron).

Layout (datatrove/pipeline/tokens/tokenizer.py, `TokenizedFile`, datatrove 0.10.1):

    tokens.ds           every document's tokens back to back, little-endian uint16 (vocab <= 65,536) or uint32
    tokens.ds.index     uint64 end position (in tokens, exclusive) of each document
    tokens.ds.loss      one bool byte per token: 1 where the token is a training target (our loss_mask)
    tokens.ds.metadata  "<tokenizer>|<token size>", the token count, the count in words

Documents are whole (split pieces joined). The readers cut the stream into windows of
seq_len + 1 tokens regardless of document ends (positions restart at each `.index` end):
our packing is not kept, and `DatatroveFolderDataset` does not read `.ds.loss` (DataTrove's
merger does, and copies it), so a trainer that wants the selection must read it itself.
"""
from __future__ import annotations

import numpy as np

from pipeline.export.base import (DocumentList, ExportFormat, ExportJob, cast_tokens, check_totals,
                                  unsigned_token_dtype)
from pipeline.export.documents import iter_document_batches
from pipeline.export.files import BackgroundFile

NAME = "tokens.ds"


def _metric(n: int) -> str:
    """The metadata file's third line (DataTrove writes humanize.metric(n, unit="T"))."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}T"
    return f"{n} T"


def write(job: ExportJob) -> dict:
    dtype = unsigned_token_dtype(job.shards.vocab_size)
    token_size = np.dtype(dtype).itemsize
    tmp = {suffix: job.out.temp(NAME + suffix) for suffix in ("", ".index", ".loss")}
    files = {suffix: BackgroundFile(path) for suffix, path in tmp.items()}
    docs = DocumentList(job.out)
    num_docs = num_tokens = loss_tokens = 0
    try:
        for batch in iter_document_batches(job.shards):
            files[""].write(cast_tokens(batch.input_ids, dtype, NAME))
            files[".index"].write((np.cumsum(batch.lengths, dtype=np.uint64) + np.uint64(num_tokens)).tobytes())
            files[".loss"].write(batch.loss_mask)  # 0/1 bytes: already DataTrove's bools
            docs.add(batch)
            num_docs += batch.num_docs
            num_tokens += len(batch.input_ids)
            loss_tokens += int(batch.loss_mask.sum())
    finally:
        for f in files.values():
            f.close()
    check_totals(job.shards, num_docs, num_tokens, loss_tokens)
    for suffix, path in tmp.items():
        job.out.commit(path, NAME + suffix)
    tok = job.shards.manifest["tokenizer"]
    meta = f"{tok.get('name') or tok['spec']}|{token_size}\n{num_tokens}\n{_metric(num_tokens)}"
    job.out.write_small(NAME + ".metadata", meta.encode())
    docs.close()
    return {"counts": {"docs": num_docs, "tokens": num_tokens, "loss_tokens": loss_tokens},
            "token_size": token_size}


DATATROVE = ExportFormat("datatrove", keeps_masks=True, write=write,
                         summary="DataTrove/nanotron tokens.ds + .ds.index + .ds.loss")
