"""Split documents longer than a model's context into windows, and join results back.

The scoring models see at most `max_len` positions. A longer document is scored
as independent windows of `max_len` tokens; the first token of each window has
no context inside it, so it is not a target there (and is never selected). The
joined `loss_mask` / `token_scores` have the document's full length again.
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


def join_windows(table: pa.Table, scored: pa.Table, n_win: np.ndarray) -> pa.Table:
    """Attach the windows' loss_mask and token_scores to the original rows."""
    if len(scored) == len(table):
        cols = {S.LOSS_MASK: scored.column(S.LOSS_MASK), S.TOKEN_SCORES: scored.column(S.TOKEN_SCORES)}
    else:
        offsets = table.column(S.INPUT_IDS).combine_chunks().offsets
        cols = {c: pa.ListArray.from_arrays(offsets, pa.concat_arrays(
                    [a.flatten() for a in scored.column(c).chunks]) if scored.column(c).num_chunks > 1
                    else scored.column(c).combine_chunks().flatten()) for c in (S.LOSS_MASK, S.TOKEN_SCORES)}
    out = table.drop_columns([c for c in cols if c in table.column_names])
    for c, v in cols.items():
        out = out.append_column(c, v)
    return out
