"""Byte-identical fast BPE encoding: tiktoken encodings and convertible HF tokenizer.json
files run through a Rust core, verified against the library encoder at load.

Measured here, one thread, the 40.5 MB of plain shared text, second pass (benchmarks/
bench_peers.py prints them next to the peers): cl100k 213 MB/s (fastokens) vs 7.8 (tiktoken);
a GPT-2-shaped 50k tokenizer.json 222 MB/s vs 1.8 (HF tokenizers). riptoken, before
fastokens: 17.8 and 22.2. Building and verifying fastokens takes 0.9-1.9 s per process
(riptoken 0.2-0.9 s); tokenizers.py keeps the choice per tokenizer file in a process.

Cores, fastest first:
* fastokens 0.3.5 (operators/flat_encode.py): built from the tiktoken ranks + pattern, or from
  the HF tokenizer.json itself; one call per batch returns every id in one buffer. Its word
  cache is bounded (RSS levels off ~80 MB above load after 800k distinct words). Young, hence
  only behind `verify` and with the cores below as the fallback; a batch it cannot encode (a
  lone surrogate) goes to the library.
* riptoken 0.2.4 (`CoreBPE`, tiktoken's algorithm in Rust). It is NOT byte-identical on regex pieces of >= 500 bytes: its heap path pops
  equal-rank pairs rightmost-first where tiktoken and HF merge leftmost-first (ASCII art in
  20 Newsgroups hits it: 3 documents of the shared data). `_LongPieceGuard` sends every
  text that may hold such a piece to the exact core; the guard is proven conservative only
  for the piece shapes of `_GUARDED_PATTERNS`, so other patterns never use riptoken.
* tiktoken's core (`tiktoken.Encoding` built from ranks + pattern): exact.

`fast_tiktoken` / `fast_hf` try them in that order and keep the first whose ids equal the
library's on the probes (`verify`): PROBE_TEXTS, every added token in context and, for HF,
every vocab token's text. Otherwise the library encodes, with the reason recorded.
Lone surrogates (possible in a Python str, never in Arrow text): tiktoken replaces them,
so such texts go to tiktoken; HF raises, so they go to HF, which raises the same error.
Cores are called one text at a time: `encode_ordinary_batch` on one thread was no faster
(riptoken: 20.4 vs 21.1 MB/s) and riptoken's batch spawns a rayon pool of all cores.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import re
import unicodedata
from collections.abc import Callable

import numpy as np

from operators.fast_bpe_probes import PROBE_TEXTS
from operators.flat_encode import FlatEncodeFn, fastokens_flat, fastokens_from_ranks, lists_of
from operators.hf_bpe_convert import GPT2_BYTELEVEL_PATTERN, AddedSplitter, NotConvertible, hf_core_spec

EncodeFn = Callable[[list[str]], list[list[int]]]

_CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""])
# Every piece of these patterns is [<= 1 char] + one run of letters/marks, digits,
# other (+ newlines) or whitespace + [<= 3 chars]: what _LongPieceGuard relies on.
_GUARDED_PATTERNS = frozenset({GPT2_BYTELEVEL_PATTERN, _CL100K_PATTERN, _R50K_PATTERN, _LLAMA3_PATTERN,
                               _QWEN2_PATTERN, _O200K_PATTERN})
_FASTOKENS_PRESETS = {_CL100K_PATTERN: "cl100k_base", _O200K_PATTERN: "o200k_base"}


@dataclasses.dataclass(frozen=True)
class FastEncoding:
    """What encodes document text for a tokenizer, and why not the fast core if not."""
    encoder: str                      # riptoken | tiktoken | bpe-core:riptoken | bpe-core:tiktoken | hf-tokenizers
    encode_texts: EncodeFn | None     # None: the library encoder
    fallback_reason: str | None = None
    encode_flat: FlatEncodeFn | None = None  # the same ids in one buffer, when the core gives buffers


# --- cores ------------------------------------------------------------------------------

class _LongPieceGuard:
    """Which texts may hold a regex piece of >= 500 UTF-8 bytes (riptoken's inexact path).

    Conservative for _GUARDED_PATTERNS: a 500-byte piece has >= 167 UTF-16 units (<= 3
    bytes each), so a run of >= 162 units of one class (letters+marks, digits,
    other+newlines, whitespace; marks, unassigned code points and surrogate halves count
    as every class) exists, hence 4 consecutive aligned 32-unit blocks of that class.
    Vectorised over the batch: ~150 MB/s, flags ~0.3% of the shared data's bytes.
    """
    BLOCK, MIN_BLOCKS = 32, 4

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def _classes() -> np.ndarray:
        letter, digit, other, space, every = 1, 2, 4, 8, 15
        white = set(map(ord, "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000")) | set(range(0x2000, 0x200B))
        t = np.full(0x10000, every, np.uint8)
        for c in range(0x10000):
            if 0xD800 <= c <= 0xDFFF:
                continue
            cat = unicodedata.category(chr(c))
            if c in white:
                t[c] = space | (other if c in (10, 13) else 0)
            elif cat[0] == "L":
                t[c] = letter
            elif cat[0] == "N":
                t[c] = digit
            elif cat[0] != "M" and cat != "Cn":
                t[c] = other
        t[0] = 0   # the batch separator; texts holding NUL are flagged whole
        return t

    def flagged(self, texts: list[str]) -> np.ndarray:
        """Indices of texts that must go to the exact core."""
        if not texts:
            return np.zeros(0, np.int64)
        joined = "\x00".join(texts)
        if joined.count("\x00") != len(texts) - 1:      # NUL inside a text: that text goes exact
            with_nul = [i for i, t in enumerate(texts) if "\x00" in t]
            clean = self.flagged([t if "\x00" not in t else "" for t in texts])
            return np.union1d(clean, np.array(with_nul, np.int64))
        units = np.frombuffer(joined.encode("utf-16-le", "surrogatepass"), np.uint16)
        seps = np.flatnonzero(units == 0)
        f = self._classes()[units]
        f = np.concatenate([f, np.zeros((-len(f)) % self.BLOCK, np.uint8)])
        w = f.view(np.uint64).reshape(-1, self.BLOCK // 8)
        a = w[:, 0] & w[:, 1] & w[:, 2] & w[:, 3]
        for shift in (32, 16, 8):
            a &= a >> np.uint64(shift)
        blocks = (a & np.uint64(0xFF)).astype(np.uint8)
        n = len(blocks) - self.MIN_BLOCKS + 1
        if n <= 0:
            return np.zeros(0, np.int64)
        run = blocks[:n].copy()
        for k in range(1, self.MIN_BLOCKS):
            run &= blocks[k:n + k]
        return np.unique(np.searchsorted(seps, np.flatnonzero(run) * self.BLOCK))


def _tiktoken_core(ranks: dict[bytes, int], pattern: str) -> Callable[[str], list[int]]:
    import tiktoken
    enc = tiktoken.Encoding("bpe-core", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return enc._core_bpe.encode_ordinary   # the Rust call: raises on lone surrogates, as riptoken does


def _riptoken_core(ranks: dict[bytes, int], pattern: str) -> Callable[[str], list[int]] | None:
    try:
        import riptoken
    except ImportError:
        return None
    return riptoken.CoreBPE(ranks, {}, pattern).encode_ordinary


def _verified_fastokens(build: Callable, library: EncodeFn, probes: list[str], reasons: list[str],
                        trusted: bool = False) -> FastEncoding | None:
    """fastokens when it gives the library's ids on `probes`; `trusted`: this build of this file
    was verified so by the run's driver (`core_key`), and the probes are not encoded again."""
    try:
        flat = fastokens_flat(build, library)
    except Exception as e:
        reasons.append(f"fastokens: cannot build the core: {type(e).__name__}: {e}")
        return None
    if flat is None:
        return None
    encode = lambda texts: lists_of(*flat(texts))   # noqa: E731
    why = None if trusted else verify(encode, library, probes)
    if why is not None:
        reasons.append(f"fastokens: {why}")
        return None
    return FastEncoding("fastokens", encode, encode_flat=flat)


@functools.cache
def _build_digest() -> str:
    """What decides a fastokens verification besides the tokenizer itself: the builds of
    fastokens and of the libraries it is checked against, the machine, and the probe texts."""
    from importlib import metadata
    parts = [platform.machine()]
    for dist in ("fastokens", "tokenizers", "tiktoken"):
        try:
            parts.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist}=-")
    parts += PROBE_TEXTS
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def core_key(tokenizer_sha256: str) -> str:
    """Names one fastokens verification: the same tokenizer under the same builds gives the same
    verdict, so a worker handed this key by the driver that verified it skips the probes (0.5-1 s
    per process for a 50k vocabulary: every vocab token is a probe)."""
    return f"fastokens:{tokenizer_sha256}:{_build_digest()}"


def _core_encoder(one: Callable, exact: Callable | None, on_surrogate: EncodeFn) -> EncodeFn:
    """Batch encode with `one`; guarded texts re-encoded with `exact`."""
    guard = _LongPieceGuard() if exact is not None else None

    def encode(texts: list[str]) -> list[list[int]]:
        try:
            out = [one(t) for t in texts]
        except UnicodeEncodeError:       # a lone surrogate: the library's own behaviour
            return on_surrogate(texts)
        if guard is not None:
            for i in guard.flagged(texts).tolist():
                out[i] = exact(texts[i])
        return out
    return encode


def _with_added(encode: EncodeFn, splitter: AddedSplitter) -> EncodeFn:
    if not splitter.active:
        return encode

    def encode_split(texts: list[str]) -> list[list[int]]:
        parts = [splitter.parts(t) for t in texts]
        pieces = [p for ps in parts for p in ps if isinstance(p, str)]
        it = iter(encode(pieces))
        out = []
        for ps in parts:
            ids: list[int] = []
            for p in ps:
                if isinstance(p, int):
                    ids.append(p)
                else:
                    ids.extend(next(it))
            out.append(ids)
        return out
    return encode_split


def candidate_encoders(ranks: dict[bytes, int], pattern: str, on_surrogate: EncodeFn,
                       exact: Callable[[str], list[int]] | None = None):
    """(core name, batch encoder or the error building it), in the order to try them:
    riptoken (guarded by the exact core) when the pattern is guarded, then tiktoken's core."""
    try:
        exact = exact or _tiktoken_core(ranks, pattern)
    except Exception as e:   # e.g. a Split regex fancy-regex cannot compile
        yield "tiktoken", ValueError(f"cannot build the core: {type(e).__name__}: {e}")
        return
    if pattern in _GUARDED_PATTERNS:
        try:
            rip = _riptoken_core(ranks, pattern)
        except Exception as e:
            rip = ValueError(f"cannot build the core: {type(e).__name__}: {e}")
        if rip is not None:
            yield "riptoken", rip if isinstance(rip, Exception) else _core_encoder(rip, exact, on_surrogate)
    yield "tiktoken", _core_encoder(exact, None, on_surrogate)


# --- verification and the two entry points ---------------------------------------------

def _outcome(encode: EncodeFn, text: str):
    try:
        return encode([text])[0]
    except Exception as e:
        return f"raises {type(e).__name__}"


def verify(fast: EncodeFn, library: EncodeFn, texts: list[str]) -> str | None:
    """None when both encoders give the same ids for every text, else the first difference.

    Texts with lone surrogates are compared one by one, errors included (HF raises).
    """
    plain = [t for t in texts if not _SURROGATE.search(t)]
    try:
        got = fast(plain)
    except Exception as e:  # a core that cannot run on a probe is a failed verification
        return f"fast encoder raised {type(e).__name__}: {e}"
    pairs = list(zip(plain, got, library(plain)))
    pairs += [(t, _outcome(fast, t), _outcome(library, t)) for t in texts if _SURROGATE.search(t)]
    for text, a, b in pairs:
        if a != b:
            if isinstance(a, str) or isinstance(b, str):
                show = [x if isinstance(x, str) else "ids" for x in (a, b)]
                return f"on {text[:40]!r}: fast gives {show[0]}, library {show[1]}"
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"ids differ on {text[:40]!r}... at token {i}: {a[i:i + 3]} vs library {b[i:i + 3]}"
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def fast_tiktoken(enc, mode: str = "auto", trusted: bool = False) -> FastEncoding:
    """The fastest verified encoder for a tiktoken Encoding's `encode_ordinary`; `trusted`: its
    fastokens core was verified by the run's driver (`core_key`)."""
    if mode == "library":
        return FastEncoding("tiktoken", None)
    library = lambda texts: [enc.encode_ordinary(t) for t in texts]   # noqa: E731
    reasons: list[str] = []
    if fast := _verified_fastokens(fastokens_from_ranks(enc._mergeable_ranks, enc._pat_str, _FASTOKENS_PRESETS), library, PROBE_TEXTS, reasons, trusted):
        return fast
    for name, encode in candidate_encoders(enc._mergeable_ranks, enc._pat_str, library, exact=enc.encode_ordinary):
        if name == "tiktoken":
            break                       # tiktoken's own core is the library
        why = str(encode) if isinstance(encode, Exception) else verify(encode, library, PROBE_TEXTS)
        if why is None:
            return FastEncoding(name, encode)
        reasons.append(f"{name}: {why}")
    return FastEncoding("tiktoken", None, "; ".join(reasons) or None)


def fast_hf(text: str, library: EncodeFn, mode: str = "auto", trusted: bool = False) -> FastEncoding:
    """A verified core for an HF tokenizer.json (its text), or the library encoder and why;
    `trusted`: its fastokens core was verified by the run's driver (`core_key`)."""
    if mode == "library":
        return FastEncoding("hf-tokenizers", None)
    # fastokens reads the tokenizer.json itself (added tokens and normalizer included)
    build = lambda cls: cls.from_json_str(text)   # noqa: E731
    # trusted, but the core fails to build here: the full path below builds it again and says why
    if trusted and (fast := _verified_fastokens(build, library, [], [], trusted=True)):
        return fast
    try:
        spec = hf_core_spec(json.loads(text))
    except NotConvertible as e:
        return FastEncoding("hf-tokenizers", None, f"not convertible: {e}")
    splitter = AddedSplitter(spec.added, spec.nfc)
    probes = PROBE_TEXTS + _added_probes(spec.added) + _vocab_probes(spec.ranks)
    reasons: list[str] = []
    if fast := _verified_fastokens(build, library, probes, reasons):
        return fast
    for name, encode in candidate_encoders(spec.ranks, spec.pattern, library):
        if isinstance(encode, Exception):
            reasons.append(f"bpe-core:{name}: {encode}")
            continue
        encode = _with_added(encode, splitter)
        why = verify(encode, library, probes)
        if why is None:
            return FastEncoding(f"bpe-core:{name}", encode)
        reasons.append(f"bpe-core:{name}: {why}")
    return FastEncoding("hf-tokenizers", None, "; ".join(reasons))


def _added_probes(added) -> list[str]:
    contents = [c for c, *_ in added if c][:2000]
    return [f"a{c}b {c} {c}{c}\n{c[:len(c) // 2]}" for c in contents] + ["".join(contents[:200])]


def _vocab_probes(ranks: dict[bytes, int]) -> list[str]:
    """Each vocab token's text on its own: proves merges rebuild it (or not) as HF's do."""
    out = []
    for token in ranks:
        if len(token) > 1:
            try:
                out.append(token.decode("utf-8"))
            except UnicodeDecodeError:
                pass
    return out
