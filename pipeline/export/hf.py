"""An HF `datasets` directory (`datasets.load_from_disk`) for HF Trainer and TRL, packing kept.

One example per shard row, padding stripped (`num_tokens` long):

    input_ids     list<int32>  the row's tokens
    labels        list<int32>  input_ids where loss_mask is 1, -100 elsewhere (HF shifts labels inside the model)
    position_ids  list<int32>  restarting at 0 at every document piece
    seq_lengths   list<int32>  the length of every piece, what TRL's padding-free collator reads

The directory is what `Dataset.save_to_disk` writes: `data-0000i-of-0000n.arrow` (Arrow IPC
streams with the `huggingface` schema metadata, one per source shard, so an export streams a
record batch at a time), `state.json` and `dataset_info.json` (built with `datasets`' own
`DatasetInfo` and `Features`). Every mask survives (labels carry the selection), and rows
are our packed rows: train padding-free (TRL `SFTConfig(padding_free=True)`, or transformers'
`DataCollatorWithFlattening`) so attention stays inside each piece. Rows are in shard order,
so example i is shard row i (its doc_ids are in the shards).
"""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from pipeline.export.base import ExportFormat, ExportJob, check_totals
from pipeline.export.documents import piece_table, real_tokens

COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths")


def features():
    import datasets
    return datasets.Features({c: datasets.List(datasets.Value("int32")) for c in COLUMNS})


def _rows(batch: pa.RecordBatch, file: str, schema: pa.Schema) -> tuple[pa.RecordBatch, int, int]:
    """(HF record batch, documents starting in it, loss tokens) for one shard record batch."""
    _, _, length, start, _ = piece_table(batch, file)
    ntok = batch.column(S.NUM_TOKENS).to_numpy().astype(np.int64)
    ids = real_tokens(batch, S.INPUT_IDS, ntok)
    loss = real_tokens(batch, S.LOSS_MASK, ntok)
    labels = np.where(loss.astype(bool), ids, np.int32(-100)).astype(np.int32)
    pos = real_tokens(batch, S.POSITION_IDS, ntok)
    tok_offsets = pa.array(np.r_[0, np.cumsum(ntok)].astype(np.int32))
    pieces_per_row = pc.list_value_length(batch.column(S.DOC_OFFSETS)).to_numpy(zero_copy_only=False)
    piece_offsets = pa.array(np.r_[0, np.cumsum(pieces_per_row)].astype(np.int32))

    def lists(offsets, values):
        return pa.ListArray.from_arrays(offsets, pa.array(values, pa.int32()))

    out = pa.record_batch([lists(tok_offsets, ids), lists(tok_offsets, labels), lists(tok_offsets, pos),
                           lists(piece_offsets, length.astype(np.int32))], schema=schema)
    return out, int((start == 0).sum()), int(loss.sum())


def write(job: ExportJob) -> dict:
    import datasets
    feats = features()
    schema = feats.arrow_schema
    n = len(job.shards.files)
    names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
    rows = docs = tokens = loss_tokens = 0
    for name, file in zip(names, job.shards.files):
        tmp = job.out.temp(name)
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in job.shards.record_batches(file):
                out, d, lt = _rows(batch, file, schema)
                writer.write_batch(out)
                rows += batch.num_rows
                docs += d
                tokens += int(pc.sum(batch.column(S.NUM_TOKENS)).as_py() or 0)
                loss_tokens += lt
        job.out.commit(tmp, name)
    check_totals(job.shards, docs, tokens, loss_tokens)
    fingerprint = job.shards.manifest_sha256[:16]
    state = {"_data_files": [{"filename": f} for f in names], "_fingerprint": fingerprint,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    about = f"tokenmill shards (manifest sha256 {job.shards.manifest_sha256})"
    info = asdict(datasets.DatasetInfo(features=feats, description=about))
    job.out.write_small("state.json", json.dumps(state, indent=2, sort_keys=True).encode())
    job.out.write_small("dataset_info.json", json.dumps({k: info[k] for k in sorted(info)}, indent=2).encode())
    return {"counts": {"rows": rows, "docs": docs, "tokens": tokens, "loss_tokens": loss_tokens},
            "columns": list(COLUMNS)}


HF = ExportFormat("hf", keeps_masks=True, write=write,
                  summary="HF datasets directory (input_ids, labels, position_ids, seq_lengths) for Trainer/TRL")
