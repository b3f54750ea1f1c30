"""The torch math that token selection shares: per-token losses and attention to the prompt.

One implementation, imported by the offline scorer (`operators/score.py`), the online
training loss (`operators/selective_loss.py`) and nothing heavier: this module imports
torch only (no transformers, no other operator), which is what keeps `score.py` and
`select.py` free of an import cycle.

Conventions (shard-format.md): "token t is a target" means the loss of predicting
`input_ids[t]` from the tokens before it, so a per-token loss is indexed by the position
of the token predicted and position 0 has none (NaN). A row may hold several attention
segments (packed documents); segments are told apart by `position_ids` exactly as
transformers does it (`masking_utils.find_packed_sequence_indices`: a new segment starts
wherever position_ids[t] - position_ids[t - 1] != 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PROBS_BUDGET = 1 << 26  # fp32 attention probabilities materialised at once (256 MiB)
CE_ROWS = 4096          # logits rows upcast to fp32 at once for the cross-entropy


def token_losses_from_logits(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor,
                             *, chunk_rows: int = CE_ROWS) -> torch.Tensor:
    """Per-token CE in nats, [B, T] float32 on the logits' device, no grad: out[b, t] is the
    loss of predicting input_ids[b, t] from logits[b, t - 1]; out[:, 0] = NaN (no context).
    The log-softmax runs in fp32 whatever the logits' dtype, `chunk_rows` rows at a time so
    bf16 logits never exist as a whole fp32 copy. Padding gets a finite, meaningless value."""
    B, T, _ = logits_BTV.shape
    out = torch.full((B, T), float("nan"), dtype=torch.float32, device=logits_BTV.device)
    targets = input_ids_BT.to(logits_BTV.device, torch.long)
    with torch.no_grad():
        for b in range(B):  # row by row: logits[b, :-1] is a contiguous view, no B*T*V copy
            for s in range(0, T - 1, chunk_rows):
                e = min(s + chunk_rows, T - 1)
                out[b, s + 1:e + 1] = F.cross_entropy(logits_BTV[b, s:e].float(), targets[b, s + 1:e + 1],
                                                      reduction="none")
    return out


def token_losses_with_grad(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """As `token_losses_from_logits` but differentiable, for the training loss: [B, T] float32,
    column 0 = 0 (it is never a target). Costs one fp32 copy of the logits, like transformers'
    own causal-LM loss."""
    B, T, V = logits_BTV.shape
    ce = F.cross_entropy(logits_BTV[:, :-1].reshape(-1, V).float(),
                         input_ids_BT[:, 1:].reshape(-1).to(logits_BTV.device, torch.long), reduction="none")
    return F.pad(ce.view(B, T - 1), (1, 0))


def segment_ids_from_positions(position_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] int64 segment index per token, restarting at 0 in each row: transformers' rule
    for packed rows (a new segment wherever the position does not advance by exactly 1)."""
    first = position_ids_BT[:, :1] - 1
    step = torch.diff(position_ids_BT, prepend=first, dim=-1)
    return (step != 1).long().cumsum(-1)


def prompt_attention_from_probs(probs_BHQK: torch.Tensor, prompt_mask_BK: torch.Tensor) -> torch.Tensor:
    """Attn_t = mean over heads of the sum over prompt keys of the attention probability.
    probs [B, H, Q, K] (rows already causally masked), prompt_mask [B, K] bool;
    returns [B, Q] float32 in [0, 1]."""
    keys = prompt_mask_BK.to(probs_BHQK.device, torch.float32)[:, None, :, None]
    return torch.matmul(probs_BHQK.float(), keys).squeeze(-1).mean(dim=1)


@torch.no_grad()
def prompt_attention_from_qk(query_BHTD: torch.Tensor, key_BKTD: torch.Tensor, *, scaling: float,
                             segment_ids_BT: torch.Tensor, prompt_mask_BT: torch.Tensor,
                             budget: int | None = None) -> torch.Tensor:
    """Last-layer attention to the prompt, recomputed from the layer's own (post-projection,
    post-RoPE) query and key: softmax over the keys a query may see (causal, same segment),
    then the probability mass on the prompt keys of its segment, averaged over heads.

    query [B, H, T, D]; key [B, K, T, D] with K | H (GQA: query head h uses kv head
    h // (H / K), as transformers' repeat_kv); segment_ids [B, T]; prompt_mask [B, T] bool,
    True on the positions of each segment before its first target. Returns [B, T] float32
    (no grad). fp32 throughout; at most `budget` probabilities exist at once."""
    B, H, T, D = query_BHTD.shape
    K = key_BKTD.shape[1]
    if H % K:
        raise ValueError(f"{H} query heads cannot share {K} key heads")
    G = H // K
    device = query_BHTD.device
    key = key_BKTD.float().transpose(-1, -2)[:, :, None]          # [B, K, 1, D, T]
    seg = segment_ids_BT.to(device)
    prompt = prompt_mask_BT.to(device, torch.float32)[:, None, None, :, None]  # [B, 1, 1, T, 1]
    pos = torch.arange(T, device=device)
    out = torch.empty(B, T, dtype=torch.float32, device=device)
    step = max(1, (budget or PROBS_BUDGET) // max(1, B * H * T))
    for q0 in range(0, T, step):
        q1 = min(q0 + step, T)
        q = query_BHTD[:, :, q0:q1].float().reshape(B, K, G, q1 - q0, D)
        scores = torch.matmul(q, key) * scaling                      # [B, K, G, q, T]
        allowed = (pos[q0:q1, None] >= pos[None, :])[None] & (seg[:, q0:q1, None] == seg[:, None, :])
        probs = torch.softmax(scores.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1)
        out[:, q0:q1] = torch.matmul(probs, prompt).squeeze(-1).mean(dim=(1, 2))
    return out
