"""OLMo-core numpy token files (`olmo_core.data.numpy_dataset`, ai2-olmo-core 3.0.0).

    token_ids_part_00000.npy      headerless memmap of every document's tokens, uint16 (vocab <= 65,536) or uint32
    token_ids_part_00000.csv.gz   Dolma metadata: "start,end" (token indices, end exclusive) per document
    label_mask_part_00000.npy     headerless bool memmap, 1 where the token is a training target (our loss_mask)

Pass the `.npy` as `paths` and the mask as `label_mask_paths` (same order) to any
`NumpyDatasetConfig` / `NumpyFSLDataset` / `NumpyPaddedFSLDataset` / `NumpyVSLDataset`.
OLMo-core finds document boundaries at EOS tokens (and EOS followed by BOS when given
`bos_token_id`), so every document must end with the manifest's `eos_id`: the export refuses
shards tokenized with `add_eos: false`. The `.csv.gz` holds the exact boundaries for readers
that take them from metadata (`use_array_if_local=False`); `docs_with_inner_eos` in
export.json counts documents that contain the EOS id before their end (an SFT template can put
it there), which EOS-based inference would split. Documents are whole (split pieces joined);
the FSL datasets then cut the stream into fixed windows, so our packing is not kept.
"""
from __future__ import annotations

import gzip
import io

import numpy as np

from pipeline.export.base import (DocumentList, ExportError, ExportFormat, ExportJob, cast_tokens, check_totals,
                                  unsigned_token_dtype)
from pipeline.export.documents import iter_document_batches
from pipeline.export.files import BackgroundFile

TOKENS = "token_ids_part_00000.npy"
METADATA = "token_ids_part_00000.csv.gz"
LABEL_MASK = "label_mask_part_00000.npy"


def write(job: ExportJob) -> dict:
    tok = job.shards.manifest["tokenizer"]
    if not tok.get("add_eos", True) or tok.get("eos_id") is None:
        raise ExportError(f"{job.shards.shard_dir}: OLMo-core finds document boundaries at EOS, but tokenizer "
                          f"{tok.get('name')!r} ran with add_eos: false; re-run it with add_eos: true")
    eos = int(tok["eos_id"])
    dtype = unsigned_token_dtype(job.shards.vocab_size)
    tmp = {name: job.out.temp(name) for name in (TOKENS, METADATA, LABEL_MASK)}
    tokens, masks = BackgroundFile(tmp[TOKENS]), BackgroundFile(tmp[LABEL_MASK])
    # No file name and mtime 0 in the gzip header: the same shards give the same bytes.
    meta = io.TextIOWrapper(gzip.GzipFile(filename="", mode="wb", compresslevel=1, mtime=0,
                                          fileobj=open(tmp[METADATA], "wb")), encoding="ascii")
    docs = DocumentList(job.out)
    num_docs = num_tokens = loss_tokens = inner_eos = no_eos = 0
    try:
        for batch in iter_document_batches(job.shards):
            ends = np.cumsum(batch.lengths)
            last = ends - 1
            no_eos += int((batch.input_ids[last] != eos).sum())
            eos_at = np.flatnonzero(batch.input_ids == eos)
            is_last = np.zeros(len(batch.input_ids), bool)
            is_last[last] = True
            inner = eos_at[~is_last[eos_at]]  # EOS ids before a document's end: the documents holding them
            inner_eos += len(np.unique(np.searchsorted(ends, inner, side="right")))
            tokens.write(cast_tokens(batch.input_ids, dtype, TOKENS))
            masks.write(batch.loss_mask)  # 0/1 bytes: already numpy's bools
            starts = (ends - batch.lengths + num_tokens).tolist()
            meta.write("".join(f"{s},{e}\n" for s, e in zip(starts, (ends + num_tokens).tolist())))
            docs.add(batch)
            num_docs += batch.num_docs
            num_tokens += len(batch.input_ids)
            loss_tokens += int(batch.loss_mask.sum())
    finally:
        tokens.close()
        masks.close()
        meta.close()
    if no_eos:
        raise ExportError(f"{job.shards.shard_dir}: {no_eos} documents do not end with eos_id {eos}; "
                          f"OLMo-core would merge them with the next one")
    check_totals(job.shards, num_docs, num_tokens, loss_tokens)
    for name, path in tmp.items():
        job.out.commit(path, name)
    docs.close()
    return {"counts": {"docs": num_docs, "tokens": num_tokens, "loss_tokens": loss_tokens},
            "dtype": np.dtype(dtype).name, "eos_token_id": eos, "bos_token_id": tok.get("bos_id"),
            "paths": [job.out.path(TOKENS)], "label_mask_paths": [job.out.path(LABEL_MASK)],
            "docs_with_inner_eos": inner_eos}


OLMO = ExportFormat("olmo", keeps_masks=True, write=write,
                    summary="OLMo-core token_ids .npy + label_mask .npy + Dolma .csv.gz metadata")
