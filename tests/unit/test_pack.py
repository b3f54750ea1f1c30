"""Packing invariants: every token of every document exactly once, masks consistent."""
import numpy as np
import pyarrow as pa
import pytest

from operators import schema as S
from operators.pack import assign_best_fit, pack_table
from operators.tokenize import tokenized_table


def random_docs(rng, n, max_len, with_loss=False):
    lengths = rng.integers(1, max_len, n)
    ids = [list(rng.integers(5, 1000, L)) for L in lengths]
    masks = [np.r_[0, rng.integers(0, 2, L - 1)].astype(np.uint8) for L in lengths]
    t = tokenized_table(pa.array([f"doc{i}" for i in range(n)]), ids, masks)
    if with_loss:
        loss = [m & rng.integers(0, 2, len(m)).astype(np.uint8) for m in masks]
        offsets = t.column(S.INPUT_IDS).combine_chunks().offsets
        t = t.append_column(S.LOSS_MASK, pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(loss))))
    return t, ids, masks


def unpack(rows, seq_len):
    """doc id -> list of (start, ids, target) pieces, from the packed rows."""
    out = {}
    ids = rows.column(S.INPUT_IDS).combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
    tgt = rows.column(S.TARGET_MASK).combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
    for r in range(rows.num_rows):
        offs = rows.column(S.DOC_OFFSETS)[r].as_py() + [rows.column(S.NUM_TOKENS)[r].as_py()]
        for k, (d, s) in enumerate(zip(rows.column(S.DOC_IDS)[r].as_py(), rows.column(S.DOC_TOKEN_STARTS)[r].as_py())):
            out.setdefault(d, []).append((s, ids[r, offs[k]:offs[k + 1]], tgt[r, offs[k]:offs[k + 1]]))
    return out


@pytest.mark.parametrize("method", ["best_fit", "greedy"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_token_exactly_once_and_masks_consistent(method, seed):
    rng = np.random.default_rng(seed)
    seq_len = 64
    table, ids, masks = random_docs(rng, 300, 200, with_loss=True)
    rows, stats = pack_table(table, seq_len=seq_len, pad_id=0, method=method)
    pieces = unpack(rows, seq_len)
    assert len(pieces) == 300 == stats.docs
    for i in range(300):
        ps = sorted(pieces[f"doc{i}"], key=lambda p: p[0])
        assert np.concatenate([p[1] for p in ps]).tolist() == list(ids[i])
        assert [p[0] for p in ps] == list(range(0, len(ids[i]), seq_len))  # split only when longer than seq_len
        for s, _, t in ps:  # a piece's first token is never a target; the rest keep the document's mask
            assert t[0] == 0 and (t[1:] == masks[i][s + 1:s + len(t)]).all()
    pos = rows.column(S.POSITION_IDS).combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
    tgt = rows.column(S.TARGET_MASK).combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
    loss = rows.column(S.LOSS_MASK).combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
    ntok = rows.column(S.NUM_TOKENS).to_numpy()
    pad = np.arange(seq_len)[None] >= ntok[:, None]
    assert (loss <= tgt).all() and not tgt[pad].any() and not pos[pad].any()
    ids_out = rows.column(S.INPUT_IDS).combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
    assert (ids_out[pad] == 0).all()
    assert stats.tokens == ntok.sum() == sum(map(len, ids))
    assert stats.pad_tokens == pad.sum() and stats.rows == rows.num_rows
    # positions restart at 0 at each piece
    starts = np.zeros_like(pos, bool)
    for r in range(rows.num_rows):
        starts[r, rows.column(S.DOC_OFFSETS)[r].as_py()] = True
    assert (pos[starts] == 0).all() and ((pos[~starts & ~pad]) > 0).all()


@pytest.mark.parametrize("method", ["best_fit", "greedy"])
def test_plain_documents_pack_as_the_general_mask_path_does(method):
    """Plain documents (targets everywhere but the first token) skip the mask gather: the rows are
    the same as when the masks are gathered, and one target 0 elsewhere takes the gathering path."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 300, 400)              # empty documents, and longer than seq_len
    ids = [list(rng.integers(5, 1000, n)) for n in lengths]
    masks = [np.r_[0, np.ones(n - 1)].astype(np.uint8) if n else np.zeros(0, np.uint8) for n in lengths]

    def packed(masks, gathered):
        t = tokenized_table(pa.array([f"doc{i}" for i in range(len(ids))]), ids, masks)
        if gathered:   # a loss mask equal to the targets: the packer gathers both
            t = t.append_column(S.LOSS_MASK, t.column(S.TARGET_MASK))
        return pack_table(t, seq_len=128, pad_id=0, method=method)[0]
    fast = packed(masks, gathered=False)
    assert fast.equals(packed(masks, gathered=True))
    inner = next(i for i, n in enumerate(lengths) if 10 < n < 100)
    masks[inner][5] = 0
    rows = packed(masks, gathered=False)
    assert rows.equals(packed(masks, gathered=True)) and not rows.equals(fast)
    assert unpack(rows, 128)[f"doc{inner}"][0][2][5] == 0


def test_best_fit_beats_greedy_and_is_deterministic():
    rng = np.random.default_rng(7)
    table, _, _ = random_docs(rng, 2000, 300)
    best, bs = pack_table(table, seq_len=256, pad_id=0)
    _, gs = pack_table(table, seq_len=256, pad_id=0, method="greedy")
    assert bs.padding_fraction < gs.padding_fraction
    again, _ = pack_table(table, seq_len=256, pad_id=0)
    assert again.equals(best)


def test_best_fit_choice_by_hand():
    # seq_len 10: pieces 6, 5, 4, 4, 1 -> rows [6,4], [5,4,1]
    rows = assign_best_fit(np.array([6, 5, 4, 4, 1]), 10)
    assert rows.tolist() == [0, 1, 0, 1, 1]


def test_split_document_counts():
    t = tokenized_table(pa.array(["long", "short"]), [list(range(25)), [1, 2, 3]],
                        [np.r_[0, np.ones(24)].astype(np.uint8), np.array([0, 1, 1], np.uint8)])
    rows, stats = pack_table(t, seq_len=10, pad_id=0)
    assert stats.split_docs == 1 and stats.pieces == 4 and stats.docs == 2 and stats.rows == 3
    # targets: long doc 24 minus the first token of its 2 continuation pieces, short doc 2
    assert stats.target_tokens == 22 + 2


def test_long_documents_are_scored_in_windows_and_joined_back():
    from operators.windows import join_windows, split_long_documents
    t = tokenized_table(pa.array(["a", "b"]), [list(range(10)), [1, 2, 3]],
                        [np.r_[0, np.ones(9)].astype(np.uint8), np.array([0, 1, 1], np.uint8)])
    windows, n_win = split_long_documents(t, 4)
    assert n_win.tolist() == [3, 1] and windows.column(S.ID).to_pylist() == ["a#w0", "a#w1", "a#w2", "b"]
    assert windows.column(S.TARGET_MASK).to_pylist()[1] == [0, 1, 1, 1]  # no context at a window start
    # pretend-scored: keep every target, score = position
    offsets = windows.column(S.INPUT_IDS).combine_chunks().offsets
    flat_tm = windows.column(S.TARGET_MASK).combine_chunks().flatten()
    scored = windows.append_column(S.LOSS_MASK, pa.ListArray.from_arrays(offsets, flat_tm)).append_column(
        S.TOKEN_SCORES, pa.ListArray.from_arrays(offsets, pa.array(np.arange(13, dtype=np.float32))))
    joined = join_windows(t, scored, n_win)
    assert joined.column(S.LOSS_MASK).to_pylist() == [[0, 1, 1, 1, 0, 1, 1, 1, 0, 1], [0, 1, 1]]
    assert joined.column(S.TOKEN_SCORES).to_pylist()[0] == list(range(10))
