"""Text normalisation, words and hashed n-grams: what dedup and decontamination compare.

Two normalisations, both columnar (pyarrow compute kernels, no per-row Python; rows that are
pure ASCII skip NFKC and use ASCII-only patterns, 3-4x faster and identical in result):

* `normalize_exact` (exact dedup): Unicode NFKC, lowercase, every whitespace run -> one
  space, trimmed. Punctuation and symbols stay: `a = b + c` and `a = b - c` are different
  programs, and GSM8K answers differ in `+` and `*`.
* `normalize_words` (near dedup, decontamination): NFKC, lowercase, every run of
  punctuation (`\\p{P}`) or symbols (`\\p{S}`) -> a space, each Han / Hiragana / Katakana
  character made a word of its own (Chinese and Japanese have no spaces; without this a
  Toutiao title is one "word" and never gets a 5-word shingle); words are then split on
  runs of Unicode whitespace. Digits are kept (DataTrove maps numbers to 0; a changed
  number is a changed problem).

Words are hashed with xxh64 once per distinct word of a batch (`dictionary_encode`
first: 8.5 MB of 20 Newsgroups is 1.47M words but 82k distinct ones, 0.06 s), and
n-grams are combined from word hashes with vectorised splitmix64 rounds, n numpy passes
over the batch's words. SFT rows are compared as `prompt + "\\n\\n" + response`.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from operators import schema as S

_CJK_CHAR = r"([\p{Han}\p{Hiragana}\p{Katakana}])"
# whitespace = ASCII \t \n \v \f \r space, U+0085 and Unicode separators (\p{Z}); rewrite runs
# of 2+ and every single one that is not " " (RE2's \s alone misses \v, U+0085 and \p{Z})
_SPACE_TO_FIX = r"[\s\v\x{85}\p{Z}]{2,}|[\t\n\v\f\r\x{85}\p{Zl}\p{Zp}]|[^ \P{Zs}]"


def document_texts(table: pa.Table) -> pa.Array:
    """The text each row is compared by (large_string, one per row, never null):
    `text`, or `prompt + "\\n\\n" + response` for SFT rows (a missing half counts as "")."""
    names = table.column_names
    if S.TEXT not in names and S.PROMPT not in names:
        raise KeyError(f"dedup needs a {S.TEXT!r} or {S.PROMPT!r} column; the table has {names}")
    sft = None
    if S.PROMPT in names:
        prompt = pc.fill_null(table[S.PROMPT].combine_chunks().cast(pa.large_string()), "")
        response = (pc.fill_null(table[S.RESPONSE].combine_chunks().cast(pa.large_string()), "")
                    if S.RESPONSE in names else pa.repeat(pa.scalar("", pa.large_string()), table.num_rows))
        sft = pc.binary_join_element_wise(prompt, response, pa.scalar("\n\n", pa.large_string()))
    if S.TEXT not in names:
        return sft
    text = table[S.TEXT].combine_chunks().cast(pa.large_string())
    return pc.fill_null(text if sft is None else pc.if_else(pc.is_null(text), sft, text), "")


def _large(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    return pc.fill_null(texts.cast(pa.large_string()), "")


def _ascii_or_unicode(texts: pa.Array, ascii_path, unicode_path) -> pa.Array:
    """`ascii_path(texts)`, with the rows holding any non-ASCII character replaced by
    `unicode_path` of those rows. Both give the same result on ASCII text; the ASCII one
    is 3-4x faster (RE2 with Unicode classes), and most English rows are pure ASCII."""
    texts = _large(texts)
    out = ascii_path(texts)
    mask = pc.match_substring_regex(texts, pattern=r"[^\x00-\x7f]")
    num_unicode = pc.sum(mask).as_py() or 0
    if num_unicode == 0:
        return out
    if num_unicode == len(texts):
        return unicode_path(texts)
    return pc.replace_with_mask(out, mask, unicode_path(texts.filter(mask)))


def normalize_exact(texts: pa.Array) -> pa.Array:
    """NFKC, lowercase, whitespace runs -> " ", trimmed (large_string, same length)."""
    def ascii_path(x):
        # only runs, and whitespace other than " ", are rewritten: a pattern that matches
        # every single space (\s+) is 10x slower (one replacement per word)
        return pc.replace_substring_regex(pc.ascii_lower(x), pattern=r"[\t\n\v\f\r ]{2,}|[\t\n\v\f\r]",
                                          replacement=" ")

    def unicode_path(x):
        x = pc.utf8_lower(pc.utf8_normalize(x, form="NFKC"))
        return pc.replace_substring_regex(x, pattern=_SPACE_TO_FIX, replacement=" ")

    return pc.utf8_trim_whitespace(_ascii_or_unicode(texts, ascii_path, unicode_path))


def normalize_words(texts: pa.Array) -> pa.Array:
    """NFKC, lowercase, runs of punctuation/symbols -> " ", CJK characters spaced apart
    (large_string, same length). Spacing is left irregular: `split_words` splits on runs."""
    def ascii_path(x):
        return pc.replace_substring_regex(pc.ascii_lower(x), pattern=r"[!-/:-@\[-`{-~]+", replacement=" ")

    def unicode_path(x):
        x = pc.utf8_lower(pc.utf8_normalize(x, form="NFKC"))
        x = pc.replace_substring_regex(x, pattern=_CJK_CHAR, replacement=r" \1 ")
        return pc.replace_substring_regex(x, pattern=r"[\p{P}\p{S}]+", replacement=" ")

    return _ascii_or_unicode(texts, ascii_path, unicode_path)


def split_words(normalized: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Words of `normalize_words` output (split on Unicode whitespace runs): the flat
    large_string array of all words [W] and int64 offsets [N+1] (document i owns words
    offsets[i]:offsets[i+1]; a blank text has 0 words)."""
    normalized = _large(normalized)
    lists = pc.utf8_split_whitespace(normalized)
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy()
    nonempty = pc.not_equal(flat, "")          # leading/trailing whitespace gives "" words
    words = flat.filter(nonempty)
    counts = np.bincount(parent[nonempty.to_numpy(zero_copy_only=False)], minlength=len(normalized))
    offsets = np.zeros(len(normalized) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return words, offsets


def hash_strings(words: pa.Array) -> np.ndarray:
    """xxh64 (seed 0) of each string's UTF-8 bytes, uint64 [len(words)]; hashed once per
    distinct string."""
    if len(words) == 0:
        return np.zeros(0, np.uint64)
    encoded = pc.dictionary_encode(words)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    uniques = encoded.dictionary.cast(pa.large_binary()).to_pylist()
    table = np.fromiter((xxhash.xxh64_intdigest(u) for u in uniques), np.uint64, len(uniques))
    return table[encoded.indices.to_numpy(zero_copy_only=False)]


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijection on uint64 with full avalanche), elementwise."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def ngram_hashes(word_hashes: np.ndarray, offsets: np.ndarray, n: int, *,
                 short_docs: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hashes of every window of `n` consecutive words inside one document.

    word_hashes: uint64 [W]; offsets: int64 [N+1] (from `split_words`).
    A document with 1..n-1 words gets one hash of all its words when `short_docs`
    (so two identical short documents still meet), none otherwise; 0 words: none.
    Returns (hashes uint64 [G], ngram_offsets int64 [N+1], first_word int64 [G]), grouped
    by document in order, windows in word order. Windows of different lengths never
    collide: the length is mixed in.
    """
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    counts = np.diff(offsets)
    windows = np.maximum(counts - n + 1, 0)
    if short_docs:
        windows = np.where((counts > 0) & (counts < n), 1, windows)
    ngram_offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(windows, out=ngram_offsets[1:])
    total = int(ngram_offsets[-1])
    doc = np.repeat(np.arange(len(counts)), windows)
    first = offsets[:-1][doc] + (np.arange(total) - ngram_offsets[:-1][doc])
    width = np.minimum(counts[doc], n)
    h = np.zeros(total, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            live = k < width
            idx = np.where(live, first + k, 0)
            h = np.where(live, splitmix64(h * np.uint64(0x9E3779B185EBCA87) ^ word_hashes[idx]), h)
        h = splitmix64(h ^ width.astype(np.uint64))
    return h, ngram_offsets, first
