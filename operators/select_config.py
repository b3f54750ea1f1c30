"""The `select:` block: one typed config for token selection, read by every layer.

    select: {method: sstoken, history_model: /ckpt/base, current_model: /ckpt/step-2000}
    select: {method: rho1, reference_model: /ckpt/ref, ratio: 0.7}
    select: {method: sstoken, history_model: /ckpt/base}      # stored losses only, select online

`pipeline/config.py` uses this model for `Config.select`; `TokenScorer(config)` and the
stage that runs it read the same object, and `manifest_block` writes what the shards'
manifest says about the selection. Errors name the key path (`select.gamma: ...`) both
inside a whole run config and from `SelectConfig.from_dict`.

What the stage writes (algorithms.md, "Where selection happens"):
* always (sstoken, rho1): `ref_loss`, the history (ssToken) or reference (Rho-1) model's
  per-token loss in nats, fp32 log-softmax over fp32 logits, NaN where not a target. The
  trainer's `operators.selective_loss` selects online from it and the live model: the
  papers' method.
* with `current_model`: also `token_scores` and a static `loss_mask` from that frozen
  checkpoint, the *offline approximation* (the manifest says so: `mode: offline_static_mask`).
  Without it, `loss_mask = target_mask` (`mode: ref_loss_only`).

Warm-up (ssToken: gamma = 0 while the live model still equals the history model) is a
phase of training: `warmup_fraction` of the trainer's optimizer steps (reference code: the
first 20%), applied by the online loss. The static mask has no training phase, so it uses
`gamma` for every document; the old `warmup_docs` (the first N documents in corpus order,
which the trainer later shuffles) is rejected with a message saying so.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

OTHER_MODEL_KEY = {"sstoken": "history_model", "rho1": "reference_model"}


class SelectConfig(BaseModel):
    """Token selection (algorithms.md): ssToken for SFT data, Rho-1 for pre-training data."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["sstoken", "rho1", "none"]
    history_model: str | None = None     # sstoken: the model before fine-tuning -> ref_loss
    reference_model: str | None = None   # rho1: the reference model trained on curated data -> ref_loss
    current_model: str | None = None     # optional: a frozen checkpoint for the offline static mask
    gamma: float = Field(0.5, ge=0, le=1, description="ssToken: weight of the loss term (REL) in the score")
    ratio: float = Field(0.6, gt=0, le=1, description="fraction of target tokens kept")
    warmup_fraction: float = Field(0.2, ge=0, le=1, description="ssToken online: fraction of training "
                                   "steps that use gamma = 0 (attention only)")
    warmup_docs: int | None = Field(None, description="removed: see warmup_fraction")
    tokenizer: str | None = None         # whose shards get selected; default: the first tokenizer
    docs_per_batch: int = Field(64, ge=1, description="documents per scoring call (the static Rho-1 "
                                "mask ranks within it)")
    batch_tokens: int = Field(16384, ge=1, description="padded tokens per forward pass")
    actors: int = Field(1, ge=1)
    num_gpus: float | None = Field(None, ge=0, description="per actor; default 1 when the cluster has GPUs")
    num_cpus: float = Field(0.25, gt=0, description="per actor; fractional so actors never starve other tasks")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _models(self):
        if self.warmup_docs is not None:
            raise ValueError("select.warmup_docs was removed: warm-up is a phase of training, so it is "
                             "select.warmup_fraction (of the trainer's steps, applied by the online loss); "
                             "the offline static mask uses gamma for every document")
        other = OTHER_MODEL_KEY.get(self.method)
        if other and getattr(self, other) is None:
            raise ValueError(f"method '{self.method}' needs select.{other} (its per-token losses are "
                             "what the shards store as ref_loss)")
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "select") -> SelectConfig:
        """Validate a plain mapping; ValueError lines name the key path (`select.gamma: ...`)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ValueError("\n".join(_error_line(err, path) for err in e.errors())) from None

    @property
    def other_model(self) -> str | None:
        """The model whose losses become ref_loss (history for ssToken, reference for Rho-1)."""
        key = OTHER_MODEL_KEY.get(self.method)
        return getattr(self, key) if key else None

    @property
    def mode(self) -> str:
        if self.method == "none":
            return "none"
        return "offline_static_mask" if self.current_model else "ref_loss_only"

    def manifest_block(self, *, window_len: int | None = None) -> dict[str, Any]:
        """The shards manifest's `selection` block (the stage adds its counts)."""
        if self.method == "none":
            return {"method": "none"}
        key = OTHER_MODEL_KEY[self.method]
        block: dict[str, Any] = {
            "method": self.method, "mode": self.mode, key: getattr(self, key),
            "current_model": self.current_model, "ratio": self.ratio,
            "ref_loss": True, "ref_loss_precision": "float32 (log-softmax and loss over float32 logits)",
            "model_dtype": self.dtype or "auto (bfloat16 on GPU, float32 on CPU)",
            "window_len": window_len, "trust_remote_code": self.trust_remote_code,
            "online": "operators.selective_loss: the live model is the current model (the papers' method)",
            "loss_mask": ("static mask from the frozen current_model: an offline approximation"
                          if self.current_model else "equal to target_mask: no selection offline"),
        }
        if self.method == "sstoken":
            block.update(gamma=self.gamma, warmup_fraction=self.warmup_fraction)
        elif self.current_model:
            block.update(static_mask_batch_docs=self.docs_per_batch)
        return block


def _error_line(err: Mapping[str, Any], path: str) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
    return f"{path}.{loc}: {msg}" if loc else f"{path}: {msg}"
