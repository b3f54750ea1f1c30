"""ShardDataset: one order per (seed, epoch), exact resume under real DataLoader workers and ranks,
varlen-attention boundaries that match the shards. Shards are written by the real pack + sink."""
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from operators import schema as S
from operators.pack import pack_table
from operators.tokenize import tokenized_table
from pipeline import sink
from pipeline.torch_dataset import ShardBatch, ShardDataset, collate_varlen

SEQ_LEN = 16
# 3 workers on a 2-core machine is the point of the test, not a mistake.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """3 zstd shards, ~20 rows of 16 tokens, record batches of 4 rows (the last of each shard short),
    documents of 1-29 tokens (some split), written and described the way the pack stage does."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, 22)
    ids = [rng.integers(5, 1000, n).tolist() for n in lengths]
    masks = [np.r_[0, np.ones(n - 1, np.uint8)].astype(np.uint8) for n in lengths]
    entries = []
    for s, part in enumerate(np.array_split(np.arange(len(ids)), 3)):
        docs = tokenized_table(pa.array([f"doc{i}" for i in part]), [ids[i] for i in part], [masks[i] for i in part])
        rows, stats = pack_table(docs, seq_len=SEQ_LEN, pad_id=0)
        file = f"shard-{s:05d}.arrow"
        written = sink.write_table(str(root / file), rows, compression="zstd", rows_per_batch=4)
        entries.append({"file": file, "rows": stats.rows, **written})
    sink.write_manifest(str(root), {"seq_len": SEQ_LEN, "shards": entries, "tokenizer": {"pad_id": 0}})
    return str(root)


def shard_rows(shard_dir):
    files = [e["file"] for e in sink.read_manifest(shard_dir)["shards"]]
    return pa.concat_tables([sink.read_table(f"{shard_dir}/{f}") for f in files])


def ids_of(samples):
    return [tuple(s[S.INPUT_IDS].tolist()) for s in samples]


def test_order_is_a_function_of_seed_and_epoch_and_holds_every_row_once(shard_dir):
    order = list(ShardDataset(shard_dir, seed=3, window_batches=2))
    assert [s["index"] for s in order] == list(range(len(order)))
    table_rows = shard_rows(shard_dir).column(S.INPUT_IDS).to_pylist()
    assert sorted(ids_of(order)) == sorted(map(tuple, table_rows)) and len(set(ids_of(order))) == len(order)
    assert ids_of(ShardDataset(shard_dir, seed=3, window_batches=2)) == ids_of(order)
    assert ids_of(ShardDataset(shard_dir, seed=4, window_batches=2)) != ids_of(order)
    assert ids_of(ShardDataset(shard_dir, seed=3, epoch=1, window_batches=2)) != ids_of(order)
    in_file_order = ShardDataset(shard_dir, shuffle=False)
    assert ids_of(in_file_order) == list(map(tuple, table_rows))


def loader_batches(shard_dir, num_workers, **kw):
    ds = ShardDataset(shard_dir, seed=3, window_batches=2, **kw)
    return list(DataLoader(ds, batch_size=None, num_workers=num_workers))


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_resume_after_any_number_of_samples_is_exact(shard_dir, num_workers):
    reference = ids_of(ShardDataset(shard_dir, seed=3, window_batches=2))  # the order, without workers
    total, batch_size = len(reference), 2
    for world_size in (1, 2):
        # Without workers, every start. With k workers, rank r's batches go round-robin to them, so
        # the split repeats every batch_size * k * world_size samples: one whole period of starts
        # and the last ones (each start costs a DataLoader of k processes).
        period = batch_size * num_workers * world_size
        starts = range(total + 1) if not num_workers else sorted({*range(period + 1), total - 1, total})
        for start in starts:
            ranks = [loader_batches(shard_dir, num_workers, start_index=start, batch_size=batch_size,
                                    rank=r, world_size=world_size) for r in range(world_size)]
            seen = []
            for r, batches in enumerate(ranks):
                stream = [int(i) for b in batches for i in b["index"]]
                # rank r gets positions start + r, start + r + R, ...: disjoint slices covering order[start:]
                assert stream == list(range(start + r, total, world_size)), (world_size, start, r)
                assert [len(b["index"]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
                assert len(batches) == len(ShardDataset(shard_dir, start_index=start, batch_size=batch_size,
                                                        rank=r, world_size=world_size))
                rows = [tuple(x.tolist()) for b in batches for x in b[S.INPUT_IDS]]
                assert rows == [reference[i] for i in stream]  # the same rows, not just the same labels
                seen += stream
            # what was consumed before (order[:start]) plus everything after: the whole order, once
            assert sorted(list(range(start)) + seen) == list(range(total))


def test_issue_17_two_workers_batch_8(shard_dir):
    """The reported case: after one batch of 8 the trainer resumes at 8 and sees every sample once."""
    first = loader_batches(shard_dir, 2, batch_size=8)
    assert first[0]["index"].tolist() == list(range(8))
    resumed = loader_batches(shard_dir, 2, batch_size=8, start_index=8)
    seen = torch.cat([first[0]["index"]] + [b["index"] for b in resumed]).tolist()
    assert seen == list(range(ShardDataset(shard_dir).num_samples))  # 1, 3, 5, 7 included, nothing twice


def test_mismatches_and_bad_arguments_raise(shard_dir):
    batched = ShardDataset(shard_dir, batch_size=4)
    with pytest.raises(TypeError, match="ShardBatch"):  # DataLoader(batch_size=k) would break the order
        next(iter(DataLoader(batched, batch_size=4)))
    with pytest.raises(TypeError, match="batch_size=None"):
        collate_varlen([next(iter(batched))])
    with pytest.raises(RuntimeError, match="batch_size=None"):  # single samples under 2 workers
        next(iter(DataLoader(ShardDataset(shard_dir), batch_size=4, num_workers=2)))
    for bad in ({"rank": 2, "world_size": 2}, {"start_index": 10_000}, {"start_index": -1}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            ShardDataset(shard_dir, **bad)


def test_state_dict_round_trip_and_refuses_another_shard_set(shard_dir, tmp_path):
    ds = ShardDataset(shard_dir, seed=5, epoch=2, batch_size=4)
    state = ds.state_dict(samples_consumed=7)
    fresh = ShardDataset(shard_dir, batch_size=4)
    fresh.load_state_dict(state)
    expected = list(ShardDataset(shard_dir, seed=5, epoch=2, batch_size=4, start_index=7))
    assert [b["index"].tolist() for b in fresh] == [b["index"].tolist() for b in expected]
    with pytest.raises(ValueError, match="outside"):
        ds.state_dict(samples_consumed=ds.num_samples + 1)
    manifest = sink.read_manifest(shard_dir)
    manifest["shards"] = manifest["shards"][:2]
    sink.write_manifest(str(tmp_path), manifest)
    for e in manifest["shards"]:
        (tmp_path / e["file"]).write_bytes(open(f"{shard_dir}/{e['file']}", "rb").read())
    with pytest.raises(ValueError, match="another shard set"):
        ShardDataset(str(tmp_path)).load_state_dict(state)


def segment_ids_from_positions(position_ids):
    """Attention segments as a trainer derives them from position_ids alone: a new one at each 0;
    padding (position 0 everywhere) becomes one segment per token."""
    return torch.cumsum(position_ids == 0, dim=1)


def causal_block_mask(seg):
    return (seg[:, :, None] == seg[:, None, :]) & torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool).tril()


def test_varlen_boundaries_equal_doc_offsets_and_positions_restart_there(shard_dir):
    table = shard_rows(shard_dir)
    offsets, num_tokens = table.column(S.DOC_OFFSETS).to_pylist(), table.column(S.NUM_TOKENS).to_pylist()
    for s in ShardDataset(shard_dir, shuffle=False):  # index = row of the concatenated shards
        cu, g = s["cu_seqlens"], s["index"]
        assert cu.dtype == s["seq_lengths"].dtype == torch.int32
        assert cu[:-1].tolist() == offsets[g] and int(cu[-1]) == num_tokens[g]
        assert s["seq_lengths"].tolist() == np.diff(cu.numpy()).tolist() and (s["seq_lengths"] > 0).all()
        t = torch.arange(SEQ_LEN)
        piece_start = cu[torch.searchsorted(cu, t, right=True).clamp(max=len(cu) - 1) - 1]
        real = t < num_tokens[g]
        assert (s[S.POSITION_IDS][real] == (t - piece_start)[real]).all() and not s[S.POSITION_IDS][~real].any()


def test_batch_cu_seqlens_give_the_attention_position_ids_give(shard_dir):
    batch = next(iter(DataLoader(ShardDataset(shard_dir, seed=1, batch_size=6), batch_size=None, num_workers=2)))
    B, L = batch[S.INPUT_IDS].shape
    cu = batch["cu_seqlens"]
    assert isinstance(batch, ShardBatch) and cu.dtype == torch.int32 and int(cu[-1]) == B * L and int(cu[0]) == 0
    assert batch["max_seqlen"] == int(cu.diff().max())
    row_ends = [int(r.sum()) for r in batch["seq_lengths"]]
    expected = [0]
    for i, lengths in enumerate(batch["seq_lengths"]):  # each row's pieces, then its padding as one segment
        expected += (i * L + torch.cumsum(lengths, 0)).tolist() + ([(i + 1) * L] if row_ends[i] < L else [])
    assert cu.tolist() == expected
    # The docstring's mask from cu_seqlens equals the mask from position_ids on every real token.
    seg = torch.searchsorted(cu, torch.arange(B * L, dtype=torch.int32), right=True).view(B, L)
    from_cu, from_pos = causal_block_mask(seg), causal_block_mask(segment_ids_from_positions(batch[S.POSITION_IDS]))
    real = torch.arange(L)[None] < torch.tensor(row_ends)[:, None]
    assert torch.equal(from_cu[real], from_pos[real])
    # Varlen attention (causal attention inside each cu_seqlens segment of the flattened batch, what
    # flash_attn_varlen_func computes) equals SDPA with the position_ids mask, on real tokens.
    torch.manual_seed(0)
    q, k, v = torch.randn(3, B * L, 2, 8).unbind(0)
    varlen = torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True)
                        .transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]).view(B, L, 2, 8)
    dense = F.scaled_dot_product_attention(*(x.view(B, L, 2, 8).transpose(1, 2) for x in (q, k, v)),
                                           attn_mask=from_pos[:, None]).transpose(1, 2)
    torch.testing.assert_close(varlen[real], dense[real])
    # flex_attention's document mask from cu_seqlens (torch's own API, eager on CPU) gives the same.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def document_causal(b, h, qi, ki):
        return (seg[b, qi] == seg[b, ki]) & (qi >= ki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = flex_attention(*(x.view(B, L, 2, 8).transpose(1, 2) for x in (q, k, v)),
                              block_mask=create_block_mask(document_causal, B, None, L, L, device="cpu"))
    torch.testing.assert_close(flex.transpose(1, 2)[real], dense[real])


def test_docstring_training_step_treats_each_document_piece_alone(shard_dir):
    """The module docstring's step: with the cu_seqlens mask, a packed row's logits equal each piece's
    logits computed alone (so no token attends across a document boundary)."""
    torch.manual_seed(0)
    emb, pos_emb, head = torch.nn.Embedding(1000, 16), torch.nn.Embedding(SEQ_LEN, 16), torch.nn.Linear(16, 1000)

    def model(ids, position_ids, attn_mask):
        x = (emb(ids) + pos_emb(position_ids))[:, None]
        return head(F.scaled_dot_product_attention(x, x, x, attn_mask=attn_mask)[:, 0])

    batch = next(iter(DataLoader(ShardDataset(shard_dir, batch_size=4), batch_size=None)))
    ids, (B, L) = batch[S.INPUT_IDS], batch[S.INPUT_IDS].shape
    seg = torch.searchsorted(batch["cu_seqlens"], torch.arange(B * L, dtype=torch.int32), right=True).view(B, L)
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    logits = model(ids, position_ids=batch[S.POSITION_IDS], attn_mask=mask[:, None])
    w = batch[S.LOSS_MASK][:, 1:].float()
    loss = (F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none") * w).sum() / w.sum()
    loss.backward()
    assert torch.isfinite(loss) and emb.weight.grad.abs().sum() > 0
    for i, lengths in enumerate(batch["seq_lengths"]):
        for a, b in zip([0] + torch.cumsum(lengths, 0).tolist(), torch.cumsum(lengths, 0).tolist()):
            alone = model(ids[i:i + 1, a:b], batch[S.POSITION_IDS][i:i + 1, a:b],
                          torch.ones(b - a, b - a, dtype=torch.bool).tril())
            torch.testing.assert_close(logits[i, a:b], alone[0])
