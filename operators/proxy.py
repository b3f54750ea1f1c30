"""Proxy language models for the CLIMB mixture search: rows for a mixture, training, evaluation.

Pure torch + transformers (no ray); one proxy is one call to `train_proxy`, so the orchestrator
can run each as a Ray task with `num_gpus`. A proxy is a tiny Llama (RoPE, SwiGLU, RMSNorm)
trained from scratch (or from `init_from`) on packed rows with AdamW, linear warm-up and cosine
decay to 10% of `lr`. The defaults (hidden 64, 2 layers, 4 heads, seq_len 128, 200 steps of 16
rows, ~0.4M tokens) cost 44 s per proxy (training and eval_loss over 256 target rows) on one CPU
core with 8,193 ids, 26 s with 4,097, 238 s with a GPT-2-sized 50,257 (454 s when the loss still
built the [B, T, V] logits): the output matmuls are most of a step, hence the stage's compact
vocabulary `mixture.proxy_vocab` (benchmarks/bench_proxy_vocab.py, a shared 2-core EPYC). The
paper's proxies are 62M / 350M parameters on ~1B tokens; pass those sizes for a real search.

Scores: `eval_loss` = mean next-token cross-entropy (nats per predicted token) on target rows,
the default search metric (lower is better). `eval_multiple_choice` = accuracy of picking the
choice with the highest log-likelihood given the question, divided by the number of characters
of the continuation (lm-evaluation-harness `acc_norm`; `normalize="tokens"` or `"none"` too).

Determinism: the same rows, config, seed and thread count give bit-identical weights on CPU
(initialisation from `torch.manual_seed(seed)`, batch order from a numpy generator seeded with
`seed`). Rows must be chosen by the caller (`rows_for_mixture`) with its own generator.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from operators.proxy_config import ProxyConfig

__all__ = ["ProxyConfig", "build_proxy", "eval_loss", "eval_multiple_choice", "rows_for_mixture", "train_proxy"]


def build_proxy(vocab_size: int, cfg: ProxyConfig, *, seed: int) -> torch.nn.Module:
    """A fresh tiny Llama initialised from torch.manual_seed(seed), or cfg.init_from loaded from disk."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if cfg.init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"proxy.init_from {cfg.init_from}: vocab {model.config.vocab_size} < {vocab_size}")
        return model
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.heads, max_position_embeddings=cfg.seq_len,
                         tie_word_embeddings=True)  # with a 2-4k vocab, untied embeddings double the size
    return LlamaForCausalLM(config)


def _check_rows(rows_NT, vocab_size: int | None, name: str) -> np.ndarray:
    rows = np.asarray(rows_NT)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] < 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{name}: expected a non-empty integer [N, T >= 2] array, got {rows.dtype} {rows.shape}")
    if rows.min() < 0 or (vocab_size is not None and rows.max() >= vocab_size):
        raise ValueError(f"{name}: token ids must be in [0, {vocab_size}), got [{rows.min()}, {rows.max()}]")
    return rows.astype(np.int64)


def _lr_factor(step: int, cfg: ProxyConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_proxy(token_rows_NT, vocab_size: int, cfg: ProxyConfig, device: str | torch.device = "cpu", *,
                seed: int, num_threads: int | None = None) -> torch.nn.Module:
    """Train a proxy on packed rows [N, T] (T <= cfg.seq_len) of token ids; returns it in eval mode.

    `seed` decides the initialisation and the batch order. Batches walk seeded permutations of
    the rows (epochs when steps * batch_size > N). Every position but the first of a row is a
    target. `num_threads` sets torch.set_num_threads (process-wide) when given; the caller
    decides, e.g. 1 per proxy when proxies run in parallel.
    """
    rows = _check_rows(token_rows_NT, vocab_size, "train_proxy rows")
    if rows.shape[1] > cfg.seq_len:
        raise ValueError(f"train_proxy: rows have {rows.shape[1]} tokens, more than proxy.seq_len={cfg.seq_len}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    model = build_proxy(vocab_size, cfg, seed=seed).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    rng = np.random.default_rng(seed)
    need = cfg.steps * cfg.batch_size
    order = np.concatenate([rng.permutation(len(rows)) for _ in range(-(-need // len(rows)))])[:need]
    data = torch.from_numpy(rows)
    for step in range(cfg.steps):
        batch = data[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]].to(device)
        loss, count = _loss_sum(model, batch)
        opt.zero_grad(set_to_none=True)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return model


def _loss_sum(model: torch.nn.Module, ids_BT: torch.Tensor, pad_id: int | None = None):
    """(sum of next-token CE in nats, number of predicted tokens); pad_id targets are ignored.

    A Llama (what build_proxy makes) goes through `_linear_cross_entropy`: hidden states of the
    T-1 predicting positions times the tied output matrix, chunk by chunk, so the [B, T, V]
    logits never exist; other models (an `init_from` checkpoint of another family, whose head
    may scale or cap logits) through their own logits."""
    targets = ids_BT[:, 1:]
    if pad_id is not None:
        targets = targets.masked_fill(targets == pad_id, -100)
    count = int((targets != -100).sum())
    if getattr(model.config, "model_type", None) == "llama" and getattr(model.lm_head, "bias", None) is None:
        hidden = model.model(input_ids=ids_BT).last_hidden_state[:, :-1]
        return _linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                     targets.reshape(-1)), count
    logits = model(input_ids=ids_BT).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, count


# fp32 logits per chunk: 8 MiB (256 rows of an 8k vocabulary) stays in a core's share of L3.
_CHUNK_BYTES = 8 << 20


def _linear_cross_entropy(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """sum_n CE(hidden_n @ weight.T, target_n) over targets != -100, in nats, differentiable in
    hidden and weight, without materialising the [N, V] logits.

    Rows go in chunks of ~_CHUNK_BYTES of fp32 logits; the gradients are computed in the forward
    pass (softmax - onehot, two matmuls) and kept ([N, H] + [V, H]), as Liger's fused linear
    cross-entropy does on GPUs. Against full logits + F.cross_entropy (+ the [:, :-1] slice,
    whose backward zero-fills and copies a [B, T, V] tensor) a default proxy step took 1.2 s
    instead of 2.3 s with 50,257 ids and 0.24 s instead of 0.42 s with 8,193 (alternating runs
    on one core); the three logits matmuls are most of the rest. Eval needs no gradients: chunks only bound memory
    (eval_loss's 64 rows were 1.6 GB of logits with 50k ids)."""
    if torch.is_grad_enabled() and (hidden_NH.requires_grad or weight_VH.requires_grad):
        return _LinearCrossEntropy.apply(hidden_NH, weight_VH, targets_N)
    return _linear_ce_chunks(hidden_NH, weight_VH, targets_N, want_grad=False)[0]


def _linear_ce_chunks(hidden_NH, weight_VH, targets_N, *, want_grad: bool):
    """(loss sum fp32 scalar, d loss / d hidden [N, H] or None, d loss / d weight [V, H] or None)."""
    h, w = hidden_NH.float(), weight_VH.float()
    chunk = max(32, _CHUNK_BYTES // (4 * w.shape[0]))
    total = h.new_zeros(())
    grad_h = torch.zeros_like(h) if want_grad else None
    grad_w = torch.zeros_like(w) if want_grad else None
    for s in range(0, len(h), chunk):
        h_c, t_c = h[s:s + chunk], targets_N[s:s + chunk]
        valid = t_c != -100
        rows, t_safe = torch.arange(len(t_c), device=t_c.device), t_c.clamp_min(0)
        logits = h_c @ w.T
        lse = torch.logsumexp(logits, 1)
        total = total + ((lse - logits[rows, t_safe]) * valid).sum()
        if want_grad:
            probs = logits.sub_(lse[:, None]).exp_()   # softmax, in place of the logits
            probs[rows, t_safe] -= 1.0
            if not bool(valid.all()):
                probs[~valid] = 0.0
            grad_h[s:s + chunk] = probs @ w
            grad_w.addmm_(probs.T, h_c)
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N):
        total, grad_h, grad_w = _linear_ce_chunks(hidden_NH, weight_VH, targets_N, want_grad=True)
        ctx.save_for_backward(grad_h.to(hidden_NH.dtype), grad_w.to(weight_VH.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None


@torch.no_grad()
def eval_loss(model: torch.nn.Module, token_rows_NT, *, batch_size: int = 64, pad_id: int | None = None) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over rows [N, T]."""
    rows = _check_rows(token_rows_NT, None, "eval_loss rows")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        loss, n = _loss_sum(model, torch.from_numpy(rows[i:i + batch_size]).to(device), pad_id)
        total, count = total + float(loss), count + n
    if count == 0:
        raise ValueError("eval_loss: no target tokens (every target is pad_id)")
    return total / count


@torch.no_grad()
def eval_multiple_choice(model: torch.nn.Module, tokenize_fn: Callable[[str], Sequence[int]],
                         items: Sequence[Mapping], *, normalize: str = "chars", separator: str = " ") -> float:
    """Accuracy on items `{"question": str, "choices": [str, ...], "answer": int}`, zero-shot.

    Each choice is scored by sum log p(tokenize_fn(separator + choice) | tokenize_fn(question)),
    divided by len(separator + choice) in characters ("chars", lm-eval-harness acc_norm), by
    its token count ("tokens"), or not at all ("none", plain acc). The question is cut from the
    left to fit the model's max positions. Ties go to the lower choice index.
    """
    if normalize not in ("chars", "tokens", "none"):
        raise ValueError(f"normalize must be 'chars', 'tokens' or 'none', got {normalize!r}")
    if not items:
        raise ValueError("eval_multiple_choice: no items")
    device = next(model.parameters()).device
    max_len = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    correct = 0
    for n, item in enumerate(items):
        choices, answer = item.get("choices"), item.get("answer")
        if not isinstance(item.get("question"), str) or not choices or not isinstance(answer, int) \
                or not 0 <= answer < len(choices):
            raise ValueError(f"item {n}: expected question (str), choices (non-empty list) and an answer "
                             f"index into choices, got {dict(item)!r:.200}")
        context = list(tokenize_fn(item["question"]))
        scores = []
        for choice in choices:
            text = separator + choice
            cont = list(tokenize_fn(text))
            if not context or not cont or len(cont) >= max_len:
                raise ValueError(f"item {n}: empty question or choice after tokenization, or a choice "
                                 f"longer than the model's {max_len} positions")
            ids = (context + cont)[-max_len:]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0].float(), -1)
            pos = torch.arange(len(ids) - len(cont), len(ids), device=device)
            ll = float(logp[pos - 1, torch.tensor(cont, device=device)].sum())
            scores.append(ll / {"chars": len(text), "tokens": len(cont), "none": 1}[normalize])
        correct += int(np.argmax(scores) == answer)
    return correct / len(items)


def rows_for_mixture(domain_tokens: Mapping[int, np.ndarray], weights, num_rows: int, seq_len: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Training rows int32 [num_rows, seq_len] drawn to a mixture.

    domain_tokens[d]: 1-D token stream of domain d (documents concatenated with EOS).
    weights: [D] shares indexed by domain id, or {domain_id: share}. Rows per domain are
    num_rows * w_d rounded by largest remainder (so they sum to num_rows); each row is a window
    at a uniformly random offset of its domain's stream; rows are shuffled across domains.
    """
    if isinstance(weights, Mapping):
        w_map = {int(k): float(v) for k, v in weights.items()}
    else:
        w_map = dict(enumerate(np.asarray(weights, dtype=np.float64).tolist()))
    ids = sorted(d for d, v in w_map.items() if v > 0)
    w = np.array([w_map[d] for d in ids])
    if not ids or not np.all(np.isfinite(w)) or any(v < 0 for v in w_map.values()):
        raise ValueError(f"weights must be finite shares >= 0 with at least one > 0, got {w_map}")
    if num_rows < 1 or seq_len < 2:
        raise ValueError(f"num_rows must be >= 1 and seq_len >= 2, got {num_rows}, {seq_len}")
    exact = num_rows * w / w.sum()
    alloc = np.floor(exact).astype(np.int64)
    alloc[np.argsort(-(exact - alloc), kind="stable")[:num_rows - alloc.sum()]] += 1
    parts = []
    for d, k in zip(ids, alloc):
        stream = np.asarray(domain_tokens.get(d, ()))
        if k and stream.size < seq_len:
            raise ValueError(f"domain {d} has weight {w_map[d]} but only {stream.size} tokens (< seq_len {seq_len})")
        starts = rng.integers(0, stream.size - seq_len + 1, size=k) if k else np.zeros(0, np.int64)
        parts.append(stream[starts[:, None] + np.arange(seq_len)])
    rows = np.concatenate(parts).astype(np.int32)
    return rows[rng.permutation(len(rows))]
