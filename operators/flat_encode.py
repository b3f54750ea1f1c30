"""Batch encoding into one buffer: a batch's ids back to back (int32) and each text's length.

tokenize.py packs from this form, so a core that returns buffers (fastokens' `encode_batch_flat`)
skips the Python int per token that list-returning cores cost (~20 ns a token, as much as the
fastest encoder's own time). fastokens 0.3.5 is a Rust reimplementation of HF `tokenizers`
(Apache-2.0); fast_bpe.py uses it only after `verify` proves its ids.
"""
from __future__ import annotations

import base64
import itertools
import os
import tempfile
from collections.abc import Callable

import numpy as np

FlatEncodeFn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]   # (int32 ids back to back, int64 lengths)


def flat_of(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ids back to back, int64 length of each list)."""
    lengths = np.fromiter(map(len, lists), np.int64, len(lists))
    return np.fromiter(itertools.chain.from_iterable(lists), np.int32, int(lengths.sum())), lengths


def lists_of(ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    ends = np.cumsum(lengths).tolist()
    return [ids[e - n:e].tolist() for e, n in zip(ends, lengths.tolist())]


def fastokens_flat(build: Callable, library: Callable[[list[str]], list[list[int]]]) -> FlatEncodeFn | None:
    """A batch encoder over `build(fastokens.Tokenizer)`; None when fastokens is not installed."""
    try:
        import fastokens
    except ImportError:
        return None
    tok = build(fastokens.Tokenizer)
    tok.no_padding()
    tok.no_truncation()

    def encode_flat(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        try:   # split_special_tokens: special tokens in document text stay text, as encode_ordinary does
            ids, offsets = tok.encode_batch_flat(texts, add_special_tokens=False, split_special_tokens=True)
        except Exception:   # a lone surrogate (not UTF-8) or a regex limit: the library encodes the batch
            return flat_of(library(texts))
        return np.frombuffer(ids, np.int32), np.diff(np.frombuffer(offsets, np.int64))
    return encode_flat


def fastokens_from_ranks(ranks: dict[bytes, int], pattern: str, presets: dict[str, str]) -> Callable:
    """Builds a fastokens Tokenizer from ranks + pattern through a temporary .tiktoken file. A pattern
    in `presets` (pattern -> encoding name) gets fastokens' hand-written pre-tokenizer (cl100k:
    60-200 MB/s against 32-42 through its generic regex engine); `verify` checks it like any core."""
    preset = presets.get(pattern)

    def build(tokenizer_class):
        with tempfile.NamedTemporaryFile("wb", suffix=".tiktoken", delete=False) as f:
            for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(token) + b" %d\n" % rank)
        try:
            if preset:
                return tokenizer_class.from_tiktoken(f.name, encoding=preset, special_tokens={})
            return tokenizer_class.from_tiktoken(f.name, pattern=pattern, special_tokens={})
        finally:
            os.remove(f.name)
    return build
