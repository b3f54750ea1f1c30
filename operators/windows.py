"""Split documents longer than the scoring window into windows, and join results back.

The window is what the trainer will see: `pack.seq_len` (pack splits a longer document
into pieces at multiples of seq_len, each its own attention segment whose first token is
not a target), or the models' context when that is shorter. Scoring window k of a
document is then scoring exactly the piece the trainer trains on, so the stored
`ref_loss` of every token was computed with the context the live model will have, and
REL = ref_loss - live loss compares like with like. A window after the first carries no
prompt of its document; the selection scores it by REL alone (`operators/select.py`).
The first token of each window has no context inside it, so it is not a target there.
The joined columns (`loss_mask`, `token_scores`, `ref_loss`) have the document's length.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from operators import schema as S


def split_long_documents(table: pa.Table, max_len: int) -> tuple[pa.Table, np.ndarray]:
    """(window table, number of windows per input row); unchanged when nothing is too long."""
    lengths = np.diff(table.column(S.INPUT_IDS).combine_chunks().offsets.to_numpy())
    n_win = np.maximum(1, -(-lengths // max_len))
    if (n_win == 1).all():
        return table, n_win
    ids = table.column(S.INPUT_IDS).to_pylist()
    tms = table.column(S.TARGET_MASK).to_pylist()
    doc_ids = table.column(S.ID).to_pylist()
    out_id, out_ids, out_tm = [], [], []
    for d, seq, tm, n in zip(doc_ids, ids, tms, n_win):
        for k in range(n):
            window_tm = list(tm[k * max_len:(k + 1) * max_len])
            if k:
                window_tm[0] = 0
            out_id.append(d if n == 1 else f"{d}#w{k}")
            out_ids.append(seq[k * max_len:(k + 1) * max_len])
            out_tm.append(window_tm)
    return pa.table({S.ID: out_id, S.INPUT_IDS: pa.array(out_ids, pa.list_(pa.int32())),
                     S.TARGET_MASK: pa.array(out_tm, pa.list_(pa.uint8()))}), n_win


JOINED_COLUMNS = (S.LOSS_MASK, S.TOKEN_SCORES, S.REF_LOSS)


def join_windows(table: pa.Table, scored: pa.Table, n_win: np.ndarray) -> pa.Table:
    """Attach the windows' loss_mask, token_scores and ref_loss (those present) to the rows."""
    names = [c for c in JOINED_COLUMNS if c in scored.column_names]
    if len(scored) == len(table):
        cols = {c: scored.column(c) for c in names}
    else:
        offsets = table.column(S.INPUT_IDS).combine_chunks().offsets
        offsets = pa.array(offsets.to_numpy() - offsets[0].as_py(), pa.int32())  # a slice's offsets
        cols = {c: pa.ListArray.from_arrays(offsets, pa.concat_arrays([a.flatten() for a in scored.column(c).chunks])
                                            if scored.column(c).num_chunks > 1
                                            else scored.column(c).combine_chunks().flatten()) for c in names}
    out = table.drop_columns([c for c in cols if c in table.column_names])
    for c, v in cols.items():
        out = out.append_column(c, v)
    return out
