"""Stream a shard set (shard-format.md v1) as whole documents or as packed rows, with bounded memory.

Packing may split a document longer than `seq_len` into pieces (`doc_token_starts` > 0),
placed in any row and, in principle, any shard. Document-level exports need each document
whole, in a deterministic order, without holding the corpus:

1. When the manifest reports split documents, a first pass reads only the small columns
   (`doc_ids`, `doc_offsets`, `doc_token_starts`, `num_tokens`; Arrow IPC projection, the
   token columns are neither read nor decompressed) and records the full length of every
   split document: O(split documents) memory, a few bytes each.
2. The second pass reads one record batch at a time (256 rows by default; a thread reads and
   decompresses the next ones meanwhile, at most two ahead), without `position_ids` and
   `token_scores` (and without the masks for a format that keeps none). Pieces of unsplit
   documents are emitted straight from the batch as one flat array (no per-document Python
   work); pieces of split documents wait in a small buffer until their tokens add up to the
   document's length, and are then emitted, joined in `doc_token_starts` order. At the end the
   documents and tokens streamed must equal the manifest's counts (a split document whose
   continuations were all lost would otherwise pass for a whole one).

Order: manifest shard order, row order; a split document comes right after the whole
documents of the record batch that completes it. A pure function of the shards.

Masks are the shards' own: at a split point the continuation piece's first token has
target_mask = loss_mask = 0 (the packer could not predict it from its row), and the joined
document keeps that 0 rather than inventing a value the shards do not hold.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from pipeline import storage

_PIECE_COLUMNS = (S.DOC_IDS, S.DOC_OFFSETS, S.DOC_TOKEN_STARTS, S.NUM_TOKENS)
# What the document stream reads: position_ids and token_scores are neither read nor decompressed
# (nor the masks, for a format that keeps none).
_DOCUMENT_COLUMNS = (S.INPUT_IDS, S.DOMAIN_IDS) + _PIECE_COLUMNS
_MASK_COLUMNS = (S.TARGET_MASK, S.LOSS_MASK)
_PREFETCH = 2  # record batches read ahead by a background thread (Arrow decompresses without the GIL)


class ShardFormatError(ValueError):
    """The shards break the shard-format contract (names the shard file at fault)."""


@dataclasses.dataclass
class DocumentBatch:
    """Whole documents back to back: document i is `input_ids[starts[i]:starts[i] + lengths[i]]`.

    input_ids int32 [T], target_mask / loss_mask uint8 [T] (None when the stream was asked for no masks),
    lengths int64 [D], doc_ids string [D], domain_ids int32 [D] (-1 where null) or None when the shards have none.
    """
    input_ids: np.ndarray
    target_mask: np.ndarray | None
    loss_mask: np.ndarray | None
    lengths: np.ndarray
    doc_ids: pa.Array
    domain_ids: np.ndarray | None

    @property
    def num_docs(self) -> int:
        return len(self.lengths)

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    def take(self, doc_index: np.ndarray) -> "DocumentBatch":
        """The documents at `doc_index` (sorted), in that order."""
        keep_tok = np.repeat(np.isin(np.arange(self.num_docs), doc_index), self.lengths)
        masks = [None if m is None else m[keep_tok] for m in (self.target_mask, self.loss_mask)]
        return DocumentBatch(self.input_ids[keep_tok], *masks,
                             self.lengths[doc_index], self.doc_ids.take(pa.array(doc_index, pa.int64())),
                             None if self.domain_ids is None else self.domain_ids[doc_index])


class ShardSet:
    """One tokenizer's shard directory (local or URI): its manifest and its record batches."""

    def __init__(self, shard_dir: str):
        self.shard_dir = shard_dir
        path = storage.join(shard_dir, "manifest.json")
        if not storage.exists(path):
            raise FileNotFoundError(f"{path}: no shard manifest (the run's pack stage has not finished)")
        raw = storage.read_bytes(path)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.manifest = json.loads(raw)
        self.seq_len = int(self.manifest["seq_len"])
        self.files = [e["file"] for e in self.manifest["shards"]]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def has_split_docs(self) -> bool:
        split = self.manifest.get("packing", {}).get("split_docs")
        return split is None or split > 0  # unknown: assume some

    def record_batches(self, file: str, columns: tuple[str, ...] | None = None) -> Iterator[pa.RecordBatch]:
        """The record batches of one shard file, reading only `columns` (all when None)."""
        return _prefetched(self._read_batches(file, columns))

    def batches(self, columns: tuple[str, ...] | None = None) -> Iterator[tuple[str, pa.RecordBatch]]:
        """(file, record batch) over every shard in manifest order, read ahead across file boundaries."""
        return _prefetched((file, b) for file in self.files for b in self._read_batches(file, columns))

    def _read_batches(self, file: str, columns: tuple[str, ...] | None) -> Iterator[pa.RecordBatch]:
        with storage.open_random_access(storage.join(self.shard_dir, file)) as f:
            # Decompressed batches come from the system allocator, which returns their memory when they
            # are freed: Arrow's default pool (mimalloc) kept ~20 MB more at 4x the input than at 1x.
            reader = pa.ipc.open_file(f, memory_pool=pa.system_memory_pool())
            if columns is not None:
                names = reader.schema.names
                fields = sorted(names.index(c) for c in columns if c in names)
                reader = pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=fields),
                                          memory_pool=pa.system_memory_pool())
            for b in range(reader.num_record_batches):
                yield reader.get_batch(b)


def _prefetched(batches):
    """`batches`, read up to _PREFETCH ahead in a thread: reading and decompressing the next record batch
    overlaps the work on this one, and memory holds at most _PREFETCH + 1 batches."""
    done = object()
    q: queue.Queue = queue.Queue(maxsize=_PREFETCH)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer left

    def produce():
        try:
            for b in batches:
                if not put(b):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
        finally:
            batches.close()  # closes the shard file even when the consumer left early

    thread = threading.Thread(target=produce, daemon=True, name="shard-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def real_tokens(batch: pa.RecordBatch, column: str, num_tokens: np.ndarray) -> np.ndarray:
    """A fixed_size_list column's first num_tokens[r] values of every row r, back to back (padding is
    only at a row's end). Full rows: a view, no copy; else one memcpy per row, 1.4x faster than a mask."""
    values = fixed_2d(batch, column)
    if (num_tokens == values.shape[1]).all():
        return values.reshape(-1)
    return np.concatenate([values[r, :n] for r, n in enumerate(num_tokens.tolist())])


def fixed_2d(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """A fixed_size_list column as a [rows, seq_len] numpy array (a view of the Arrow buffer)."""
    arr = batch.column(column)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def piece_table(batch: pa.RecordBatch, file: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, pa.Array]:
    """Every piece of a record batch in row order: (row, offset in row, length, start in document, doc id)."""
    ntok = batch.column(S.NUM_TOKENS).to_numpy().astype(np.int64)
    offsets_col = batch.column(S.DOC_OFFSETS)
    row = pc.list_parent_indices(offsets_col).to_numpy().astype(np.int64)
    offset = pc.list_flatten(offsets_col).to_numpy().astype(np.int64)
    start = pc.list_flatten(batch.column(S.DOC_TOKEN_STARTS)).to_numpy().astype(np.int64)
    doc_ids = pc.list_flatten(batch.column(S.DOC_IDS))
    if not (len(offset) == len(start) == len(doc_ids)):
        raise ShardFormatError(f"{file}: doc_ids, doc_offsets and doc_token_starts differ in length")
    same_row_next = np.r_[row[1:] == row[:-1], False]
    end = np.where(same_row_next, np.r_[offset[1:], 0], ntok[row])
    length = end - offset
    first_in_row = np.r_[True, ~same_row_next[:-1]] if len(row) else np.zeros(0, bool)
    if (length <= 0).any() or (offset[first_in_row] != 0).any():
        raise ShardFormatError(f"{file}: the pieces of a row must start at 0 and follow each other "
                               f"without gaps up to num_tokens")
    # With the checks above the pieces of a row tile [0, num_tokens); a row without pieces must be empty.
    if (ntok[np.bincount(row, minlength=len(ntok)) == 0] != 0).any():
        raise ShardFormatError(f"{file}: a row with tokens but no doc_ids")
    return row, offset, length, start, doc_ids


def split_document_lengths(shards: ShardSet) -> dict[str, int]:
    """Full token count of every document the packer split into pieces (first pass, small columns only)."""
    lengths: dict[str, int] = {}
    if not shards.has_split_docs:
        return lengths
    for file, batch in shards.batches(_PIECE_COLUMNS):
        _, _, length, start, doc_ids = piece_table(batch, file)
        cont = np.flatnonzero(start > 0)
        for d, end in zip(doc_ids.take(pa.array(cont, pa.int64())).to_pylist(), (start + length)[cont].tolist()):
            if end > lengths.get(d, 0):
                lengths[d] = end
    return lengths


class _SplitBuffer:
    """Pieces of split documents until each document is complete."""

    def __init__(self, full_length: dict[str, int]):
        self.full_length = full_length
        self.pending: dict[str, list] = {}
        self.have: dict[str, int] = {}

    def add(self, doc_id: str, start: int, ids, tgt, loss, domain: int, file: str):
        """Returns the whole document (ids, tgt, loss, domain) once its last piece arrives, else None."""
        self.pending.setdefault(doc_id, []).append((start, ids.copy(), None if tgt is None else tgt.copy(),
                                                    None if loss is None else loss.copy(), domain))
        self.have[doc_id] = self.have.get(doc_id, 0) + len(ids)
        full = self.full_length[doc_id]
        if self.have[doc_id] < full:
            return None
        pieces = sorted(self.pending.pop(doc_id), key=lambda p: p[0])
        del self.have[doc_id]
        expect = 0
        for s, seg, *_ in pieces:
            if s != expect:
                raise ShardFormatError(f"{file}: document {doc_id!r} has a piece at token {s}, expected {expect} "
                                       f"(lost or repeated tokens)")
            expect += len(seg)
        return tuple(None if pieces[0][i] is None else np.concatenate([p[i] for p in pieces])
                     for i in (1, 2, 3)) + (pieces[0][4],)

    def check_empty(self) -> None:
        if self.pending:
            d = next(iter(self.pending))
            raise ShardFormatError(f"document {d!r} (and {len(self.pending) - 1} more) never completed: "
                                   f"{self.have[d]} of {self.full_length[d]} tokens found in the shards")


def iter_document_batches(shards: ShardSet, masks: bool = True) -> Iterator[DocumentBatch]:
    """Whole documents, one DocumentBatch per shard record batch (see the module docstring for the order);
    masks=False reads no mask column (the batches' masks are None)."""
    split = split_document_lengths(shards)
    split_ids = pa.array(list(split), pa.string())
    buffer = _SplitBuffer(split)
    num_docs = num_tokens = 0
    for file, batch in shards.batches(_DOCUMENT_COLUMNS + (_MASK_COLUMNS if masks else ())):
        for docs in _documents_of(batch, split_ids, buffer, file):
            num_docs += docs.num_docs
            num_tokens += len(docs.input_ids)
            yield docs
    buffer.check_empty()
    # A split document whose continuations are all gone looks like a whole one: the totals catch it.
    counts = shards.manifest["counts"]
    if (num_docs, num_tokens) != (counts["docs"], counts["tokens"]):
        raise ShardFormatError(f"{shards.shard_dir}: the shards hold {num_docs} documents / {num_tokens} tokens but "
                               f"the manifest counts {counts['docs']} / {counts['tokens']}")


def _documents_of(batch, split_ids, buffer, file) -> Iterator[DocumentBatch]:
    row, offset, length, start, doc_ids = piece_table(batch, file)
    if not len(row):
        return
    has_masks = S.LOSS_MASK in batch.schema.names
    columns = [fixed_2d(batch, c).reshape(-1) for c in (S.INPUT_IDS,) + (_MASK_COLUMNS if has_masks else ())]
    at = row * batch.column(S.INPUT_IDS).type.list_size + offset  # each piece's first token in the flat rows
    domains = None
    if S.DOMAIN_IDS in batch.schema.names:
        domains = pc.list_flatten(batch.column(S.DOMAIN_IDS)).fill_null(-1).to_numpy().astype(np.int32)
    is_split = start > 0
    if len(split_ids):
        is_split |= pc.is_in(doc_ids, value_set=split_ids).to_numpy(zero_copy_only=False)
    whole = np.flatnonzero(~is_split)
    absent = [None] * (3 - len(columns))  # the masks, when not read
    if len(whole):
        yield DocumentBatch(*[_gather(c, at[whole], length[whole]) for c in columns], *absent, length[whole],
                            doc_ids if len(whole) == len(row) else doc_ids.take(pa.array(whole, pa.int64())),
                            None if domains is None else domains[whole])
    done = []
    for p in np.flatnonzero(is_split).tolist():
        a, b = int(at[p]), int(at[p] + length[p])
        d = doc_ids[p].as_py()
        got = buffer.add(d, int(start[p]), *[c[a:b] for c in columns], *absent,
                         -1 if domains is None else int(domains[p]), file)
        if got is not None:
            done.append((d, got))
    if done:
        joined = [None if done[0][1][i] is None else np.concatenate([g[i] for _, g in done]) for i in (0, 1, 2)]
        yield DocumentBatch(*joined, np.array([len(g[0]) for _, g in done], np.int64),
                            pa.array([d for d, _ in done], pa.string()),
                            None if domains is None else np.array([g[3] for _, g in done], np.int32))


def _gather(flat: np.ndarray, at: np.ndarray, length: np.ndarray) -> np.ndarray:
    """flat[at[i]:at[i] + length[i]] for every piece i, back to back: pieces that follow each other
    in the rows (a row's pieces, full rows) are copied as one run, so a batch is one memcpy per
    padded row, or a view when nothing is skipped."""
    end = at + length
    new_run = np.r_[True, at[1:] != end[:-1]]
    firsts = at[new_run].tolist()
    lasts = end[np.r_[new_run[1:], True]].tolist()
    if len(firsts) == 1:
        return flat[firsts[0]:lasts[0]]
    return np.concatenate([flat[a:b] for a, b in zip(firsts, lasts)])


def iter_documents(shard_dir: str) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(doc_id, input_ids, target_mask, loss_mask) per whole document, in the stream order above."""
    for batch in iter_document_batches(ShardSet(shard_dir)):
        starts = batch.starts
        for i, d in enumerate(batch.doc_ids.to_pylist()):
            s = slice(int(starts[i]), int(starts[i] + batch.lengths[i]))
            yield d, batch.input_ids[s], batch.target_mask[s], batch.loss_mask[s]
