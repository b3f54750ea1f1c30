"""A PyTorch dataset over a shard set: one deterministic order, exact resume under DataLoader
workers and ranks, and the varlen-attention boundaries of every row.

    ds = ShardDataset("runs/r1/shards/cl100k", seed=0, epoch=epoch, batch_size=8,
                      rank=rank, world_size=world_size, start_index=samples_done)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)  # the dataset batches
    for step, batch in enumerate(loader):           # batch: a ShardBatch (reads like a dict)
        ids, (B, L) = batch["input_ids"], batch["input_ids"].shape
        seg = torch.searchsorted(batch["cu_seqlens"], torch.arange(B * L, dtype=torch.int32), right=True)
        seg = seg.view(B, L)                            # segment of each token -> block-diagonal causal mask
        mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
        logits = model(ids, position_ids=batch["position_ids"], attn_mask=mask[:, None])  # SDPA's attn_mask
        w = batch["loss_mask"][:, 1:].float()
        loss = (F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none") * w).sum() / w.sum()
        loss.backward(); opt.step(); opt.zero_grad()
        samples_done = ds.start_index + (step + 1) * 8 * world_size   # checkpoint this (or ds.state_dict(...))

On a GPU, flash-attention takes the same batch without a mask:
`flash_attn_varlen_func(q.view(B * L, H, D), k..., v..., batch["cu_seqlens"], batch["cu_seqlens"],
batch["max_seqlen"], batch["max_seqlen"], causal=True)`.

Order. A pure function of (seed, epoch): record batches (`output.rows_per_batch` rows) are
permuted, then rows are permuted inside windows of `window_batches` consecutive record batches
of that order. Memory holds one window; only the columns a sample needs are read, and a zstd
record batch is decompressed once per window, not once per row. Windows in which a reader owns
no sample (all of them before `start_index`) are skipped without being read. Cost: a reader
(one worker of one rank) owns samples in nearly every window, so each of the n*R readers
decompresses nearly the whole shard set: one reader gives about 8-13k rows of 2,048 tokens/s
(one core, zstd, ~60% of it decompressing and copying windows; measured on a loaded 2-core
machine), far above what one rank's trainer consumes.

Why the dataset batches. With an IterableDataset, a DataLoader takes whole batches from its
workers in turn (worker 0's first batch, worker 1's first, ...), so the sequence a trainer sees
depends on how batches are cut. Here the dataset cuts them (`batch_size=`) and the DataLoader
passes them through (`batch_size=None`): the remaining order, `order[start_index:]`, is dealt to
ranks sample by sample (rank r of R gets positions start_index + r, + r + R, ...), each rank's
stream is cut into batches of `batch_size` (the last one may be short: nothing is dropped), and
worker w of n yields that rank's batches w, w + n, w + 2n, ... The DataLoader's round-robin,
which starts at worker 0 on every new iterator, then reproduces the rank's stream exactly, for
any `num_workers`, `prefetch_factor` and `start_index` (which need not be a multiple of anything). In lockstep, the
ranks' k-th batches together are `order[start + k*B*R : start + (k+1)*B*R]`, so after k steps
the union of what all ranks consumed is `order[:start + k*B*R]`, with no overlap, and
`start_index=start + k*B*R` continues with exactly the samples not yet seen. Ranks may differ by
one batch (or one short batch) at the end of an epoch. Requires the DataLoader's default
`in_order=True`; with `persistent_workers=True` the workers keep the dataset as it was when
they started, so build a new DataLoader to resume.

Mismatches it catches: a DataLoader given `batch_size=k` would take k batches from one worker
and break the order, so a batch is a `ShardBatch`, which `default_collate` refuses (TypeError
naming ShardBatch) and `collate_varlen` refuses too; `batch_size=None` on the dataset (single
samples, for direct iteration) under more than one DataLoader worker raises.

Varlen outputs. Each sample has `seq_lengths` (int32, the lengths of the row's document pieces
from `doc_offsets`/`num_tokens`, padding excluded) and `cu_seqlens` (int32, [0, ..., num_tokens]).
`collate_varlen` stacks samples into a batch whose `cu_seqlens` runs over the flattened batch
(token t of row i is i*L + t, as flash_attn_varlen_func takes it): every piece of every row, and
each row's padding as one more segment, so `cu_seqlens[-1] == B*L`. On real tokens these
segments are exactly the ones `position_ids` gives (a new one at each 0); on padding,
`position_ids` (all 0) would make every token its own segment.

Selection. When the shards carry `ref_loss` (select.method sstoken or rho1), samples and
batches carry it too, float32 [L] / [B, L], for `operators.selective_loss` (the online method).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import torch

from operators import schema as S
from pipeline import sink, storage

_TENSOR_COLUMNS = (S.INPUT_IDS, S.TARGET_MASK, S.LOSS_MASK, S.POSITION_IDS)
_READ_COLUMNS = _TENSOR_COLUMNS + (S.DOC_OFFSETS, S.NUM_TOKENS)
# Read when the shards have them (a selection run): float32 [L], NaN where not a target.
_FLOAT_COLUMNS = (S.REF_LOSS,)


class ShardBatch:
    """One batch: `index` [B] int64 (positions in the epoch's order), `input_ids`, `target_mask`,
    `loss_mask`, `position_ids` [B, L] int64, `seq_lengths` (B int32 tensors, one per row),
    `cu_seqlens` [segments + 1] int32 over the flattened batch, `max_seqlen` int.

    Reads like a dict (`batch["input_ids"]`, `keys()`, `dict(batch)`), moves with `.to(device)`
    and `pin_memory=True`, but is not a Mapping on purpose: `default_collate` then refuses it, so
    a DataLoader given `batch_size=k` (which would break the order) fails instead of nesting."""

    def __init__(self, fields: dict):
        self._fields = fields

    def __getitem__(self, key: str):
        return self._fields[key]

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def keys(self):
        return self._fields.keys()

    def items(self):
        return self._fields.items()

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v if isinstance(v, int) else f"[{len(v)}]"
                  for k, v in self._fields.items()}
        return f"ShardBatch({shapes})"

    def _map(self, fn) -> "ShardBatch":
        def one(v):
            return fn(v) if isinstance(v, torch.Tensor) else [fn(t) for t in v] if isinstance(v, list) else v
        return ShardBatch({k: one(v) for k, v in self._fields.items()})

    def to(self, device, non_blocking: bool = False) -> "ShardBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ShardBatch":
        return self._map(torch.Tensor.pin_memory)


def collate_varlen(samples: list[dict]) -> ShardBatch:
    """Stack samples (dicts as ShardDataset(batch_size=None) yields them) into a ShardBatch.

    Fixed-size tensors are stacked to [B, L] int64; `seq_lengths` stays a list of B tensors;
    `cu_seqlens` (int32) covers the flattened batch: each row's pieces, then its padding
    (L - num_tokens, when not 0) as one segment, so it ends at B*L; `max_seqlen` is the longest
    segment (an int, as flash_attn_varlen_func takes it)."""
    if not samples or isinstance(samples[0], ShardBatch):
        raise TypeError("collate_varlen takes a non-empty list of single samples; a ShardDataset with "
                        "batch_size=B already yields batches: give the DataLoader batch_size=None")
    return _batch([{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in samples])


def _single(sample: dict) -> dict:
    """A numpy sample as ShardDataset(batch_size=None) yields it: int64 fixed-size tensors [L],
    int32 `seq_lengths` [pieces] and `cu_seqlens` [pieces + 1]."""
    return {k: torch.from_numpy(v.astype(np.int64) if k in _TENSOR_COLUMNS else
                                v.astype(np.float32) if k in _FLOAT_COLUMNS else v) if isinstance(v, np.ndarray) else v
            for k, v in sample.items()}


def _batch(samples: list[dict]) -> ShardBatch:
    """collate_varlen on numpy samples: one stack and one tensor per field, not one per row."""
    seq_len = samples[0][S.INPUT_IDS].shape[0]
    segments = []
    for s in samples:
        segments.append(s["seq_lengths"])
        pad = seq_len - int(s["cu_seqlens"][-1])
        if pad:
            segments.append(np.array([pad], np.int32))
    lengths = np.concatenate(segments)
    cu_seqlens = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    fields = {"index": torch.from_numpy(np.array([s["index"] for s in samples], np.int64))}
    fields.update({c: torch.from_numpy(np.stack([s[c] for s in samples]).astype(np.int64)) for c in _TENSOR_COLUMNS})
    fields.update({c: torch.from_numpy(np.stack([s[c] for s in samples]).astype(np.float32))
                   for c in _FLOAT_COLUMNS if c in samples[0]})
    fields.update(seq_lengths=[torch.from_numpy(s["seq_lengths"]) for s in samples],
                  cu_seqlens=torch.from_numpy(cu_seqlens), max_seqlen=int(lengths.max()))
    return ShardBatch(fields)


class ShardDataset(torch.utils.data.IterableDataset):
    """Rows of a shard set in the (seed, epoch) order; see the module docstring.

    start_index: samples of this epoch's order already consumed, all ranks together.
    batch_size: rows per yielded ShardBatch (give the DataLoader batch_size=None); None yields
        single sample dicts (direct iteration, or at most one DataLoader worker).
    rank, world_size: this process's share, positions start_index + rank + i*world_size."""

    def __init__(self, shard_dir: str, *, seed: int = 0, epoch: int = 0, start_index: int = 0,
                 batch_size: int | None = None, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, window_batches: int = 8):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"ShardDataset: batch_size must be >= 1 or None, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardDataset: rank must be in [0, world_size={world_size}), got {rank}")
        self.shard_dir, self.seed, self.epoch = shard_dir, seed, epoch
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.window_batches = shuffle, window_batches
        self.manifest = sink.read_manifest(shard_dir)
        self.seq_len = self.manifest["seq_len"]
        self._batches = []  # (file, record batch index, rows)
        self._fields = {}   # file -> indices of _READ_COLUMNS (then present _FLOAT_COLUMNS) in its schema
        self._floats: tuple[str, ...] | None = None  # the _FLOAT_COLUMNS every shard has
        for entry in self.manifest["shards"]:
            with storage.open_random_access(storage.join(shard_dir, entry["file"])) as f:
                schema = pa.ipc.open_file(f).schema
                missing = [c for c in _READ_COLUMNS if schema.get_field_index(c) < 0]
                if missing:
                    raise ValueError(f"{storage.join(shard_dir, entry['file'])}: missing columns {missing}")
                floats = tuple(c for c in _FLOAT_COLUMNS if schema.get_field_index(c) >= 0)
                if self._floats is not None and floats != self._floats:
                    raise ValueError(f"{storage.join(shard_dir, entry['file'])}: has columns {list(floats)} of "
                                     f"{list(_FLOAT_COLUMNS)}, the shard set's first shard {list(self._floats)}")
                self._floats = floats
                self._fields[entry["file"]] = [schema.get_field_index(c) for c in _READ_COLUMNS + floats]
                # Row counts from the smallest column only: no token column is decompressed here.
                num_tokens_field = schema.get_field_index(S.NUM_TOKENS)
                only_num_tokens = pa.ipc.IpcReadOptions(included_fields=[num_tokens_field])
                reader = pa.ipc.open_file(f, options=only_num_tokens)
                for b in range(reader.num_record_batches):
                    self._batches.append((entry["file"], b, reader.get_batch(b).num_rows))
        self._floats = self._floats or ()
        self.num_samples = sum(n for _, _, n in self._batches)
        self.start_index = self._checked_start(start_index)

    def _checked_start(self, start_index: int) -> int:
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"ShardDataset({self.shard_dir}): start_index {start_index} outside "
                             f"[0, {self.num_samples}] (the shard set's rows)")
        return start_index

    def _rank_samples(self) -> int:
        """Samples this rank yields from start_index to the end of the epoch."""
        return len(range(self.start_index + self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        """Items this rank yields: batches with batch_size, else samples (DataLoader's len)."""
        n = self._rank_samples()
        return n if self.batch_size is None else -(-n // self.batch_size)

    def fingerprint(self) -> str:
        """sha256 of the shard list (files, rows, sha256s): which shard set a position refers to."""
        return hashlib.sha256(json.dumps([self.seq_len, self.manifest["shards"]], sort_keys=True).encode()).hexdigest()

    def state_dict(self, samples_consumed: int) -> dict:
        """Where to resume once the trainer has consumed `samples_consumed` samples of this epoch
        (all ranks together, counted from 0, not from start_index). The trainer passes the count:
        the DataLoader's workers hold copies of the dataset, so this object cannot see it."""
        return {"seed": self.seed, "epoch": self.epoch, "start_index": self._checked_start(samples_consumed),
                "shard_set": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict`'s output; call before the DataLoader's iterator is created."""
        if state["shard_set"] != self.fingerprint():
            raise ValueError(f"ShardDataset({self.shard_dir}): the state was saved for another shard set")
        self.seed, self.epoch = state["seed"], state["epoch"]
        self.start_index = self._checked_start(state["start_index"])

    def _order(self) -> list[tuple[list[int], np.ndarray]]:
        """[(record batch ids of the window, row permutation inside the window)], in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batch_order = rng.permutation(len(self._batches)) if self.shuffle else np.arange(len(self._batches))
        windows = []
        for w in range(0, len(batch_order), self.window_batches):
            ids = batch_order[w:w + self.window_batches].tolist()
            n = sum(self._batches[i][2] for i in ids)
            windows.append((ids, rng.permutation(n) if self.shuffle else np.arange(n)))
        return windows

    def _read_window(self, batch_ids: list[int]) -> dict[str, np.ndarray]:
        parts = []
        for i in batch_ids:
            file, b, _ = self._batches[i]
            with storage.open_random_access(storage.join(self.shard_dir, file)) as f:
                options = pa.ipc.IpcReadOptions(included_fields=self._fields[file])
                parts.append(pa.ipc.open_file(f, options=options).get_batch(b).select(list(_READ_COLUMNS + self._floats)))
        table = pa.Table.from_batches(parts).combine_chunks()
        cols = {c: table.column(c).chunk(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, self.seq_len)
                for c in _TENSOR_COLUMNS + self._floats}
        offsets = table.column(S.DOC_OFFSETS).chunk(0)
        cols["list_offsets"], cols["doc_offsets"] = offsets.offsets.to_numpy(), offsets.values.to_numpy()
        cols["num_tokens"] = table.column(S.NUM_TOKENS).to_numpy()
        return cols

    def _sample(self, index: int, cols: dict[str, np.ndarray], r: int) -> dict:
        """Row r of a window as numpy (views of the window's fixed-size columns)."""
        starts = cols["doc_offsets"][cols["list_offsets"][r]:cols["list_offsets"][r + 1]]
        cu_seqlens = np.append(starts, cols["num_tokens"][r]).astype(np.int32)
        if len(starts) and starts[0] != 0:
            raise ValueError(f"{self.shard_dir}: a row's doc_offsets start at {starts[0]}, not 0 (shard-format.md)")
        return {"index": index, **{c: cols[c][r] for c in _TENSOR_COLUMNS + self._floats},
                "seq_lengths": np.diff(cu_seqlens), "cu_seqlens": cu_seqlens}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.batch_size is None and num_workers > 1:
            raise RuntimeError("ShardDataset(batch_size=None) yields single samples, which a DataLoader with "
                               f"num_workers={num_workers} would batch out of order: give ShardDataset "
                               "batch_size=B and the DataLoader batch_size=None")
        batch_size = self.batch_size or 1
        first = self.start_index + self.rank  # global position of this rank's stream item 0
        rank_samples = self._rank_samples()
        pending: list[dict] = []
        window_start = 0  # global position of the window's first sample
        for batch_ids, perm in self._order():
            window_end = window_start + len(perm)
            # This reader's positions in the window: rank stream items i whose batch i // B is ours.
            lo = max(window_start, first)
            lo += (first - lo) % self.world_size
            positions = np.arange(lo, window_end, self.world_size)
            positions = positions[(positions - first) // self.world_size // batch_size % num_workers == worker]
            if len(positions):  # else skip the window without reading it
                cols = self._read_window(batch_ids)
                for g in positions.tolist():
                    pending.append(self._sample(g, cols, perm[g - window_start]))
                    batch = (g - first) // self.world_size // batch_size
                    if len(pending) == min(batch_size, rank_samples - batch * batch_size):
                        yield _single(pending[0]) if self.batch_size is None else _batch(pending)
                        pending = []
            window_start = window_end
        assert not pending, "a batch was left incomplete"
