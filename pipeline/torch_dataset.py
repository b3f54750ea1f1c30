"""A PyTorch dataset over a shard set: deterministic shuffle, resume from a sample index.

    ds = ShardDataset("runs/r1/shards/cl100k", seed=0, epoch=0, start_index=12_345)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)

The order is a pure function of (seed, epoch): record batches (256 rows by
default) are permuted, then rows are permuted inside windows of
`window_batches` consecutive batches of that order. Memory holds one window,
and zstd shards are decompressed once per batch, not once per row. Resuming
at `start_index` skips whole windows without reading them, so a trainer that
checkpoints its sample count continues with exactly the samples it had not
seen. With DataLoader workers, worker w yields samples w, w+n, w+2n, ...
of that order, so the union over workers is the same sequence.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from operators import schema as S
from pipeline import sink, storage

_TENSOR_COLUMNS = (S.INPUT_IDS, S.TARGET_MASK, S.LOSS_MASK, S.POSITION_IDS)


class ShardDataset(torch.utils.data.IterableDataset):
    def __init__(self, shard_dir: str, *, seed: int = 0, epoch: int = 0, start_index: int = 0,
                 shuffle: bool = True, window_batches: int = 8):
        self.shard_dir, self.seed, self.epoch = shard_dir, seed, epoch
        self.start_index, self.shuffle, self.window_batches = start_index, shuffle, window_batches
        self.manifest = sink.read_manifest(shard_dir)
        self.seq_len = self.manifest["seq_len"]
        self._batches = []  # (file, batch index, rows)
        for entry in self.manifest["shards"]:
            with storage.open_random_access(storage.join(shard_dir, entry["file"])) as f:
                reader = pa.ipc.open_file(f)
                for b in range(reader.num_record_batches):
                    self._batches.append((entry["file"], b, reader.get_batch(b).num_rows))
        self.num_samples = sum(n for _, _, n in self._batches)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)

    def _order(self) -> list[tuple[list[int], np.ndarray]]:
        """[(batch ids of the window, row permutation inside the window)], in order."""
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
                parts.append(pa.ipc.open_file(f).get_batch(b))
        table = pa.Table.from_batches(parts)
        return {c: table.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, self.seq_len)
                for c in _TENSOR_COLUMNS}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        position = 0  # global sample index of the next sample in the order
        for batch_ids, perm in self._order():
            n = len(perm)
            if position + n <= self.start_index:  # skip a whole window without reading it
                position += n
                continue
            cols = self._read_window(batch_ids)
            for k in range(n):
                index = position + k
                if index < self.start_index or (index - self.start_index) % num_workers != worker:
                    continue
                r = perm[k]
                yield {"index": index, **{c: torch.from_numpy(cols[c][r].astype(np.int64)) for c in _TENSOR_COLUMNS}}
            position += n
