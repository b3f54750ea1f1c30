"""Decontamination: remove documents that share a word n-gram with an eval set.

    fit   (one task):  eval_docs = concat of the eval sources' read rows (id, source, text |
                       prompt + response); keep it as a small file in run_dir
    apply (per part):  index = EvalNgramIndex.build(eval_docs, config)     (once per worker)
                       found = index.find(document_texts(docs))
                       removals = decontam_removals(order_keys, docs[ID], found)

N-grams are `ngram` (default 13, as in the GPT-3 and Llama reports) consecutive words of
`text_norm.normalize_words` (lowercase, no punctuation, CJK characters as words). An eval
row of `min_ngram`..`ngram - 1` words is matched as a whole (its words, contiguous, in
order); a shorter row cannot be told from common phrasing and is skipped (counted in
`num_too_short`). A corpus document is contaminated when any of its n-grams is in the
index; the log names the eval row of its first such n-gram (by word position), the
n-gram, and `similarity` = the fraction of that eval row's n-grams found in the document
(1.0: the whole row is in it). Hash collisions: 64-bit n-gram hashes, so a false match
needs about 2^64 / (index size) corpus n-grams.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from operators import schema as S
from operators.dedup_config import DecontamConfig
from operators.text_norm import document_texts, hash_strings, ngram_hashes, normalize_words, split_words

MATCHES_SCHEMA = pa.schema([
    pa.field("row", pa.int64(), nullable=False),   # the corpus row (position in the input)
    pa.field(S.EVAL_SOURCE, pa.string(), nullable=False),
    pa.field(S.EVAL_ID, pa.string(), nullable=False),
    pa.field(S.NGRAM, pa.string(), nullable=False),
    pa.field(S.SIMILARITY, pa.float32(), nullable=False),
])
DECONTAM_REMOVALS_SCHEMA = pa.schema([
    pa.field(S.ORDER_KEY, pa.int64(), nullable=False),
    pa.field(S.ID, pa.string(), nullable=False),
    pa.field(S.EVAL_SOURCE, pa.string(), nullable=False),
    pa.field(S.EVAL_ID, pa.string(), nullable=False),
    pa.field(S.NGRAM, pa.string(), nullable=False),
    pa.field(S.SIMILARITY, pa.float32(), nullable=False),
    pa.field(S.METHOD, pa.string(), nullable=False),
])


@dataclasses.dataclass(frozen=True)
class EvalNgramIndex:
    """Hashed n-grams of eval rows. Entries sorted by hash: hashes uint64 [E], rows int64
    [E] (eval row), starts int64 [E] (first word, into `words`), widths int64 [E]."""
    hashes: np.ndarray
    rows: np.ndarray
    starts: np.ndarray
    widths: np.ndarray
    row_ngrams: np.ndarray      # int64 [R]: distinct n-grams per eval row (0: too short)
    eval_ids: pa.Array
    eval_sources: pa.Array
    words: pa.Array             # every eval row's normalised words, flat
    num_too_short: int

    @classmethod
    def build(cls, eval_docs: pa.Table, config: DecontamConfig) -> EvalNgramIndex:
        """From eval rows (`id`, `source`, and `text` or `prompt`/`response`)."""
        for col in (S.ID, S.SOURCE):
            if col not in eval_docs.column_names:
                raise KeyError(f"decontamination eval rows need a {col!r} column; they have {eval_docs.column_names}")
        words, offsets = split_words(normalize_words(document_texts(eval_docs)))
        word_h = hash_strings(words)
        counts = np.diff(offsets)
        # rows of >= ngram words: every window; shorter ones: one window of all their words
        hashes, h_off, starts = ngram_hashes(word_h, offsets, config.ngram, short_docs=True)
        rows = np.repeat(np.arange(len(counts)), np.diff(h_off))
        widths = np.minimum(counts[rows], config.ngram)
        usable = widths >= config.min_ngram
        hashes, rows, starts, widths = hashes[usable], rows[usable], starts[usable], widths[usable]
        order = np.lexsort((starts, rows, hashes))
        hashes, rows, starts, widths = hashes[order], rows[order], starts[order], widths[order]
        # [:len] keeps the leading True off an empty index (no eval row reaches min_ngram)
        distinct = np.r_[True, (hashes[1:] != hashes[:-1]) | (rows[1:] != rows[:-1])][:len(hashes)]
        row_ngrams = np.bincount(rows[distinct], minlength=len(counts)).astype(np.int64)
        return cls(hashes=hashes, rows=rows.astype(np.int64), starts=starts.astype(np.int64),
                   widths=widths.astype(np.int64), row_ngrams=row_ngrams,
                   eval_ids=eval_docs[S.ID].combine_chunks().cast(pa.string()),
                   eval_sources=eval_docs[S.SOURCE].combine_chunks().cast(pa.string()), words=words,
                   num_too_short=int(((counts > 0) & (counts < config.min_ngram)).sum()))

    @property
    def widths_used(self) -> list[int]:
        return sorted(set(self.widths.tolist()), reverse=True)

    def find(self, texts: pa.Array) -> pa.Table:
        """MATCHES_SCHEMA: one row per contaminated text (`row` = its position), sorted."""
        words, offsets = split_words(normalize_words(texts))
        word_h = hash_strings(words)
        n_docs = len(offsets) - 1
        best_start = np.full(n_docs, np.iinfo(np.int64).max)
        best_entry = np.full(n_docs, -1, np.int64)
        hit_doc, hit_entry = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for width in self.widths_used:
            h, h_off, first = ngram_hashes(word_h, offsets, width, short_docs=False)
            pos = np.searchsorted(self.hashes, h)
            hit = pos < len(self.hashes)
            hit[hit] = (self.hashes[pos[hit]] == h[hit]) & (self.widths[pos[hit]] == width)
            doc = np.repeat(np.arange(n_docs), np.diff(h_off))[hit]
            start, entry = first[hit], pos[hit]
            # first hit per document by word position (hits are in word order per document)
            lead = np.r_[True, doc[1:] != doc[:-1]] if len(doc) else np.zeros(0, bool)
            d, s, e = doc[lead], start[lead], entry[lead]
            better = s < best_start[d]
            best_start[d[better]], best_entry[d[better]] = s[better], e[better]
            hit_doc.append(doc)
            hit_entry.append(entry)
        found = np.flatnonzero(best_entry >= 0)
        entry = best_entry[found]
        eval_row = self.rows[entry]
        return pa.table({
            "row": found, S.EVAL_SOURCE: self.eval_sources.take(pa.array(eval_row)),
            S.EVAL_ID: self.eval_ids.take(pa.array(eval_row)),
            S.NGRAM: pa.array([self._ngram_text(int(e)) for e in entry], pa.string()),
            S.SIMILARITY: self._coverage(n_docs, found, eval_row, np.concatenate(hit_doc), np.concatenate(hit_entry)),
        }, schema=MATCHES_SCHEMA)

    def _ngram_text(self, entry: int) -> str:
        start, width = int(self.starts[entry]), int(self.widths[entry])
        return " ".join(self.words.slice(start, width).to_pylist())

    def _coverage(self, n_docs: int, found: np.ndarray, eval_row: np.ndarray, hit_doc: np.ndarray,
                  hit_entry: np.ndarray) -> np.ndarray:
        """float32 [len(found)]: the share of the reported eval row's distinct n-grams that
        each document contains."""
        target = np.full(n_docs, -1, np.int64)
        target[found] = eval_row
        same = self.rows[hit_entry] == target[hit_doc]
        pairs = np.unique(np.stack([hit_doc[same], self.hashes[hit_entry[same]].view(np.int64)], axis=1), axis=0)
        per_doc = np.bincount(pairs[:, 0], minlength=len(target))[found] if len(pairs) else np.zeros(len(found))
        return np.minimum(per_doc / np.maximum(self.row_ngrams[eval_row], 1), 1.0).astype(np.float32)


def decontam_removals(order_keys: np.ndarray, ids: pa.Array, matches: pa.Table) -> pa.Table:
    """DECONTAM_REMOVALS_SCHEMA rows for `matches` (from EvalNgramIndex.find), method
    "decontaminate", in corpus order."""
    rows = pa.array(matches["row"].to_numpy())
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return pa.table({
        S.ORDER_KEY: np.asarray(order_keys, np.int64)[matches["row"].to_numpy()],
        S.ID: ids.cast(pa.string()).take(rows),
        S.EVAL_SOURCE: matches[S.EVAL_SOURCE], S.EVAL_ID: matches[S.EVAL_ID], S.NGRAM: matches[S.NGRAM],
        S.SIMILARITY: matches[S.SIMILARITY],
        S.METHOD: pa.array(["decontaminate"] * matches.num_rows, pa.string()),
    }, schema=DECONTAM_REMOVALS_SCHEMA)
