"""The live model's last-layer attention to the prompt, without an eager forward pass.

ssToken's attention term (algorithms.md) needs, per target token t, the last layer's
attention probabilities from query t to the prompt keys of its sample. Asking transformers
for them (`output_attentions=True`) forces the eager kernel in every layer and returns
[B, H, T, T] per layer. Instead:

    attention = enable_prompt_attention(model)           # once, after loading the model
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    attn_BT = attention(segment_ids_BT, prompt_mask_BT)   # [B, T] float32, no grad

`enable_prompt_attention` switches the model to a registered attention implementation that
runs SDPA in every layer (the kernel a plain forward uses) and, in the last layer only,
keeps a detached reference to that layer's own query and key (post-projection, post-RoPE;
the same tensors autograd keeps for the backward pass, so no extra memory while training).
The reduction is recomputed from them in fp32 with an explicit causal + same-segment mask
(`operators/token_loss.py`): one extra QK^T of one layer, chunked to <= 256 MiB.

Models whose attention this recomputation would get wrong are refused with a ValueError
instead of being scored silently wrong: the attention call's arguments are checked
(softcapping, attention sinks `s_aux`/`sinks`, a position bias, a sliding window shorter
than the sequence, non-causal attention), and on enabling, a probe (two rows, one of them
two packed documents) is compared with the model's own eager attention probabilities
(tolerance 1e-4 in fp32, 3e-2 in bf16/fp16). Models that bypass transformers'
AttentionInterface are refused the same way. GPT-2's per-layer scaling
(scale_attn_by_inverse_layer_idx) arrives in the `scaling` argument and is reproduced.
Attention dropout is not applied: the probabilities are the pre-dropout ones.
"""
from __future__ import annotations

from typing import Any

import torch

from operators.token_loss import prompt_attention_from_qk, segment_ids_from_positions

CAPTURE_ATTN = "tokenmill_prompt_attention"  # name of the registered attention implementation
_HOLDER_ATTR = "_tokenmill_prompt_attention"
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}  # other dtypes: 3e-2
# Attention arguments that change the probabilities in ways the recomputation does not model.
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "block_indices")


class PromptAttention:
    """Holds the last layer's query and key of the latest forward pass of one model;
    calling it reduces them to the attention on each segment's prompt, [B, T] float32."""

    def __init__(self, model_name: str, layer_idx: int):
        self.model_name, self.layer_idx = model_name, layer_idx
        self.query: torch.Tensor | None = None  # [B, H, T, D], detached
        self.key: torch.Tensor | None = None    # [B, K, T, D], detached
        self.scaling: float | None = None
        self.mask: Any = None                   # the attention mask transformers built (None: causal only)

    def record(self, query: torch.Tensor, key: torch.Tensor, scaling: float, mask: Any) -> None:
        self.query, self.key, self.scaling, self.mask = query.detach(), key.detach(), scaling, mask

    def clear(self) -> None:
        """Drop the references to the last forward pass's tensors."""
        self.query = self.key = self.mask = None

    def __call__(self, segment_ids_BT: torch.Tensor, prompt_mask_BT: torch.Tensor) -> torch.Tensor:
        """segment_ids [B, T] (`token_loss.segment_ids_from_positions`), prompt_mask [B, T] bool:
        True on the positions of each segment before its first target."""
        if self.query is None:
            raise RuntimeError(f"{self.model_name}: no forward pass has run through the "
                               f"'{CAPTURE_ATTN}' attention since enable_prompt_attention")
        expected = (self.query.shape[0], self.query.shape[2])
        if tuple(segment_ids_BT.shape) != expected:
            raise ValueError(f"segment_ids {tuple(segment_ids_BT.shape)} do not match the last forward "
                             f"pass's [batch, tokens] = {expected}")
        return prompt_attention_from_qk(self.query, self.key, scaling=self.scaling,
                                        segment_ids_BT=segment_ids_BT, prompt_mask_BT=prompt_mask_BT)

    def check_segments_isolated(self, segment_ids_BT: torch.Tensor, has_target_BT: torch.Tensor) -> None:
        """Raise when a row packs several documents but the last forward pass let a document
        attend to the one before it (the model was called without position_ids, or with a
        2-D attention_mask or a cache, so transformers built a plain causal mask)."""
        seg = segment_ids_BT.to("cpu")
        starts = (torch.diff(seg, dim=-1) != 0).nonzero()  # (row, t - 1) for segment starts t > 0
        if starts.numel() == 0:
            return
        rows, cols = starts[:, 0], starts[:, 1] + 1
        # only segments with a target matter (padding tokens are one-token segments)
        target = has_target_BT.to("cpu", torch.bool)
        row_of = torch.arange(seg.shape[0])[:, None].expand_as(seg)
        seg_has_target = torch.zeros(seg.shape[0], int(seg.max()) + 1, dtype=torch.bool)
        seg_has_target[row_of[target], seg[target]] = True
        keep = seg_has_target[rows, seg[rows, cols]]
        rows, cols = rows[keep], cols[keep]
        if rows.numel() == 0:
            return
        mask = self.mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            m = mask[rows if mask.shape[0] > 1 else torch.zeros_like(rows), 0, cols, cols - 1].cpu()
            blocked = ~m if m.dtype == torch.bool else m < -1e3
            if bool(blocked.all()):
                return
        raise ValueError(f"{self.model_name}: a row packs several documents, but in the last forward pass "
                         "a document attended to the one before it. Call the model with the shards' "
                         "position_ids, use_cache=False and no attention_mask, so transformers builds "
                         "the per-document causal mask")


def _capturing_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: Any, **kwargs: Any):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    holder = getattr(module, _HOLDER_ATTR, None)
    if isinstance(holder, PromptAttention):  # installed on every layer: SDPA runs them all
        last = getattr(module, "layer_idx", None) == holder.layer_idx
        T = query.shape[2]
        window = kwargs.get("sliding_window")
        bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
        if last and window is not None and window < T:
            bad.append(f"sliding_window={window} < {T} tokens")
        if last and kwargs.get("is_causal") is False:
            bad.append("is_causal=False")
        if bad:
            raise ValueError(f"{holder.model_name}: ssToken's attention term cannot be recomputed for this "
                             f"model: its attention layer {getattr(module, 'layer_idx', '?')} uses "
                             f"{', '.join(bad)}, which the SDPA forward and the explicit causal "
                             "recomputation do not model")
        if last:
            scaling = kwargs.get("scaling")
            holder.record(query, key, query.shape[-1] ** -0.5 if scaling is None else float(scaling),
                          attention_mask)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def register_capture() -> None:
    """Register the implementation with transformers (idempotent); the model builds SDPA masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(CAPTURE_ATTN, _capturing_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)


def last_layer_index(model: torch.nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers - 1


def enable_prompt_attention(model: torch.nn.Module, *, verify: bool = True) -> PromptAttention:
    """Switch `model` (a loaded transformers causal LM, training or not) to the capturing
    attention and return the holder its last layer fills on every forward pass. `verify`
    runs the probe against the model's eager attention (module doc) and raises ValueError
    for a model whose attention the recomputation does not reproduce."""
    name = type(model).__name__
    register_capture()
    try:
        if model.config._attn_implementation != CAPTURE_ATTN:
            model.set_attn_implementation(CAPTURE_ATTN)
    except Exception as e:  # noqa: BLE001 - transformers raises several types; name the model
        raise ValueError(f"{name}: cannot switch its attention to '{CAPTURE_ATTN}' "
                         f"({type(e).__name__}: {e}); ssToken's attention term is unsupported for it") from e
    holder = PromptAttention(name, last_layer_index(model))
    installed = 0
    for module in model.modules():
        if getattr(module, "layer_idx", None) is not None:
            object.__setattr__(module, _HOLDER_ATTR, holder)  # a plain attribute, not a submodule
            installed += getattr(module, "layer_idx") == holder.layer_idx
    if not installed:
        raise ValueError(f"{name}: no module of layer {holder.layer_idx} carries a layer_idx; "
                         "ssToken's attention term is unsupported for this model")
    if verify:
        verify_prompt_attention(model, holder)
    return holder


@torch.no_grad()
def verify_prompt_attention(model: torch.nn.Module, holder: PromptAttention) -> float:
    """Compare the recomputed attention to the prompt with the model's own eager attention
    probabilities on a probe: row 0 packs two documents (5 and 7 tokens), row 1 is one of 12;
    each document's prompt is its first 2 tokens. Returns the max abs difference; raises
    ValueError above the dtype's tolerance or when the last layer never called the hook."""
    name = type(model).__name__
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (2, 12), generator=g).to(device)
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))], device=device)
    segments = [(0, 0, 5), (0, 5, 7), (1, 0, 12)]  # (row, start, length)
    was_training = model.training
    model.eval()
    holder.clear()
    try:
        try:
            model(input_ids=ids, position_ids=pos, use_cache=False)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a kernel refusing the model: say what it means here
            raise ValueError(f"{name}: the probe forward pass with SDPA attention failed ({type(e).__name__}: "
                             f"{e}); ssToken's attention term is unsupported for this model") from e
        if holder.query is None:
            raise ValueError(f"{name}: its last attention layer did not run through '{CAPTURE_ATTN}' "
                             "(a model that bypasses transformers' AttentionInterface); ssToken's "
                             "attention term is unsupported for it")
        got = holder(segment_ids_from_positions(pos), pos < 2)
        model.set_attn_implementation("eager")
        try:
            reference = []
            for row, start, length in segments:
                out = model(input_ids=ids[row:row + 1, start:start + length], use_cache=False,
                            output_attentions=True)
                reference.append(out.attentions[-1][0, :, :, :2].float().sum(-1).mean(0))
        finally:
            model.set_attn_implementation(CAPTURE_ATTN)
    finally:
        model.train(was_training)
        holder.clear()
    diff = max(float((got[row, start:start + length] - ref).abs().max())
               for (row, start, length), ref in zip(segments, reference))
    tolerance = _PROBE_TOLERANCE.get(dtype, 3e-2)
    if not diff <= tolerance:
        raise ValueError(f"{name}: the recomputed last-layer attention differs from the model's own eager "
                         f"attention by {diff:.2e} (tolerance {tolerance:g} in {dtype}); its attention has a "
                         "feature the recomputation does not model, so ssToken's attention term is "
                         "unsupported for it")
    return diff
