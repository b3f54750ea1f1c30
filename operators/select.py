"""Token selection: which target tokens keep their loss (ssToken, Rho-1, none).

Pure numpy for the offline pipeline; `masks_from_logits` is the same math for a
training loop (torch in, torch out). There is one implementation of each formula:

* the per-token loss and the attention-to-prompt reduction live in
  `operators/score.py` (`token_losses_from_logits`, `prompt_attention_from_probs`)
  and both the offline scorer and `masks_from_logits` call them;
* the normalisation, scoring and top-k live here and both paths call them.

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

from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is only needed by `masks_from_logits`
    import torch

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


def sstoken_mask(rel_losses_per_doc: Sequence[np.ndarray], attn_per_doc: Sequence[np.ndarray],
                 target_mask_per_doc: Sequence[np.ndarray], *, gamma: float = 0.5,
                 ratio: float = 0.6, warmup: bool = False) -> Selection:
    """ssToken selection, per sample (algorithms.md).

    rel_losses_per_doc[i]: [T_i] REL_t = L_history(t) - L_current(t), nats; only read at
        target positions. attn_per_doc[i]: [T_i] last-layer attention from query t to the
        prompt keys, summed over keys and averaged over heads, in [0, 1].
    Score_t = gamma * minmax(REL)_t + (1 - gamma) * Attn_t over the sample's targets;
    the top ceil(ratio * |R|) targets are kept. `warmup=True` forces gamma = 0 (the
    reference code's first samples, while current == history).
    """
    gamma = 0.0 if warmup else check_gamma(gamma)
    ratio = check_ratio(ratio)
    flat, target = _layout(target_mask_per_doc)
    lengths = np.diff(flat.offsets)
    rel = _flatten("rel_losses", rel_losses_per_doc, lengths, np.float64)
    attn = _flatten("attn", attn_per_doc, lengths, np.float64)

    idx = np.flatnonzero(target)  # target tokens, grouped by document in order
    doc = flat.doc[idx]
    score = np.zeros(idx.size, dtype=np.float64)
    if idx.size:
        rel_t = rel[idx]
        if not np.all(np.isfinite(rel_t)):
            raise ValueError("rel_losses must be finite at every target token")
        docs_with_targets, starts = np.unique(doc, return_index=True)
        lo = np.minimum.reduceat(rel_t, starts)
        hi = np.maximum.reduceat(rel_t, starts)
        g = np.searchsorted(docs_with_targets, doc)
        rel_norm = (rel_t - lo[g]) / (hi[g] - lo[g] + MINMAX_EPS)
        score = gamma * rel_norm + (1.0 - gamma) * attn[idx]
    k = num_kept(ratio, np.bincount(doc, minlength=lengths.size))
    kept = _top_k_per_group(score, doc, flat.pos[idx], k)
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


def masks_from_logits(logits_current: "torch.Tensor", logits_history_or_ref: "torch.Tensor",
                      input_ids: "torch.Tensor", target_mask: "torch.Tensor", method: str, *,
                      attn_last_layer: "torch.Tensor | None" = None,
                      prompt_mask: "torch.Tensor | None" = None, gamma: float = 0.5,
                      ratio: float = 0.6, warmup: bool = False) -> "torch.Tensor":
    """Loss mask for a training step, from logits the trainer already has (no grad).

    logits_*: [B, T, V] from a forward pass on input_ids [B, T] (logits[:, t] predicts
    token t + 1), right-padded rows, one sample per row. target_mask: [B, T], 0 on
    padding. attn_last_layer (ssToken only): the current model's last-layer attention
    probabilities [B, H, T, T] (causal, padding keys masked, e.g. eager attention with
    output_attentions=True), or the already reduced attention to the prompt [B, T].
    prompt_mask: [B, T] bool, default = positions before each row's first target.
    Returns loss_mask [B, T] bool on the logits' device, equal to what the offline
    TokenScorer writes for the same rows and models.
    """
    import torch

    from operators.score import prompt_attention_from_probs, token_losses_from_logits

    check_method(method)
    with torch.no_grad():
        tm = target_mask.detach().to("cpu", torch.uint8).numpy()
        rows = list(tm)
        if method == "none":
            selection = none_mask(rows)
        else:
            cur = token_losses_from_logits(logits_current.detach(), input_ids).cpu().numpy()
            other = token_losses_from_logits(logits_history_or_ref.detach(), input_ids).cpu().numpy()
            if method == "rho1":
                selection = rho1_mask(list(cur), list(other), rows, ratio=ratio)
            else:
                if attn_last_layer is None:
                    raise ValueError("method='sstoken' needs attn_last_layer ([B, H, T, T] or [B, T])")
                attn = attn_last_layer.detach()
                if attn.dim() == 4:
                    if prompt_mask is None:
                        pl = torch.as_tensor(prompt_lengths(rows), device=attn.device)
                        prompt_mask = torch.arange(attn.shape[-1], device=attn.device)[None, :] < pl[:, None]
                    attn = prompt_attention_from_probs(attn, prompt_mask.to(attn.device))
                elif attn.dim() != 2:
                    raise ValueError(f"attn_last_layer must be [B, H, T, T] or [B, T], got {tuple(attn.shape)}")
                attn_np = attn.float().cpu().numpy()
                selection = sstoken_mask(list(other - cur), list(attn_np), rows,
                                         gamma=gamma, ratio=ratio, warmup=warmup)
    mask = np.stack(selection.loss_masks) if rows else np.zeros(tm.shape, dtype=np.uint8)
    return torch.from_numpy(mask.astype(bool)).to(logits_current.device)
