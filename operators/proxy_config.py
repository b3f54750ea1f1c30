"""The proxy model and its training settings: the `mixture.proxy:` block (operators/proxy.py).

Its own module, without torch, so that `pipeline/config.py` can use `ProxyConfig` as the type
of `MixtureSection.proxy` and load a config in ~0.3 s (importing torch costs ~2 s). The seed is
not a setting: the caller passes it to `train_proxy(..., seed=...)` per proxy run.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator


class ProxyConfig(BaseModel):
    """Proxy model and training settings. Tokens per proxy: steps * batch_size * seq_len."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: StrictInt = Field(64, ge=1)
    layers: StrictInt = Field(2, ge=1)
    heads: StrictInt = Field(4, ge=1)
    seq_len: StrictInt = Field(128, ge=2)     # tokens per row (one input and one target at least); max positions
    steps: StrictInt = Field(200, ge=1)       # optimizer steps
    batch_size: StrictInt = Field(16, ge=1)   # rows per step
    lr: float = Field(3e-3, gt=0)             # peak AdamW learning rate
    warmup_steps: StrictInt = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)    # on matrices only (not norms)
    init_from: str | None = None              # a local HF checkpoint directory to continue from

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ProxyConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self
