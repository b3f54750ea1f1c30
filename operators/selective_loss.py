"""Online token selection in the training step: ssToken and Rho-1 as the papers run them.

In both papers the "current" model is the model being trained and the mask changes every
step (algorithms.md, "Where selection happens"). The select stage stores the expensive,
fixed half in the shards: `ref_loss`, the history (ssToken) or reference (Rho-1) model's
per-token loss. This module is the trainer's half: one loss function that takes the live
logits, the batch (input_ids, target_mask, ref_loss, position_ids from the shards) and,
for ssToken, the live model's last-layer attention to the prompt:

* ssToken, per attention segment (a packed document): REL = ref_loss - live loss,
  min-max normalised over the segment's targets; score = gamma * REL_norm + (1 - gamma)
  * Attn; keep the top ceil(ratio * |targets|); gamma = 0 during warm-up (the first
  `warmup_fraction` of training steps; the reference code: its first 20%).
* Rho-1: excess = live loss - ref_loss; keep the top ceil(ratio * N) of the batch's N
  targets (per micro-batch, per device: what "the batch" is in a data-parallel run).
* Loss = mean cross-entropy over the kept tokens (the reference code's reduction). Scores
  carry no gradient; the ranking runs in numpy (`operators/select.py`, the same code the
  offline scorer uses), a [B, T] round trip to the CPU per step. The live loss is an fp32
  log-softmax of the trainer's logits (bf16-rounded logits under bf16 autocast: the
  stored ref_loss is not, see operators/score.py).

A plain PyTorch loop over the shards:

    from operators.prompt_attention import enable_prompt_attention
    from operators.selective_loss import selective_loss
    attention = enable_prompt_attention(model)            # ssToken only; refuses unsupported models
    loader = DataLoader(ShardDataset(shard_dir, seed=0, batch_size=8), batch_size=None)
    for step, batch in enumerate(loader):                 # batch: a ShardBatch (reads like a dict)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits             # position_ids: one causal mask per document
        out = selective_loss(logits, batch, method="sstoken", ratio=0.6, gamma=0.5,
                             warmup=step < 0.2 * total_steps, attention=attention)
        out.loss.backward(); optimizer.step(); optimizer.zero_grad()

transformers.Trainer (compute_loss_func):

    loss = SelectiveLoss.from_manifest(manifest, attention=enable_prompt_attention(model))
    trainer = Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False,
                                                          dataloader_num_workers=0),
                      train_dataset=ShardDataset(shard_dir, batch_size=None),  # single samples
                      data_collator=collate_for_trainer, compute_loss_func=loss, callbacks=[loss.callback])

`collate_for_trainer` passes input_ids, position_ids and use_cache=False to the model and the
rest as `labels` (a dict, which Trainer hands to compute_loss_func untouched). The callback
tells the loss the step (for warm-up) and the gradient-accumulation steps (the loss divides
by them, as Trainer expects of a compute_loss_func).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from operators import schema as S
from operators.prompt_attention import PromptAttention
from operators.select import check_gamma, check_method, check_ratio, segment_layout, select_rows
from operators.token_loss import prompt_attention_from_probs, segment_ids_from_positions, token_losses_with_grad


class SelectiveLossOutput(NamedTuple):
    loss: torch.Tensor       # scalar: mean CE (nats) over the kept tokens, differentiable
    loss_mask: torch.Tensor  # [B, T] bool: the tokens kept this step
    scores: torch.Tensor     # [B, T] float32: ssToken score / Rho-1 excess loss, NaN off target
    num_targets: int
    num_kept: int


def _attention_BT(attention: Any, seg_BT: torch.Tensor, prompt_BT: torch.Tensor, target_BT: torch.Tensor,
                  packed: bool) -> torch.Tensor:
    if isinstance(attention, PromptAttention):
        if packed:
            attention.check_segments_isolated(seg_BT, target_BT)
        return attention(seg_BT, prompt_BT)
    if isinstance(attention, torch.Tensor) and attention.dim() == 4:  # eager probabilities [B, H, T, T]
        if packed:
            raise ValueError("attention as [B, H, T, T] probabilities is for one document per row; "
                             "for packed rows pass the PromptAttention of enable_prompt_attention")
        return prompt_attention_from_probs(attention.detach(), prompt_BT)
    if isinstance(attention, torch.Tensor) and attention.dim() == 2:
        return attention.detach()
    raise ValueError("method 'sstoken' needs attention: the PromptAttention returned by "
                     "operators.prompt_attention.enable_prompt_attention(model), or a [B, T] tensor of "
                     "attention to the prompt, or [B, H, T, T] last-layer probabilities")


def selective_loss(logits_BTV: torch.Tensor, batch: Mapping[str, torch.Tensor] | Any, *, method: str,
                   ratio: float = 0.6, gamma: float = 0.5, warmup: bool = False,
                   attention: PromptAttention | torch.Tensor | None = None) -> SelectiveLossOutput:
    """The selective training loss for one step.

    logits [B, T, V] from the live model on batch["input_ids"] [B, T] (logits[:, t] predicts
    token t + 1). batch: target_mask [B, T] (0 on padding and each document's first token),
    ref_loss [B, T] float (nats, NaN off target; not needed for method 'none'), position_ids
    [B, T] (optional: without it each row is one document). attention (ssToken): see
    `_attention_BT`. method 'none' trains on every target (the all-tokens baseline).
    """
    check_method(method)
    ratio = check_ratio(ratio)
    gamma = check_gamma(gamma)
    ids = batch[S.INPUT_IDS]
    B, T = ids.shape
    if logits_BTV.dim() != 3 or tuple(logits_BTV.shape[:2]) != (B, T):
        raise ValueError(f"logits {tuple(logits_BTV.shape)} do not match input_ids {(B, T)}")
    device = logits_BTV.device
    target_BT = batch[S.TARGET_MASK].to(device).bool()
    if target_BT[:, 0].any():
        raise ValueError("target_mask[:, 0] = 1: position 0 has no context, it cannot be a target")
    ce_BT = token_losses_with_grad(logits_BTV, ids)  # fp32, grad
    positions = batch[S.POSITION_IDS] if S.POSITION_IDS in batch else None  # a Mapping or a ShardBatch
    seg_BT = (segment_ids_from_positions(positions.to(device)) if positions is not None
              else torch.zeros(B, T, dtype=torch.long, device=device))
    target_np = target_BT.cpu().numpy()
    layout = segment_layout(target_np, seg_BT.cpu().numpy())
    if method == "none":
        ref_np = np.zeros((B, T))
    else:
        if S.REF_LOSS not in batch:
            raise KeyError(f"method {method!r} needs batch[{S.REF_LOSS!r}]: the shards' stored "
                           "history/reference losses (written by the select stage)")
        ref_np = batch[S.REF_LOSS].detach().to("cpu", torch.float32).numpy()
        if ref_np.shape != (B, T):
            raise ValueError(f"{S.REF_LOSS} {ref_np.shape} does not match input_ids {(B, T)}")
    attn_np = None
    if method == "sstoken":
        prompt_BT = torch.from_numpy(layout.prompt_mask).to(device)
        rows_of_targets = np.unique(layout.group[target_np]) // T  # one entry per segment with a target
        packed = bool(rows_of_targets.size and np.bincount(rows_of_targets).max() > 1)
        attn_np = _attention_BT(attention, seg_BT, prompt_BT, target_BT, packed).float().cpu().numpy()
    live_np = ce_BT.detach().cpu().numpy()
    keep_np, score_np = select_rows(method, live_np, ref_np, target_np, layout, attn_BT=attn_np,
                                    gamma=gamma, ratio=ratio, warmup=warmup)
    keep_BT = torch.from_numpy(keep_np).to(device)
    num_kept = int(keep_np.sum())
    loss = (ce_BT * keep_BT).sum() / max(1, num_kept)
    return SelectiveLossOutput(loss, keep_BT, torch.from_numpy(score_np).to(device),
                               int(target_np.sum()), num_kept)


def collate_for_trainer(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """ShardDataset samples -> a transformers.Trainer batch: the model gets input_ids,
    position_ids (so it builds one causal mask per packed document) and use_cache=False;
    `labels` is a dict of input_ids, target_mask, position_ids and ref_loss for the loss."""
    keys = [k for k in (S.INPUT_IDS, S.TARGET_MASK, S.POSITION_IDS, S.REF_LOSS) if k in samples[0]]
    labels = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}
    return {"input_ids": labels[S.INPUT_IDS], "position_ids": labels[S.POSITION_IDS], "use_cache": False,
            "labels": labels}


class SelectiveLoss:
    """`compute_loss_func` for transformers.Trainer (module doc); warm-up is the first
    `warmup_fraction` of the Trainer's max_steps, told by `callback`. `last` holds the
    latest step's output (loss detached) for logging."""

    def __init__(self, *, method: str, ratio: float = 0.6, gamma: float = 0.5, warmup_fraction: float = 0.2,
                 attention: PromptAttention | None = None):
        self.method, self.ratio, self.gamma = check_method(method), check_ratio(ratio), check_gamma(gamma)
        if isinstance(warmup_fraction, bool) or not (isinstance(warmup_fraction, (int, float))
                                                     and 0.0 <= warmup_fraction <= 1.0):
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction!r}")
        if method == "sstoken" and not isinstance(attention, PromptAttention):
            raise ValueError("method 'sstoken' needs attention=enable_prompt_attention(model)")
        self.warmup_fraction, self.attention = float(warmup_fraction), attention
        self.step, self.max_steps, self.grad_accum = 0, 0, 1
        self.last: SelectiveLossOutput | None = None
        self.last_in_warmup = False
        self._callback = None

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], *, attention: PromptAttention | None = None,
                      **overrides: Any) -> SelectiveLoss:
        """Parameters from a shard manifest's `selection` block (method, ratio, gamma, warmup_fraction)."""
        sel = manifest.get("selection") or {}
        if sel.get("method") not in ("sstoken", "rho1") or not sel.get("ref_loss"):
            raise ValueError(f"the manifest's selection block {sel!r} has no stored ref_loss for "
                             "sstoken or rho1: run the select stage on these shards first")
        params = {k: sel[k] for k in ("ratio", "gamma", "warmup_fraction") if k in sel}
        return cls(method=sel["method"], attention=attention, **{**params, **overrides})

    def in_warmup(self) -> bool:
        return self.method == "sstoken" and self.step < self.warmup_fraction * self.max_steps

    def __call__(self, outputs: Any, labels: Mapping[str, torch.Tensor], num_items_in_batch: Any = None):
        if not isinstance(labels, Mapping):
            raise ValueError("SelectiveLoss needs the batch's labels as a dict: use data_collator="
                             "collate_for_trainer and remove_unused_columns=False")
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        self.last_in_warmup = self.in_warmup()
        out = selective_loss(logits, labels, method=self.method, ratio=self.ratio, gamma=self.gamma,
                             warmup=self.last_in_warmup, attention=self.attention)
        self.last = out._replace(loss=out.loss.detach())
        return out.loss / self.grad_accum  # Trainer does not rescale a compute_loss_func's loss

    @property
    def callback(self):
        """A transformers.TrainerCallback that keeps `step`, `max_steps`, `grad_accum` current."""
        if self._callback is None:
            from transformers import TrainerCallback
            loss = self

            class _SelectiveLossProgress(TrainerCallback):
                def on_train_begin(self, args, state, control, **kwargs):
                    loss.grad_accum, loss.max_steps = args.gradient_accumulation_steps, state.max_steps

                def on_step_begin(self, args, state, control, **kwargs):
                    loss.step, loss.max_steps = state.global_step, state.max_steps

            self._callback = _SelectiveLossProgress()
        return self._callback
