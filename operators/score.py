"""TokenScorer: per-token losses of two causal LMs (+ attention to the prompt) -> loss_mask.

For every document it computes, with both models, the cross-entropy (nats) of
predicting token t from tokens < t (position 0: NaN), and for ssToken the current
model's last-layer attention from query t to the prompt keys P (positions before
the first target; BOS included), summed over P and averaged over heads. Then
`operators/select.py` turns them into `loss_mask` and `token_scores`.

Design:
* Batching: documents are sorted by length (longest first, so an out-of-memory
  shows on the first batch), grouped so that rows * longest <= batch_tokens,
  right-padded with an attention mask, and the results put back in input order.
* Attention without an eager forward pass: the current model is loaded with a
  registered attention implementation that runs SDPA for every layer (the same
  kernel as a plain forward) and, in the last layer only, recomputes the softmax
  from the layer's own (post-projection, post-RoPE) query and key with an explicit
  causal + key-padding mask, reducing it to [B, T] in query chunks of at most
  _PROBS_BUDGET elements. Works for any HF model that dispatches through
  `AttentionInterface` (Llama, Qwen2/3, Mistral, GPT-2, ...); attention features
  this recomputation would get wrong (softcapping, position bias, a sliding window
  shorter than the sequence) raise instead of scoring silently wrong.
* Memory per actor: both models' weights, plus per batch the logits of one model
  (batch_tokens * vocab * 2 bytes in bf16; 16384 * 152k ~ 5 GB), an fp32 copy of
  at most _CE_ROWS logits rows, and <= 256 MiB of attention probabilities.
* The loss and attention reductions below are the single implementation shared
  with the training-loop helper `operators.select.masks_from_logits`.
"""
from __future__ import annotations

import contextvars
import dataclasses
import os
from typing import Any, ClassVar, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from operators import schema
from operators.base import Operator, check_columns
from operators.select import (check_gamma, check_ratio, prompt_lengths, rho1_mask,
                              sstoken_mask)

CAPTURE_ATTN = "tokenmill_prompt_attention"  # name of our registered attention implementation
_PROBS_BUDGET = 1 << 26  # fp32 attention probabilities materialised at once (256 MiB)
_CE_ROWS = 4096          # logits rows upcast to fp32 at once for the cross-entropy
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- shared math
def token_losses_from_logits(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor,
                             *, chunk_rows: int = _CE_ROWS) -> torch.Tensor:
    """Per-token CE in nats, [B, T] float32 on the logits' device: out[b, t] is the loss
    of predicting input_ids[b, t] from logits[b, t - 1]; out[:, 0] = NaN (no context).
    Padding positions get a (meaningless) finite value; callers mask them."""
    B, T, V = logits_BTV.shape
    out = torch.full((B, T), float("nan"), dtype=torch.float32, device=logits_BTV.device)
    targets = input_ids_BT.to(logits_BTV.device, torch.long)
    for b in range(B):  # row by row: logits[b, :-1] is a contiguous view, no B*T*V copy
        for s in range(0, T - 1, chunk_rows):
            e = min(s + chunk_rows, T - 1)
            out[b, s + 1:e + 1] = F.cross_entropy(logits_BTV[b, s:e].float(), targets[b, s + 1:e + 1],
                                                  reduction="none")
    return out


def prompt_attention_from_probs(probs_BHQK: torch.Tensor, prompt_mask_BK: torch.Tensor) -> torch.Tensor:
    """Attn_t = mean over heads of the sum over prompt keys of the attention probability.
    probs [B, H, Q, K] (rows already causal/padding-masked), prompt_mask [B, K] bool;
    returns [B, Q] float32 in [0, 1]."""
    keys = prompt_mask_BK.to(probs_BHQK.device, torch.float32)[:, None, :, None]
    return torch.matmul(probs_BHQK.float(), keys).squeeze(-1).mean(dim=1)


def prompt_attention_from_qk(query_BHTD: torch.Tensor, key_BKTD: torch.Tensor, *, scaling: float,
                             lengths_B: torch.Tensor, prompt_lens_B: torch.Tensor) -> torch.Tensor:
    """Last-layer attention to the prompt, recomputed from query/key with an explicit
    causal + key-padding mask. key may have fewer heads (GQA: head h uses kv head
    h // (H / K), as HF's repeat_kv). Returns [B, T] float32; padded queries are junk."""
    B, H, T, _ = query_BHTD.shape
    key = key_BKTD.repeat_interleave(H // key_BKTD.shape[1], dim=1).float()
    pos = torch.arange(T, device=query_BHTD.device)
    key_ok_BK = pos[None, :] < lengths_B.to(pos.device)[:, None]
    prompt_BK = pos[None, :] < prompt_lens_B.to(pos.device)[:, None]
    out = torch.empty(B, T, dtype=torch.float32, device=query_BHTD.device)
    step = max(1, _PROBS_BUDGET // max(1, B * H * T))
    for q0 in range(0, T, step):
        q1 = min(q0 + step, T)
        scores = torch.matmul(query_BHTD[:, :, q0:q1].float(), key.transpose(-1, -2)) * scaling
        allowed = (pos[q0:q1, None] >= pos[None, :])[None, None] & key_ok_BK[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[:, q0:q1] = prompt_attention_from_probs(probs, prompt_BK)
    return out


# ---------------------------------------------------- attention capture hook
@dataclasses.dataclass
class _Capture:
    layer_idx: int
    lengths: torch.Tensor
    prompt_lens: torch.Tensor
    result: torch.Tensor | None = None


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("tokenmill_capture", default=None)


def _capturing_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: Any, **kwargs: Any):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    req = _CAPTURE.get()
    if req is not None and getattr(module, "layer_idx", None) == req.layer_idx:
        T = query.shape[2]
        window = kwargs.get("sliding_window")
        if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None or (
                window is not None and window < T):
            raise ValueError("ssToken attention: this model's last layer uses softcapping, a position "
                             "bias or a sliding window, which the explicit recomputation does not model")
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        req.result = prompt_attention_from_qk(query, key, scaling=scaling, lengths_B=req.lengths,
                                              prompt_lens_B=req.prompt_lens)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(CAPTURE_ATTN, _capturing_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)  # the model builds SDPA-style masks


# ------------------------------------------------------------ batching, scoring
def length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices of documents grouped longest first so that rows * longest <= batch_tokens
    (a document longer than batch_tokens goes alone). Zero-length documents are left out."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    order = order[np.asarray(lengths)[order] > 0]
    batches, i = [], 0
    while i < order.size:
        rows = max(1, batch_tokens // int(lengths[order[i]]))
        batches.append(order[i:i + rows])
        i += rows
    return batches


def _last_layer_idx(model: torch.nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers - 1


@torch.inference_mode()
def score_sequences(model: torch.nn.Module, sequences: Sequence[np.ndarray], *,
                    prompt_lens: np.ndarray | None = None, batch_tokens: int = 16384,
                    pad_id: int = 0) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per-document token losses [T_i] float32 (nats, NaN at 0) and, when `prompt_lens`
    is given (the model must be loaded with capture_attention=True), the last-layer
    attention to the first prompt_lens[i] positions, [T_i] float32."""
    device = next(model.parameters()).device
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    losses = [np.zeros(0, np.float32) for _ in sequences]
    attn = [np.zeros(0, np.float32) for _ in sequences] if prompt_lens is not None else None
    for idx in length_batches(lengths, batch_tokens):
        L = lengths[idx]
        ids = np.full((idx.size, int(L.max())), pad_id, dtype=np.int64)
        for r, i in enumerate(idx):
            ids[r, :L[r]] = sequences[i]
        ids_BT = torch.from_numpy(ids).to(device)
        L_B = torch.from_numpy(L).to(device)
        mask_BT = (torch.arange(ids.shape[1], device=device)[None, :] < L_B[:, None]).long()
        capture = None
        if prompt_lens is not None:
            capture = _Capture(_last_layer_idx(model), L_B, torch.from_numpy(prompt_lens[idx]).to(device))
        token = _CAPTURE.set(capture)
        try:
            logits = model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).logits
        finally:
            _CAPTURE.reset(token)
        loss_BT = token_losses_from_logits(logits, ids_BT).cpu().numpy()
        del logits
        if capture is not None and capture.result is None:
            raise RuntimeError(f"{type(model).__name__}: the last layer did not run through the "
                               f"'{CAPTURE_ATTN}' attention; load it with capture_attention=True "
                               "(models that bypass transformers' AttentionInterface are unsupported)")
        attn_BT = capture.result.cpu().numpy() if capture is not None else None
        for r, i in enumerate(idx):
            losses[i] = loss_BT[r, :L[r]].copy()
            if attn is not None:
                attn[i] = attn_BT[r, :L[r]].copy()
    return losses, attn


def load_causal_lm(path: str, *, device: str, dtype: torch.dtype, trust_remote_code: bool = False,
                   capture_attention: bool = False) -> torch.nn.Module:
    """Load a causal LM from a local directory (never the hub) in eval mode, no grad."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist (models load from local "
                                "directories only)")
    from transformers import AutoModelForCausalLM
    if capture_attention:
        _register_capture()
    has_st = any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype,
            use_safetensors=True if has_st else None,
            attn_implementation=CAPTURE_ATTN if capture_attention else None)  # None: HF default (SDPA)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError... name the path
        raise ValueError(f"cannot load a causal LM from {path!r}: {type(e).__name__}: {e}") from e
    model.to(device).eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------- the operator
@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """TokenScorer parameters (validated on construction).

    current_model / other_model: local HF model directories. other_model is the
    history model for ssToken (the base model before fine-tuning) and the reference
    model for Rho-1. batch_tokens: padded tokens per forward pass (rows * longest).
    """
    current_model: str
    other_model: str
    method: str
    device: str | None = None
    dtype: str | None = None
    batch_tokens: int = 16384
    trust_remote_code: bool = False
    gamma: float = 0.5
    ratio: float = 0.6
    warmup: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("sstoken", "rho1"):
            raise ValueError(f"TokenScorer method must be 'sstoken' or 'rho1', got {self.method!r} "
                             "(method 'none' needs no scoring: operators.select.none_mask)")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {self.dtype!r}")
        if not (isinstance(self.batch_tokens, int) and self.batch_tokens > 0):
            raise ValueError(f"batch_tokens must be a positive int, got {self.batch_tokens!r}")
        check_ratio(self.ratio)
        check_gamma(self.gamma)


class TokenScorer(Operator):
    """Actor-pool operator: adds `loss_mask` and `token_scores` to tokenized documents.

    Reads input_ids list<int32>, target_mask list<uint8>, id; every other column passes
    through. token_scores: ssToken score or Rho-1 excess loss (nats) at target
    positions, NaN elsewhere. Rho-1 ranks over all targets of the table passed in.
    """
    reads: ClassVar[tuple[str, ...]] = (schema.ID, schema.INPUT_IDS, schema.TARGET_MASK)
    adds: ClassVar[tuple[str, ...]] = (schema.LOSS_MASK, schema.TOKEN_SCORES)

    def __init__(self, *, current_model: str, other_model: str, method: str, device: str | None = None,
                 dtype: str | None = None, batch_tokens: int = 16384, trust_remote_code: bool = False,
                 gamma: float = 0.5, ratio: float = 0.6, warmup: bool = False) -> None:
        self.config = ScoreConfig(current_model=current_model, other_model=other_model, method=method,
                                  device=device, dtype=dtype, batch_tokens=batch_tokens,
                                  trust_remote_code=trust_remote_code, gamma=gamma, ratio=ratio,
                                  warmup=warmup)
        self._current: torch.nn.Module | None = None  # loaded by setup(), so __init__ stays picklable
        self._other: torch.nn.Module | None = None
        self.vocab_size: int | None = None  # both set by setup() from the models' configs
        self.max_len: int | None = None

    def setup(self) -> None:
        c = self.config
        device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _DTYPES[c.dtype] if c.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        kw = dict(device=device, dtype=dtype, trust_remote_code=c.trust_remote_code)
        current = load_causal_lm(c.current_model, capture_attention=c.method == "sstoken", **kw)
        other = load_causal_lm(c.other_model, **kw)
        v_cur, v_oth = (m.config.get_text_config().vocab_size for m in (current, other))
        if v_cur != v_oth:
            raise ValueError(f"vocab sizes differ: {c.current_model!r} has {v_cur}, "
                             f"{c.other_model!r} has {v_oth}; both models must share a tokenizer")
        self._current, self._other, self.vocab_size = current, other, v_cur
        positions = [getattr(m.config.get_text_config(), "max_position_embeddings", None) for m in (current, other)]
        self.max_len = min((p for p in positions if p), default=None)

    def _documents(self, table: pa.Table) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        ids_col = table.column(schema.INPUT_IDS).combine_chunks()
        tm_col = table.column(schema.TARGET_MASK).combine_chunks()
        if ids_col.null_count or tm_col.null_count:
            raise ValueError(f"TokenScorer: null {schema.INPUT_IDS} or {schema.TARGET_MASK} rows")
        offsets = ids_col.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]  # sliced arrays do not start at 0
        tm_offsets = tm_col.offsets.to_numpy().astype(np.int64)
        doc_ids = table.column(schema.ID).to_pylist()
        if not np.array_equal(offsets, tm_offsets - tm_offsets[0]):
            bad = int(np.flatnonzero(np.diff(offsets) != np.diff(tm_offsets))[0])
            raise ValueError(f"document {doc_ids[bad]!r}: {schema.TARGET_MASK} and {schema.INPUT_IDS} lengths differ")
        cuts = offsets[1:-1]
        ids = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        tms = tm_col.flatten().to_numpy(zero_copy_only=False).astype(np.uint8)
        nonempty = np.flatnonzero(np.diff(offsets) > 0)
        first_is_target = tms[offsets[nonempty]] != 0
        if first_is_target.any():
            raise ValueError(f"document {doc_ids[nonempty[np.argmax(first_is_target)]]!r} has "
                             f"{schema.TARGET_MASK}[0] = 1; position 0 has no context, it cannot be a target")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            doc = int(np.searchsorted(offsets, np.flatnonzero((ids < 0) | (ids >= self.vocab_size))[0], "right") - 1)
            raise ValueError(f"document {doc_ids[doc]!r}: token id outside the models' vocabulary "
                             f"[0, {self.vocab_size})")
        if self.max_len is not None and np.diff(offsets).max(initial=0) > self.max_len:
            doc = int(np.argmax(np.diff(offsets)))
            raise ValueError(f"document {doc_ids[doc]!r} has {np.diff(offsets)[doc]} tokens, more than "
                             f"the models' {self.max_len} positions; split long documents before scoring")
        return offsets, np.split(ids, cuts), np.split(tms, cuts)

    def __call__(self, table: pa.Table) -> pa.Table:
        check_columns(table, self.reads, type(self).__name__)
        if self._current is None:
            self.setup()
        c = self.config
        if table.num_rows == 0:
            offsets, sequences, target_masks = np.zeros(1, np.int64), [], []
        else:
            offsets, sequences, target_masks = self._documents(table)
        if c.method == "sstoken":
            cur, attn = score_sequences(self._current, sequences, prompt_lens=prompt_lengths(target_masks),
                                        batch_tokens=c.batch_tokens)
            hist, _ = score_sequences(self._other, sequences, batch_tokens=c.batch_tokens)
            selection = sstoken_mask([h - x for h, x in zip(hist, cur)], attn, target_masks,
                                     gamma=c.gamma, ratio=c.ratio, warmup=c.warmup)
        else:
            cur, _ = score_sequences(self._current, sequences, batch_tokens=c.batch_tokens)
            ref, _ = score_sequences(self._other, sequences, batch_tokens=c.batch_tokens)
            selection = rho1_mask(cur, ref, target_masks, ratio=c.ratio)
        pa_offsets = pa.array(offsets, pa.int32())

        def column(parts: list[np.ndarray], dtype: np.dtype, pa_type: pa.DataType) -> pa.Array:
            values = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
            return pa.ListArray.from_arrays(pa_offsets, pa.array(values, pa_type))

        out = table.drop_columns([n for n in self.adds if n in table.column_names])  # re-scoring replaces
        out = out.append_column(schema.LOSS_MASK, column(selection.loss_masks, np.uint8, pa.uint8()))
        return out.append_column(schema.TOKEN_SCORES, column(selection.scores, np.float32, pa.float32()))
