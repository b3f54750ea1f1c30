"""Tiny random causal LMs saved to disk, for tests that load models through the real path.

Plain module (not a conftest) so any test can import it
(`from tests.unit.tiny_models import make_tiny_causal_lm`). Models are
built from a config with a fixed seed and saved with safetensors; nothing downloads.
initializer_range is large so that attention and losses are far from uniform and a
masking bug changes the numbers visibly.
"""
from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig


def tiny_config(arch: str = "llama", *, vocab_size: int = 300, hidden: int = 32, layers: int = 2,
                heads: int = 2, kv_heads: int | None = None, max_positions: int = 256,
                init_range: float = 0.3):
    """LlamaConfig (RoPE, optional GQA via kv_heads) or GPT2Config of the given size."""
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
                           initializer_range=init_range, tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_positions=max_positions, initializer_range=init_range,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(f"unknown tiny arch {arch!r}; expected 'llama' or 'gpt2'")


def make_tiny_causal_lm(path: str | os.PathLike, *, vocab_size: int = 300, seed: int = 0,
                        arch: str = "llama", **config_kwargs) -> str:
    """Create a random tiny causal LM, save it (safetensors) under `path`, return the path."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=vocab_size, **config_kwargs))
    model.save_pretrained(str(path))
    return str(path)
