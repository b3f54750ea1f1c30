"""HF exports read back by `datasets.load_from_disk` and trained on by TRL's SFTTrainer (padding-free)."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from operators import schema as S
from pipeline.export import export_run
from tests.unit.export_shards import shard_run  # noqa: F401
from tests.unit.tiny_models import make_tiny_causal_lm


def _shard_rows(shard_dir: str, manifest: dict):
    """Every shard row, padding stripped: (input_ids, loss_mask, position_ids, piece lengths)."""
    for entry in manifest["shards"]:
        t = pa.ipc.open_file(f"{shard_dir}/{entry['file']}").read_all()
        for ids, loss, pos, offs, n in zip(*(t.column(c).to_pylist() for c in (
                S.INPUT_IDS, S.LOSS_MASK, S.POSITION_IDS, S.DOC_OFFSETS, S.NUM_TOKENS))):
            yield ids[:n], loss[:n], pos[:n], np.diff(offs + [n]).tolist()


@pytest.mark.parametrize("name", ["bpe", "cl100k"])
def test_load_from_disk_gives_the_shard_rows(shard_run, tmp_path, name):
    import datasets
    shard_dir, _, manifest = shard_run[name]
    m = export_run(str(shard_run["run_dir"]), "hf", tokenizer=name, out=str(tmp_path))[0]
    ds = datasets.load_from_disk(str(tmp_path / name))
    assert ds.column_names == ["input_ids", "labels", "position_ids", "seq_lengths"]
    assert len(ds) == manifest["counts"]["rows"] == m["counts"]["rows"]
    for got, (ids, loss, pos, lengths) in zip(ds, _shard_rows(shard_dir, manifest), strict=True):
        assert got["input_ids"] == ids and got["position_ids"] == pos and got["seq_lengths"] == lengths
        assert got["labels"] == [t if keep else -100 for t, keep in zip(ids, loss)]
    assert m["counts"]["loss_tokens"] == sum(sum(1 for x in row if x != -100) for row in ds["labels"])


def _reference_loss(model, rows, confined: bool = True) -> float:
    """Mean next-token loss over our loss-masked tokens, each document piece run as its own sequence
    (confined=False: each whole row as one sequence, attention crossing documents, the bug to catch)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            start = 0
            for n in (row["seq_lengths"] if confined else [len(row["input_ids"])]):
                ids = torch.tensor(row["input_ids"][start:start + n])
                labels = torch.tensor(row["labels"][start:start + n])
                logits = model(input_ids=ids[None]).logits[0].float()
                keep = labels[1:] != -100
                if keep.any():
                    total += torch.nn.functional.cross_entropy(logits[:-1][keep], ids[1:][keep], reduction="sum").item()
                    count += int(keep.sum())
                start += n
    return total / count


def test_trl_sft_trainer_logs_the_loss_of_our_masks(shard_run, tmp_path, hf_bpe_dir):
    """A few SFTTrainer steps, padding-free on CPU (SDPA confines attention to each piece through position_ids):
    the loss TRL logs at each step equals the loss of our masks computed piece by piece with the same weights."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    trl = pytest.importorskip("trl", reason="trl (dev extra) is not installed")
    _, _, manifest = shard_run["bpe"]
    export_run(str(shard_run["run_dir"]), "hf", tokenizer="bpe", out=str(tmp_path / "export"))
    ds = datasets.load_from_disk(str(tmp_path / "export" / "bpe"))
    # rows of several documents (attention must stay inside each) and one row of a split document's piece
    multi = [i for i, r in enumerate(ds["seq_lengths"]) if len(r) > 1]
    ds = ds.select(multi[:5] + [next(i for i, r in enumerate(ds["seq_lengths"]) if len(r) == 1)])
    model_dir = make_tiny_causal_lm(tmp_path / "model", vocab_size=manifest["tokenizer"]["vocab_size"],
                                    max_positions=256)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_bpe_dir))
    batch, steps, expected, unconfined = 2, 3, [], []

    class ReferenceLoss(TrainerCallback):  # before each optimizer step: the same batch, the same weights
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            k = state.global_step
            model.eval()
            rows = [ds[i] for i in range(k * batch, (k + 1) * batch)]
            expected.append(_reference_loss(model, rows))
            unconfined.append(_reference_loss(model, rows, confined=False))
            model.train()

    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), padding_free=True, max_length=None,
                         per_device_train_batch_size=batch, max_steps=steps, logging_steps=1, learning_rate=5e-3,
                         train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no",
                         dataloader_num_workers=0, seed=0)
    trainer = trl.SFTTrainer(model=model_dir, args=args, train_dataset=ds, processing_class=tokenizer,
                             callbacks=[ReferenceLoss()])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == len(expected) == steps
    assert logged == pytest.approx(expected, rel=1e-4)
    assert len(set(np.round(logged, 3))) == steps  # the weights moved between steps
    assert all(abs(a - b) > 1e-3 * a for a, b in zip(logged, unconfined))  # a leak across documents would show
