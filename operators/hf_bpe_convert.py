"""HF tokenizer.json -> the parts of a tiktoken-style BPE core that gives the same ids.

A file converts only when its pipeline has a shape the core reproduces; `hf_core_spec`
raises NotConvertible naming what does not fit:
* model BPE, no dropout, no subword prefix/suffix, all 256 byte symbols in the vocab (so
  unk/byte_fallback/fuse_unk never act), token ids in merge order;
* pre-tokenizer ByteLevel(add_prefix_space=false, use_regex=true) (the GPT-2 regex) or
  Sequence[Split(Regex, Isolated), ByteLevel(add_prefix_space=false, use_regex=false)]
  (Llama-3, Qwen2); the decoder and post-processor do not touch document ids;
* normalizer none or NFC (Qwen2; applied with `unicodedata`, verified by the probes);
* added tokens: tokenmill encodes text with `encode_special_tokens=True`, so special ones
  are text, but tokenizers (0.23.3, tested) still splits out the NON-special ones.
  `AddedSplitter` reproduces its AddedVocabulary: leftmost-longest matching in two passes
  (normalized=false tokens on the raw text, then normalized=true ones on the normalized
  parts); a special match is kept as text but still hides tokens overlapping it.
  lstrip/rstrip/single_word on a non-special token are refused.

Ranks: HF merges the adjacent pair of lowest merge index; tiktoken the adjacent pair whose
concatenated bytes have the lowest rank. A token's rank is therefore the index of its first
merge; with ids in merge order the ids are order-equivalent ranks and no remap is needed
(GPT-2, Llama-3, Qwen2 and `tokenizers`-trained files). Vocab tokens no merge produces are
left out (BPE cannot reach them; `ignore_merges` whole-word hits are caught by the vocab
probe in fast_bpe.verify).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata

GPT2_BYTELEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class NotConvertible(ValueError):
    """The tokenizer.json's pipeline is not one a tiktoken-style core reproduces."""


@functools.lru_cache(maxsize=1)
def byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable char standing for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


# --- HF tokenizer.json -> core spec --------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BpeCoreSpec:
    pattern: str
    ranks: dict[bytes, int]            # token bytes -> token id (order-equivalent to merge order)
    added: tuple[tuple[str, int, bool, bool], ...] = ()   # (content, id, normalized, special) of all added tokens
    nfc: bool = False


def hf_core_spec(tj: dict) -> BpeCoreSpec:
    """The core that reproduces a tokenizer.json (parsed), or NotConvertible with the reason."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise NotConvertible(f"model is {model.get('type')}, not BPE")
    if model.get("dropout") not in (None, 0, 0.0):
        raise NotConvertible(f"BPE dropout {model['dropout']} samples merges")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise NotConvertible(f"BPE {key}={model[key]!r}")
    pattern = _pattern_of(tj.get("pre_tokenizer"))
    nfc = _nfc_of(tj.get("normalizer"))
    added = []
    for t in tj.get("added_tokens") or []:
        if not t.get("special") and (t.get("lstrip") or t.get("rstrip") or t.get("single_word")):
            raise NotConvertible(f"non-special added token {t['content']!r} has lstrip/rstrip/single_word")
        added.append((t["content"], int(t["id"]), bool(t.get("normalized", not t.get("special"))), bool(t.get("special"))))
    return BpeCoreSpec(pattern=pattern, ranks=_ranks_of(model), added=tuple(added), nfc=nfc)


def _pattern_of(pre: dict | None) -> str:
    def byte_level(p: dict) -> bool:
        if p.get("type") != "ByteLevel":
            return False
        if p.get("add_prefix_space"):
            raise NotConvertible("ByteLevel add_prefix_space=true")
        return True
    if pre is None:
        raise NotConvertible("no pre-tokenizer (not byte-level)")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and byte_level(steps[0]):
        if steps[0].get("use_regex", True):
            return GPT2_BYTELEVEL_PATTERN
        raise NotConvertible("ByteLevel without a regex makes each document one BPE word")
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1]):
        split, bl = steps
        if bl.get("use_regex", True):
            raise NotConvertible("Split followed by ByteLevel(use_regex=true) splits twice")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise NotConvertible(f"Split behavior {split.get('behavior')} invert={split.get('invert')}")
        if "Regex" not in (split.get("pattern") or {}):
            raise NotConvertible("Split on a literal string")
        return split["pattern"]["Regex"]
    raise NotConvertible(f"pre-tokenizer {[s.get('type') for s in steps]} is not ByteLevel or Split+ByteLevel")


def _nfc_of(norm: dict | None) -> bool:
    if norm is None or (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        return False
    if norm.get("type") == "NFC":
        return True
    raise NotConvertible(f"normalizer {norm.get('type')} changes the text")


def _ranks_of(model: dict) -> dict[bytes, int]:
    table = byte_level_chars()
    vocab: dict[str, int] = model["vocab"]
    missing = [c for c in table if c not in vocab]
    if missing:
        raise NotConvertible(f"{len(missing)} of the 256 byte symbols are not in the vocab (e.g. {missing[0]!r})")
    ranks = {bytes([table[c]]): vocab[c] for c in table}
    last_id = -1
    for i, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        token = a + b
        if token not in vocab:
            raise NotConvertible(f"merge {i} ({a!r}, {b!r}) makes a token that is not in the vocab")
        try:
            key = bytes(table[c] for c in token)
        except KeyError:
            continue                      # not byte-level symbols: never reached from text
        if key in ranks:
            continue                      # a later merge to the same token (Llama-3 lists every split)
        if vocab[token] <= last_id:
            raise NotConvertible(f"token ids are not in merge order (merge {i}, token {token!r})")
        last_id = vocab[token]
        ranks[key] = vocab[token]
    return ranks


class AddedSplitter:
    """HF's added-vocabulary split with special tokens encoded as text.

    Two leftmost-longest passes, like tokenizers' AddedVocabulary: tokens with
    normalized=false on the raw text, then (after the normalizer) normalized=true ones
    on each remaining part. Special matches are skipped but still consume their span.
    """

    def __init__(self, added, nfc: bool):
        self.nfc = nfc
        self.passes = []
        for normalized in (False, True):
            group = [(c if not (normalized and nfc) else unicodedata.normalize("NFC", c), i, s)
                     for c, i, n, s in added if n == normalized and c]
            if any(not s for _, _, s in group):   # only specials: every match skipped, no effect
                group.sort(key=lambda g: -len(g[0]))
                regex = re.compile("|".join(re.escape(c) for c, _, _ in group))
                self.passes.append((regex, {c: (None if s else i) for c, i, s in group}))
            else:
                self.passes.append(None)
        self.active = any(self.passes) or nfc

    def parts(self, text: str) -> list[str | int]:
        """Text parts to BPE-encode (normalized) and added-token ids, in order."""
        out = self._split(text, self.passes[0])
        result: list[str | int] = []
        for p in out:
            if isinstance(p, int):
                result.append(p)
            else:
                if self.nfc:
                    p = unicodedata.normalize("NFC", p)
                result.extend(self._split(p, self.passes[1]))
        return result

    @staticmethod
    def _split(text: str, spec) -> list[str | int]:
        if spec is None:
            return [text] if text else []
        regex, ids = spec
        out: list[str | int] = []
        start = 0
        for m in regex.finditer(text):
            token_id = ids[m.group()]
            if token_id is None:      # special: stays text
                continue
            if m.start() > start:
                out.append(text[start:m.start()])
            out.append(token_id)
            start = m.end()
        if start < len(text):
            out.append(text[start:])
        return out
