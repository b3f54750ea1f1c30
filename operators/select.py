"""Token selection: which target tokens keep their loss (ssToken, Rho-1, none).

Pure numpy. There is one implementation of each formula, shared by both paths:

* the per-token loss and the attention-to-prompt reduction are torch and live in
  `operators/token_loss.py`;
* the normalisation, scoring and top-k live here: the offline scorer calls them per
  document (`sstoken_mask`, `rho1_mask`), the online training loss
  (`operators/selective_loss.py`) per attention segment of packed rows (`select_rows`).

The sample of ssToken is one attention segment: a document, or a piece of a split one.
Its prompt is its positions before its first target (BOS included). The reference code
(`jianke0604/ssToken`, `filter_tokens_with_attention_loss`) takes prompt_len = the number
of masked labels; for a single-turn row that is the same set. For a multi-turn row it is
not: there prompt_len counts the tokens of every user turn, positions [0, prompt_len) are
the attention keys and [prompt_len, end) the candidates, so the start of the first
assistant reply is treated as prompt (attended to, and trained without being ranked) and
later user-turn tokens take candidate slots. Here the candidates are exactly the target
tokens of every assistant turn and the prompt keys are the positions before the first one.
A segment whose prompt is a single position (a continuation piece of a split document, or
plain text) has only the attention sink there, so its attention term is dropped: its score
is REL alone (gamma = 1), warm-up included. The reference code never sees such segments: it truncates samples at
max_seq_length.

Conventions (docs/shard-format.md): "token t is a target" means the loss of
predicting `input_ids[t]` from the tokens before it, so position 0 never has a
loss. Losses and attention are indexed by that target position t. Documents are
given as sequences of 1-D arrays (one per document, variable length) or as a
2-D array whose rows are documents (padding must have target_mask 0).

Rounding of the kept count: k = ceil(ratio * n), computed after rounding
ratio * n to 6 decimals so that binary floating point cannot turn 0.7 * 10 =
7.000000000000001 into 8. Ties in the score are broken towards the lower
position (and, for Rho-1's batch-wide ranking, the lower document index first),
so the masks are deterministic for a given input.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

METHODS = ("sstoken", "rho1", "none")
MINMAX_EPS = 1e-8  # algorithms.md: added to the min-max denominator


class Selection(NamedTuple):
    """Per-document outputs: `loss_masks[i]` uint8 and `scores[i]` float32, both the
    length of document i; scores are NaN where the token is not a target."""
    loss_masks: list[np.ndarray]
    scores: list[np.ndarray]


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1] (fraction of target tokens kept), got {ratio!r}")
    return float(ratio)


def check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1] (weight of the loss term), got {gamma!r}")
    return float(gamma)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; expected one of {METHODS}")
    return method


def num_kept(ratio: float, num_targets: np.ndarray | int) -> np.ndarray:
    """ceil(ratio * n) per entry of `num_targets`, robust to float error (module doc)."""
    return np.ceil(np.round(ratio * np.asarray(num_targets, dtype=np.float64), 6)).astype(np.int64)


def prompt_lengths(target_mask_per_doc: Sequence[np.ndarray]) -> np.ndarray:
    """Number of prompt positions per document: the positions before its first target
    (the whole document when it has no target). BOS, when present, is one of them."""
    out = np.empty(len(target_mask_per_doc), dtype=np.int64)
    for i, tm in enumerate(target_mask_per_doc):
        hits = np.flatnonzero(np.asarray(tm))
        out[i] = hits[0] if hits.size else len(tm)
    return out


class _Flat(NamedTuple):
    """Documents concatenated: `doc` and `pos` per token, `offsets` [num_docs + 1]."""
    offsets: np.ndarray
    doc: np.ndarray
    pos: np.ndarray


def _flatten(name: str, per_doc: Sequence[np.ndarray], lengths: np.ndarray | None, dtype) -> np.ndarray:
    arrays = [np.asarray(a, dtype=dtype).reshape(-1) for a in per_doc]
    if lengths is not None:
        if len(arrays) != len(lengths):
            raise ValueError(f"{name}: {len(arrays)} documents, expected {len(lengths)}")
        bad = [i for i, a in enumerate(arrays) if a.size != lengths[i]]
        if bad:
            raise ValueError(f"{name}: document {bad[0]} has {arrays[bad[0]].size} values, "
                             f"its target_mask has {lengths[bad[0]]}")
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _layout(target_mask_per_doc: Sequence[np.ndarray]) -> tuple[_Flat, np.ndarray]:
    lengths = np.array([np.asarray(t).size for t in target_mask_per_doc], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    doc = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(offsets[-1]) - offsets[doc]
    target = _flatten("target_mask", target_mask_per_doc, None, np.uint8).astype(bool)
    return _Flat(offsets, doc, pos), target


def _top_k_per_group(score: np.ndarray, group: np.ndarray, order_key: np.ndarray,
                     k_per_group: np.ndarray) -> np.ndarray:
    """Boolean keep-mask: the k_per_group[g] highest scores of each group g, ties to the
    lower `order_key`. `group` must be sorted (it is: documents are contiguous)."""
    if not np.all(np.isfinite(score)):
        raise ValueError("selection scores must be finite at every target token "
                         "(a NaN loss at a target position? position 0 can never be a target)")
    order = np.lexsort((order_key, -score, group))  # last key is the primary one
    sorted_group = group[order]
    rank = np.arange(order.size) - np.searchsorted(sorted_group, sorted_group, side="left")
    keep = np.empty(order.size, dtype=bool)
    keep[order] = rank < k_per_group[sorted_group]
    return keep


def _unflatten(flat: _Flat, target_idx: np.ndarray, kept: np.ndarray,
               scores: np.ndarray) -> Selection:
    mask = np.zeros(flat.offsets[-1], dtype=np.uint8)
    mask[target_idx[kept]] = 1
    out_scores = np.full(flat.offsets[-1], np.nan, dtype=np.float32)
    out_scores[target_idx] = scores
    cuts = flat.offsets[1:-1]
    return Selection(np.split(mask, cuts), np.split(out_scores, cuts))


def _no_prompt_gamma(prompt_lens: np.ndarray, gamma: float) -> np.ndarray:
    """Per-sample gamma: 1 where the prompt is a single position (module doc), else `gamma`."""
    return np.where(np.asarray(prompt_lens) <= 1, 1.0, gamma)


def _sstoken_keep(rel_t: np.ndarray, attn_t: np.ndarray, group_t: np.ndarray, order_t: np.ndarray,
                  gamma_g: np.ndarray, k_g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep, score) over target tokens grouped by sample (`group_t` sorted): score =
    gamma_g * minmax_g(REL) + (1 - gamma_g) * Attn, top k_g per group, ties to lower order."""
    score = np.zeros(rel_t.size, dtype=np.float64)
    if rel_t.size:
        if not np.all(np.isfinite(rel_t)):
            raise ValueError("rel_losses must be finite at every target token")
        groups, starts = np.unique(group_t, return_index=True)
        lo = np.minimum.reduceat(rel_t, starts)
        hi = np.maximum.reduceat(rel_t, starts)
        g = np.searchsorted(groups, group_t)
        rel_norm = (rel_t - lo[g]) / (hi[g] - lo[g] + MINMAX_EPS)
        gam = gamma_g[group_t]
        score = gam * rel_norm + (1.0 - gam) * attn_t
    return _top_k_per_group(score, group_t, order_t, k_g), score


def sstoken_mask(rel_losses_per_doc: Sequence[np.ndarray], attn_per_doc: Sequence[np.ndarray],
                 target_mask_per_doc: Sequence[np.ndarray], *, gamma: float = 0.5,
                 ratio: float = 0.6, warmup: bool = False) -> Selection:
    """ssToken selection, per sample (algorithms.md).

    rel_losses_per_doc[i]: [T_i] REL_t = L_history(t) - L_current(t), nats; only read at
        target positions. attn_per_doc[i]: [T_i] last-layer attention from query t to the
        prompt keys, summed over keys and averaged over heads, in [0, 1].
    Score_t = gamma * minmax(REL)_t + (1 - gamma) * Attn_t over the sample's targets;
    the top ceil(ratio * |R|) targets are kept. `warmup=True` forces gamma = 0 (while
    current == history). A sample whose prompt is one position uses gamma = 1 (module doc).
    """
    gamma = 0.0 if warmup else check_gamma(gamma)
    ratio = check_ratio(ratio)
    flat, target = _layout(target_mask_per_doc)
    lengths = np.diff(flat.offsets)
    rel = _flatten("rel_losses", rel_losses_per_doc, lengths, np.float64)
    attn = _flatten("attn", attn_per_doc, lengths, np.float64)
    idx = np.flatnonzero(target)  # target tokens, grouped by document in order
    doc = flat.doc[idx]
    gamma_g = _no_prompt_gamma(prompt_lengths(target_mask_per_doc), gamma)
    k = num_kept(ratio, np.bincount(doc, minlength=lengths.size))
    kept, score = _sstoken_keep(rel[idx], attn[idx], doc, flat.pos[idx], gamma_g, k)
    return _unflatten(flat, idx, kept, score.astype(np.float32))


def rho1_mask(current_losses: Sequence[np.ndarray], reference_losses: Sequence[np.ndarray],
              target_masks: Sequence[np.ndarray], *, ratio: float = 0.6) -> Selection:
    """Rho-1 selection over the whole batch (algorithms.md).

    current_losses[i], reference_losses[i]: [T_i] per-token CE in nats. The excess loss
    current - reference is the score; the top ceil(ratio * N) of all N target tokens of
    the batch are kept (ties: lower document index, then lower position). "Batch" is
    whatever the caller passes: the result depends on how documents are grouped.
    """
    ratio = check_ratio(ratio)
    flat, target = _layout(target_masks)
    lengths = np.diff(flat.offsets)
    cur = _flatten("current_losses", current_losses, lengths, np.float64)
    ref = _flatten("reference_losses", reference_losses, lengths, np.float64)
    idx = np.flatnonzero(target)
    excess = cur[idx] - ref[idx]
    one_group = np.zeros(idx.size, dtype=np.int64)
    # idx is document-major, so ranking ties by idx = lower document, then lower position
    kept = _top_k_per_group(excess, one_group, idx, num_kept(ratio, np.array([idx.size])))
    return _unflatten(flat, idx, kept, excess.astype(np.float32))


def none_mask(target_masks: Sequence[np.ndarray]) -> Selection:
    """No selection: loss_mask = target_mask, scores all NaN."""
    masks = [np.asarray(t, dtype=np.uint8).reshape(-1).copy() for t in target_masks]
    return Selection(masks, [np.full(m.size, np.nan, dtype=np.float32) for m in masks])


# ------------------------------------------------------- packed rows (online)
class SegmentLayout(NamedTuple):
    """Attention segments of a [B, T] batch, numbered globally: `group[b, t]` = b * T + the
    segment's index in its row (so groups are sorted in row-major order)."""
    group: np.ndarray        # [B, T] int64
    prompt_mask: np.ndarray  # [B, T] bool: before the first target of its segment
    prompt_len: np.ndarray   # [B * T] prompt positions per group (0 for unused group ids)


def segment_layout(target_BT: np.ndarray, segment_BT: np.ndarray) -> SegmentLayout:
    """Groups and prompts of packed rows; segment_BT from token_loss.segment_ids_from_positions."""
    target = np.asarray(target_BT).astype(bool)
    B, T = target.shape
    group = (np.arange(B, dtype=np.int64)[:, None] * T + np.asarray(segment_BT, dtype=np.int64)).reshape(-1)
    flat_idx = np.arange(B * T, dtype=np.int64)
    first_target = np.full(B * T, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_target, group[target.reshape(-1)], flat_idx[target.reshape(-1)])
    start = np.full(B * T, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(start, group, flat_idx)
    prompt_mask = flat_idx < first_target[group]
    has = first_target < np.iinfo(np.int64).max
    prompt_len = np.where(has, first_target - np.where(has, start, 0), 0)
    return SegmentLayout(group.reshape(B, T), prompt_mask.reshape(B, T), prompt_len)


def select_rows(method: str, live_BT: np.ndarray, ref_BT: np.ndarray, target_BT: np.ndarray,
                layout: SegmentLayout, *, attn_BT: np.ndarray | None = None, gamma: float = 0.5,
                ratio: float = 0.6, warmup: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Selection over a batch of packed rows: (keep [B, T] bool, score [B, T] float32, NaN off
    target). live/ref: per-token losses in nats (ref = the stored ref_loss). ssToken: per
    segment, REL = ref - live, as `sstoken_mask`; Rho-1: excess = live - ref, top ratio of
    every target of the batch, ties to the lower row-major position (as `rho1_mask`)."""
    check_method(method)
    ratio = check_ratio(ratio)
    target = np.asarray(target_BT).astype(bool).reshape(-1)
    idx = np.flatnonzero(target)
    live = np.asarray(live_BT, dtype=np.float64).reshape(-1)[idx]
    ref = np.asarray(ref_BT, dtype=np.float64).reshape(-1)[idx]
    if not (np.all(np.isfinite(live)) and np.all(np.isfinite(ref))):
        raise ValueError("losses must be finite at every target token (is ref_loss NaN at a target? "
                         "the shards' ref_loss must come from the select stage of the same shards)")
    if method == "sstoken":
        if attn_BT is None:
            raise ValueError("method 'sstoken' needs the live model's attention to the prompt (attn_BT)")
        gamma = 0.0 if warmup else check_gamma(gamma)
        group = layout.group.reshape(-1)[idx]
        k = num_kept(ratio, np.bincount(group, minlength=layout.prompt_len.size))
        attn = np.asarray(attn_BT, dtype=np.float64).reshape(-1)[idx]
        keep_t, score_t = _sstoken_keep(ref - live, attn, group, idx, _no_prompt_gamma(layout.prompt_len, gamma), k)
    elif method == "rho1":
        score_t = live - ref
        keep_t = _top_k_per_group(score_t, np.zeros(idx.size, np.int64), idx, num_kept(ratio, np.array([idx.size])))
    else:
        score_t, keep_t = np.full(idx.size, np.nan), np.ones(idx.size, dtype=bool)
    keep = np.zeros(target.size, dtype=bool)
    keep[idx[keep_t]] = True
    score = np.full(target.size, np.nan, dtype=np.float32)
    score[idx] = score_t
    shape = np.asarray(target_BT).shape
    return keep.reshape(shape), score.reshape(shape)
