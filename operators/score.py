"""TokenScorer: the select stage's model work -> ref_loss (+ the offline static mask).

For every document it computes, with the history (ssToken) or reference (Rho-1) model,
the cross-entropy in nats of predicting token t from tokens < t: the `ref_loss` column
(float32, NaN where t is not a target), which the trainer's online selection
(`operators/selective_loss.py`) subtracts from the live model's loss. When the config
names a `current_model` it also writes the offline approximation: that frozen
checkpoint's losses (and, for ssToken, its last-layer attention to the prompt) turned
into `token_scores` and a static `loss_mask` by `operators/select.py`. Without one,
`loss_mask = target_mask` and `token_scores` is NaN.

Design:
* Precision: the models run in `select.dtype` (bf16 on GPU by default) but the output
  layer runs in fp32 (an fp32 copy of lm_head; post-head code such as softcapping runs
  on fp32 logits) and the log-softmax and loss are fp32, so the stored losses carry no
  bf16 rounding of the logits. The differences the selection ranks are small (REL had a
  mean of +0.096 nats in one audit), and bf16 logit rounding is a real share of that.
* Windows: documents are scored in windows of `window_len` tokens (the stage passes
  pack.seq_len) or the models' context when shorter, split where pack splits them
  (`operators/windows.py`), so each token's ref_loss has the context the trainer gives it.
* Batching: documents are sorted by length (longest first, so an out-of-memory shows on
  the first batch), grouped so that rows * longest <= batch_tokens, right-padded with an
  attention mask, and the results put back in input order.
* Attention: `operators/prompt_attention.py` (SDPA in every layer, the last layer's
  attention to the prompt recomputed from its own query and key; models it cannot
  reproduce are refused at setup).
* Memory per actor: both models' weights, an fp32 copy of lm_head for a half-precision
  model, plus per batch the fp32 logits of one model (batch_tokens * vocab * 4 bytes:
  16384 * 152k ~ 10 GB; lower select.batch_tokens on a small GPU) and <= 256 MiB of
  attention probabilities.
"""
from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from operators import schema
from operators.base import Operator, check_columns
from operators.prompt_attention import CAPTURE_ATTN, PromptAttention, enable_prompt_attention, register_capture
from operators.select import none_mask, prompt_lengths, rho1_mask, sstoken_mask
from operators.select_config import SelectConfig
from operators.token_loss import token_losses_from_logits
from operators.windows import join_windows, split_long_documents

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------- loading
class Float32Head(torch.nn.Module):
    """An fp32 copy of a model's output layer: logits (and any post-head code) in fp32."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.weight = torch.nn.Parameter(head.weight.detach().float(), requires_grad=False)
        self.bias = None if head.bias is None else torch.nn.Parameter(head.bias.detach().float(),
                                                                      requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight, self.bias)


def use_float32_head(model: torch.nn.Module) -> bool:
    """Replace a half-precision lm_head by `Float32Head` (a copy: tied input embeddings stay
    as they are). Returns whether it did; a model whose head is not a Linear is left alone."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype in (torch.float32, torch.float64):
        return False
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is head:
                setattr(parent, name, Float32Head(head).to(head.weight.device))
                return True
    return False


def load_causal_lm(path: str, *, device: str, dtype: torch.dtype, trust_remote_code: bool = False,
                   capture_attention: bool = False, float32_head: bool = True) -> torch.nn.Module:
    """Load a causal LM from a local directory (never the hub) in eval mode, no grad.
    capture_attention: enable `prompt_attention` (verified against eager attention; the holder
    is `model.tokenmill_prompt_attention`). float32_head: see `use_float32_head`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist (models load from local "
                                "directories only)")
    from transformers import AutoModelForCausalLM
    if trust_remote_code:  # the directory's Python runs in this process: say so where it happens
        log.warning("loading %s with trust_remote_code=True: Python files in that model directory run "
                    "in this process", path)
    if capture_attention:
        register_capture()
    has_st = any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path))
    if not has_st:  # pytorch_model.bin is a pickle: loading it could run code
        raise ValueError(f"model directory {path!r} has no .safetensors weights; models load from safetensors "
                         "only (convert with `model.save_pretrained(dir)`, which writes safetensors)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype,
            use_safetensors=True,
            attn_implementation=CAPTURE_ATTN if capture_attention else None)  # None: HF default (SDPA)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError... name the path
        raise ValueError(f"cannot load a causal LM from {path!r}: {type(e).__name__}: {e}") from e
    model.to(device).eval().requires_grad_(False)
    if float32_head:
        use_float32_head(model)
    if capture_attention:
        try:
            holder = enable_prompt_attention(model)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        object.__setattr__(model, "tokenmill_prompt_attention", holder)
    return model


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


@torch.inference_mode()
def score_sequences(model: torch.nn.Module, sequences: Sequence[np.ndarray], *,
                    prompt_lens: np.ndarray | None = None, batch_tokens: int = 16384,
                    pad_id: int = 0) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per-document token losses [T_i] float32 (nats, NaN at 0) and, when `prompt_lens`
    is given (the model must be loaded with capture_attention=True), the last-layer
    attention to the first prompt_lens[i] positions, [T_i] float32."""
    device = next(model.parameters()).device
    holder: PromptAttention | None = getattr(model, "tokenmill_prompt_attention", None)
    if prompt_lens is not None and holder is None:
        raise ValueError(f"{type(model).__name__}: load it with capture_attention=True to get attention")
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    losses = [np.zeros(0, np.float32) for _ in sequences]
    attn = [np.zeros(0, np.float32) for _ in sequences] if prompt_lens is not None else None
    for idx in length_batches(lengths, batch_tokens):
        L = lengths[idx]
        ids = np.full((idx.size, int(L.max())), pad_id, dtype=np.int64)
        for r, i in enumerate(idx):
            ids[r, :L[r]] = sequences[i]
        ids_BT = torch.from_numpy(ids).to(device)
        pos_T = torch.arange(ids.shape[1], device=device)
        mask_BT = (pos_T[None, :] < torch.from_numpy(L).to(device)[:, None]).long()
        logits = model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).logits
        loss_BT = token_losses_from_logits(logits, ids_BT).cpu().numpy()
        del logits
        attn_BT = None
        if prompt_lens is not None:
            # one segment per row; right padding is never a key of a real query (causal)
            prompt_BT = pos_T[None, :] < torch.from_numpy(prompt_lens[idx]).to(device)[:, None]
            attn_BT = holder(torch.zeros_like(ids_BT), prompt_BT).cpu().numpy()
            holder.clear()
        for r, i in enumerate(idx):
            losses[i] = loss_BT[r, :L[r]].copy()
            if attn is not None:
                attn[i] = attn_BT[r, :L[r]].copy()
    return losses, attn


# ---------------------------------------------------------------- the operator
class TokenScorer(Operator):
    """Actor-pool operator: adds `loss_mask`, `token_scores` and `ref_loss` to tokenized documents.

    TokenScorer(config, window_len=pack.seq_len), where config is a `SelectConfig` (or a
    mapping validated as one; errors name `select.<key>`). Reads input_ids list<int32>,
    target_mask list<uint8>, id; every other column passes through. ref_loss: nats at
    targets, NaN elsewhere. token_scores: the static ssToken score or Rho-1 excess loss at
    targets (NaN without a current_model). The static Rho-1 mask ranks over all targets
    of the table passed in.
    """
    reads: ClassVar[tuple[str, ...]] = (schema.ID, schema.INPUT_IDS, schema.TARGET_MASK)
    adds: ClassVar[tuple[str, ...]] = (schema.LOSS_MASK, schema.TOKEN_SCORES, schema.REF_LOSS)

    def __init__(self, config: SelectConfig | Mapping[str, Any], *, window_len: int | None = None) -> None:
        self.config = config if isinstance(config, SelectConfig) else SelectConfig.from_dict(config)
        if self.config.method == "none":
            raise ValueError("select.method: 'none' needs no scoring (loss_mask = target_mask)")
        if window_len is not None and (isinstance(window_len, bool) or not isinstance(window_len, int)
                                       or window_len < 2):
            raise ValueError(f"window_len must be an int >= 2 (pack.seq_len), got {window_len!r}")
        self.window_len = window_len
        self._current: torch.nn.Module | None = None  # loaded by setup(), so __init__ stays picklable
        self._other: torch.nn.Module | None = None
        self.vocab_size: int | None = None  # both set by setup() from the models' configs
        self.max_len: int | None = None

    def setup(self) -> None:
        c = self.config
        device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[c.dtype] if c.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        kw = dict(device=device, dtype=dtype, trust_remote_code=c.trust_remote_code)
        models = {c.other_model: load_causal_lm(c.other_model, **kw)}
        if c.current_model is not None:
            models[c.current_model] = load_causal_lm(c.current_model, capture_attention=c.method == "sstoken", **kw)
        sizes = {path: m.config.get_text_config().vocab_size for path, m in models.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError("vocab sizes differ: " + ", ".join(f"{p!r} has {v}" for p, v in sizes.items())
                             + "; both models must share a tokenizer")
        self._other, self._current = models[c.other_model], models.get(c.current_model)
        self.vocab_size = next(iter(sizes.values()))
        positions = [getattr(m.config.get_text_config(), "max_position_embeddings", None) for m in models.values()]
        self.max_len = min((p for p in positions if p), default=None)

    @property
    def window(self) -> int:
        """Tokens per scoring window: min(window_len, the models' context)."""
        return min(w for w in (self.window_len, self.max_len, 1 << 31) if w)

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
        return offsets, np.split(ids, cuts), np.split(tms, cuts)

    def __call__(self, table: pa.Table) -> pa.Table:
        check_columns(table, self.reads, type(self).__name__)
        if self._other is None:
            self.setup()
        if table.num_rows:
            self._documents(table)  # errors name the input document, not a window of it
        windows, n_win = split_long_documents(table, self.window)
        return join_windows(table, self._score(windows), n_win)

    def _score(self, table: pa.Table) -> pa.Table:
        c = self.config
        if table.num_rows == 0:
            offsets, sequences, target_masks = np.zeros(1, np.int64), [], []
        else:
            offsets, sequences, target_masks = self._documents(table)
        other, _ = score_sequences(self._other, sequences, batch_tokens=c.batch_tokens)
        ref_loss = [np.where(tm == 1, x, np.nan).astype(np.float32) for x, tm in zip(other, target_masks)]
        if self._current is None:
            selection = none_mask(target_masks)
        elif c.method == "sstoken":
            cur, attn = score_sequences(self._current, sequences, prompt_lens=prompt_lengths(target_masks),
                                        batch_tokens=c.batch_tokens)
            selection = sstoken_mask([h - x for h, x in zip(other, cur)], attn, target_masks,
                                     gamma=c.gamma, ratio=c.ratio)
        else:
            cur, _ = score_sequences(self._current, sequences, batch_tokens=c.batch_tokens)
            selection = rho1_mask(cur, other, target_masks, ratio=c.ratio)
        pa_offsets = pa.array(offsets, pa.int32())

        def column(parts: list[np.ndarray], dtype: np.dtype, pa_type: pa.DataType) -> pa.Array:
            values = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
            return pa.ListArray.from_arrays(pa_offsets, pa.array(values, pa_type))

        out = table.drop_columns([n for n in self.adds if n in table.column_names])  # re-scoring replaces
        out = out.append_column(schema.LOSS_MASK, column(selection.loss_masks, np.uint8, pa.uint8()))
        out = out.append_column(schema.TOKEN_SCORES, column(selection.scores, np.float32, pa.float32()))
        return out.append_column(schema.REF_LOSS, column(ref_loss, np.float32, pa.float32()))
