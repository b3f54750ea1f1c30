"""Selection math: hand-computed cases, invariants, ties, warm-up, segments, parameter errors."""
import math

import numpy as np
import pytest

from operators.select import (none_mask, num_kept, prompt_lengths, rho1_mask, segment_layout, select_rows,
                              sstoken_mask)

NAN = float("nan")

# One SFT sample: positions 0-1 prompt (BOS + 1 token), 2-5 response.
TM_A = np.array([0, 0, 1, 1, 1, 1], np.uint8)
HIST_A = np.array([NAN, NAN, 2.0, 1.0, 3.0, 1.5])
CUR_A = np.array([NAN, NAN, 1.0, 1.0, 1.0, 1.5])
REL_A = HIST_A - CUR_A                                 # response: [1, 0, 2, 0] -> norm [.5, 0, 1, 0]
ATTN_A = np.array([1.0, 1.0, 0.2, 0.9, 0.1, 0.4])      # prompt values are never read
# A sample whose REL and Attn are constant: every score ties, the 1e-8 avoids 0/0.
TM_B = np.array([0, 0, 1, 1, 1], np.uint8)
REL_B = np.array([NAN, NAN, 5.0, 5.0, 5.0])
ATTN_B = np.array([1.0, 1.0, 0.3, 0.3, 0.3])
TM_EMPTY = np.array([0, 0, 0], np.uint8)


def test_sstoken_hand_computed():
    # score = 0.5 * [.5, 0, 1, 0] + 0.5 * [.2, .9, .1, .4] = [.35, .45, .55, .20]; keep ceil(.6*4) = 3
    sel = sstoken_mask([REL_A, REL_B, np.full(3, NAN)], [ATTN_A, ATTN_B, np.zeros(3)],
                       [TM_A, TM_B, TM_EMPTY], gamma=0.5, ratio=0.6)
    assert sel.loss_masks[0].tolist() == [0, 0, 1, 1, 1, 0]
    np.testing.assert_allclose(sel.scores[0][2:], [0.35, 0.45, 0.55, 0.20], rtol=1e-6)
    assert np.isnan(sel.scores[0][:2]).all()
    # sample B: all three scores tie at 0.15; keep ceil(.6*3) = 2, lower positions first
    assert sel.loss_masks[1].tolist() == [0, 0, 1, 1, 0]
    np.testing.assert_allclose(sel.scores[1][2:], [0.15, 0.15, 0.15], rtol=1e-6)
    assert sel.loss_masks[2].tolist() == [0, 0, 0] and np.isnan(sel.scores[2]).all()
    assert all(m.dtype == np.uint8 for m in sel.loss_masks)
    assert all(s.dtype == np.float32 for s in sel.scores)


def test_sstoken_ratio_gamma_and_ties():
    # ratio 0.5: keep 2 -> positions 4 (.55) and 3 (.45)
    assert sstoken_mask([REL_A], [ATTN_A], [TM_A], ratio=0.5).loss_masks[0].tolist() == [0, 0, 0, 1, 1, 0]
    # gamma 1: score = REL_norm [.5, 0, 1, 0]; keep 3 = pos 4, pos 2, then the 0-0 tie -> pos 3 (lower)
    assert sstoken_mask([REL_A], [ATTN_A], [TM_A], gamma=1.0).loss_masks[0].tolist() == [0, 0, 1, 1, 1, 0]
    # ratio 1 keeps every target
    assert sstoken_mask([REL_A], [ATTN_A], [TM_A], ratio=1.0).loss_masks[0].tolist() == TM_A.tolist()


def test_sstoken_warmup_uses_attention_only():
    # gamma forced to 0: score = Attn [.2, .9, .1, .4]; keep 3 -> positions 3, 5, 2
    sel = sstoken_mask([REL_A], [ATTN_A], [TM_A], gamma=0.5, warmup=True)
    assert sel.loss_masks[0].tolist() == [0, 0, 1, 1, 0, 1]
    np.testing.assert_allclose(sel.scores[0][2:], [0.2, 0.9, 0.1, 0.4], rtol=1e-6)


def test_rho1_hand_computed():
    # excess: doc0 [2, -.5, 3], doc1 [1, 1]; N = 5
    cur = [np.array([NAN, 3.0, 2.0, 4.0]), np.array([NAN, 1.0, 5.0])]
    ref = [np.array([NAN, 1.0, 2.5, 1.0]), np.array([NAN, 0.0, 4.0])]
    tm = [np.array([0, 1, 1, 1], np.uint8), np.array([0, 1, 1], np.uint8)]
    sel = rho1_mask(cur, ref, tm, ratio=0.6)  # keep ceil(3.0) = 3: 3, 2, then the 1-1 tie -> doc1 pos1
    assert [m.tolist() for m in sel.loss_masks] == [[0, 1, 0, 1], [0, 1, 0]]
    np.testing.assert_allclose(sel.scores[0][1:], [2.0, -0.5, 3.0])
    assert np.isnan(sel.scores[0][0]) and np.isnan(sel.scores[1][0])
    assert [m.tolist() for m in rho1_mask(cur, ref, tm, ratio=0.5).loss_masks] == [[0, 1, 0, 1], [0, 1, 0]]
    assert [m.tolist() for m in rho1_mask(cur, ref, tm, ratio=0.4).loss_masks] == [[0, 1, 0, 1], [0, 0, 0]]
    assert [m.tolist() for m in rho1_mask(cur, ref, tm, ratio=1.0).loss_masks] == [[0, 1, 1, 1], [0, 1, 1]]


def test_rho1_ties_prefer_lower_document_then_position():
    zeros = [np.zeros(4), np.zeros(3)]
    tm = [np.array([0, 1, 1, 1], np.uint8), np.array([0, 1, 1], np.uint8)]
    sel = rho1_mask(zeros, zeros, tm, ratio=0.6)  # 3 of 5, all tied
    assert [m.tolist() for m in sel.loss_masks] == [[0, 1, 1, 1], [0, 0, 0]]


def test_none_mask_and_prompt_lengths():
    sel = none_mask([TM_A, TM_EMPTY])
    assert [m.tolist() for m in sel.loss_masks] == [TM_A.tolist(), TM_EMPTY.tolist()]
    assert prompt_lengths([TM_A, TM_B, TM_EMPTY, np.array([0, 1, 0, 1])]).tolist() == [2, 2, 3, 1]


def test_num_kept_is_ceil_without_float_surprises():
    assert num_kept(0.7, 10) == 7            # 0.7 * 10 = 7.000000000000001 in binary
    assert num_kept(0.6, np.array([0, 1, 4, 5, 6])).tolist() == [0, 1, 3, 3, 4]
    assert num_kept(1.0, 9) == 9


def _random_docs(rng, n_docs=40):
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(1, 30))
        tm = np.zeros(n, np.uint8)
        tm[int(rng.integers(1, n + 1)):] = 1  # prompt of >= 1 token, response may be empty
        docs.append((tm, rng.normal(size=n), rng.uniform(size=n), rng.normal(size=n)))
    return docs


@pytest.mark.parametrize("ratio", [0.1, 0.6, 0.75, 1.0])
def test_invariants_random(ratio):
    rng = np.random.default_rng(0)
    docs = _random_docs(rng)
    tm, rel, attn, other = (list(x) for x in zip(*docs))
    sel = sstoken_mask(rel, attn, tm, ratio=ratio)
    for m, t in zip(sel.loss_masks, tm):
        assert np.all(m <= t)
        assert m.sum() == math.ceil(round(ratio * t.sum(), 6))
    rho = rho1_mask(rel, other, tm, ratio=ratio)
    assert all(np.all(m <= t) for m, t in zip(rho.loss_masks, tm))
    assert sum(m.sum() for m in rho.loss_masks) == math.ceil(round(ratio * sum(t.sum() for t in tm), 6))
    # deterministic, and per-sample ssToken does not depend on the other samples of the batch
    again = sstoken_mask(rel, attn, tm, ratio=ratio)
    assert all(np.array_equal(a, b) for a, b in zip(sel.loss_masks, again.loss_masks))
    perm = rng.permutation(len(tm))
    shuffled = sstoken_mask([rel[i] for i in perm], [attn[i] for i in perm], [tm[i] for i in perm], ratio=ratio)
    assert all(np.array_equal(shuffled.loss_masks[j], sel.loss_masks[i]) for j, i in enumerate(perm))


def test_padded_2d_rows_equal_per_document_lists():
    tm2 = np.array([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], np.uint8)  # row 1: B padded by one
    rel2 = np.array([REL_A, np.r_[REL_B, 0.0]])
    attn2 = np.array([ATTN_A, np.r_[ATTN_B, 0.0]])
    sel = sstoken_mask(rel2, attn2, tm2)
    assert sel.loss_masks[0].tolist() == [0, 0, 1, 1, 1, 0]
    assert sel.loss_masks[1].tolist() == [0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_bad_ratio_raises(bad):
    with pytest.raises(ValueError, match="ratio"):
        sstoken_mask([REL_A], [ATTN_A], [TM_A], ratio=bad)
    with pytest.raises(ValueError, match="ratio"):
        rho1_mask([CUR_A], [HIST_A], [TM_A], ratio=bad)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="gamma"):
        sstoken_mask([REL_A], [ATTN_A], [TM_A], gamma=1.5)
    with pytest.raises(ValueError, match="attn"):
        sstoken_mask([REL_A], [ATTN_A[:-1]], [TM_A])
    with pytest.raises(ValueError, match="finite"):  # a NaN loss at a target (position 0 as target)
        sstoken_mask([REL_A], [ATTN_A], [np.array([1, 0, 1, 1, 1, 1], np.uint8)])
    with pytest.raises(ValueError, match="unknown selection method"):
        select_rows("rho-1", np.zeros((1, 3)), np.zeros((1, 3)), np.zeros((1, 3)),
                    segment_layout(np.zeros((1, 3)), np.zeros((1, 3), np.int64)))


def test_one_position_prompt_drops_the_attention_term():
    """A sample whose prompt is only its first position (a continuation window, plain text)
    has nothing but the attention sink to attend to: its score is REL alone, warm-up included."""
    tm = np.array([0, 1, 1, 1, 1], np.uint8)
    rel = np.array([NAN, 0.0, 3.0, 1.0, 2.0])
    attn = np.array([1.0, 0.9, 0.1, 0.8, 0.2])  # would pick positions 1 and 3 if it counted
    for warmup in (False, True):
        sel = sstoken_mask([rel], [attn], [tm], gamma=0.5, ratio=0.5, warmup=warmup)
        assert sel.loss_masks[0].tolist() == [0, 0, 1, 0, 1]
        np.testing.assert_allclose(sel.scores[0][1:], [0.0, 1.0, 1 / 3, 2 / 3], rtol=1e-6)


def test_multi_turn_candidates_are_the_targets_and_the_prompt_is_before_the_first():
    # user (0-2) | assistant (3-5) | user (6-7) | assistant (8-10)
    tm = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1], np.uint8)
    rel = np.linspace(0, 1, tm.size)
    attn = np.zeros(tm.size)
    sel = sstoken_mask([rel], [attn], [tm], gamma=1.0, ratio=0.5)
    kept = np.flatnonzero(sel.loss_masks[0])
    assert set(kept) <= set(np.flatnonzero(tm)) and kept.size == 3  # ceil(0.5 * 6) of the 6 targets
    assert kept.tolist() == [8, 9, 10]  # highest REL; the second user turn is never a candidate
    assert np.isnan(sel.scores[0][[6, 7]]).all()
    assert prompt_lengths([tm]).tolist() == [3]


def _packed(docs):
    """Pack (target_mask, rel, attn, live) per document into rows of 12 with position_ids."""
    T = 12
    rows, row, used = [], [], 0
    for d in docs:
        if used + d[0].size > T:
            rows.append(row)
            row, used = [], 0
        row.append(d)
        used += d[0].size
    rows.append(row)
    B = len(rows)
    out = {k: np.zeros((B, T)) for k in ("tm", "rel", "attn", "live", "pos")}
    out["pos"] = np.zeros((B, T), np.int64)
    for b, row in enumerate(rows):
        at = 0
        for tm, rel, attn, live in row:
            n = tm.size
            for k, v in (("tm", tm), ("rel", rel), ("attn", attn), ("live", live)):
                out[k][b, at:at + n] = np.nan_to_num(v)
            out["pos"][b, at:at + n] = np.arange(n)
            at += n
    seg = np.cumsum(np.diff(out["pos"], prepend=out["pos"][:, :1] - 1, axis=1) != 1, axis=1)
    return out, seg, [d for row in rows for d in row]


@pytest.mark.parametrize("warmup", [False, True])
def test_packed_rows_select_as_per_document(warmup):
    """select_rows on packed segments gives sstoken_mask / rho1_mask per document."""
    rng = np.random.default_rng(3)
    docs = []
    for n in (5, 4, 3, 6, 2, 7, 5):
        tm = np.zeros(n, np.uint8)
        tm[int(rng.integers(1, n)):] = 1
        docs.append((tm, rng.normal(size=n), rng.uniform(size=n), rng.uniform(1, 5, size=n)))
    p, seg, order = _packed(docs)
    layout = segment_layout(p["tm"], seg)
    ref = p["live"] + p["rel"]  # REL = ref - live
    keep, score = select_rows("sstoken", p["live"], ref, p["tm"], layout, attn_BT=p["attn"], ratio=0.5,
                              warmup=warmup)
    per_doc = sstoken_mask([d[1] for d in order], [d[2] for d in order], [d[0] for d in order],
                           ratio=0.5, warmup=warmup)
    flat_keep = keep[p["tm"].astype(bool)]
    expected = np.concatenate([m[d[0].astype(bool)] for m, d in zip(per_doc.loss_masks, order)])
    assert flat_keep.astype(int).tolist() == expected.tolist()
    # prompts: each segment's positions before its first target
    assert layout.prompt_mask[p["tm"].astype(bool)].sum() == 0
    rho_keep, _ = select_rows("rho1", p["live"], ref, p["tm"], layout, ratio=0.5)
    rho = rho1_mask([d[3] for d in order], [d[3] + d[1] for d in order], [d[0] for d in order], ratio=0.5)
    rho_expected = np.concatenate([m[d[0].astype(bool)] for m, d in zip(rho.loss_masks, order)])
    assert rho_keep[p["tm"].astype(bool)].astype(int).tolist() == rho_expected.tolist()


def test_select_rows_rejects_nan_reference_at_a_target():
    tm = np.array([[0, 1, 1]])
    layout = segment_layout(tm, np.zeros((1, 3), np.int64))
    with pytest.raises(ValueError, match="ref_loss"):
        select_rows("rho1", np.ones((1, 3)), np.array([[NAN, 1.0, NAN]]), tm, layout)
    with pytest.raises(ValueError, match="attention"):
        select_rows("sstoken", np.ones((1, 3)), np.ones((1, 3)), tm, layout)
