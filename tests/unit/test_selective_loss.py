"""Online selection in the training step: the papers' formulas, packed rows, the offline mask,
shard carriage of ref_loss, transformers.Trainer and a plain loop over ShardDataset.

Independent references: the ssToken reference code's `filter_tokens_with_attention_loss`
(jianke0604/ssToken, scripts/finetune.py) transcribed per sample, and Rho-1's batch top-k
written directly with torch.topk.
"""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from operators import schema as S
from operators.pack import pack_table
from operators.prompt_attention import enable_prompt_attention
from operators.score import TokenScorer
from operators.selective_loss import SelectiveLoss, collate_for_trainer, selective_loss
from operators.tokenize import tokenized_table
from tests.unit.tiny_models import make_tiny_causal_lm

VOCAB, SEQ_LEN = 300, 64


# ------------------------------------------------- the formulas on fixed tensors
def reference_sstoken_labels(logits_b, labels_b, attn_b, ref_losses, data_prop, ratio):
    """ssToken's reference code, one sample, transcribed: labels -100 = not trained."""
    prompt_len = int((labels_b == -100).sum())
    seq_len = labels_b.size(0)
    resp_len = seq_len - prompt_len
    per_token_loss = torch.cat([torch.zeros(1), F.cross_entropy(logits_b[:-1], labels_b[1:], reduction="none")])
    resp_loss = per_token_loss[prompt_len:]
    resp2prompt = attn_b[prompt_len:, :prompt_len].sum(dim=-1)
    diff = ref_losses[prompt_len:] - resp_loss
    diff_norm = (diff - diff.min()) / (diff.max() - diff.min() + 1e-8)
    combined = ratio * diff_norm + (1 - ratio) * resp2prompt
    keep_idx = torch.topk(combined, k=math.ceil(resp_len * data_prop), largest=True).indices
    keep = torch.zeros(resp_len, dtype=torch.bool)
    keep[keep_idx] = True
    new_labels = labels_b.clone()
    new_labels[torch.arange(prompt_len, seq_len)[~keep]] = -100
    return new_labels


@pytest.fixture(scope="module")
def fixed():
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 3, 12, 17, 2
    lengths, prompts = [10, 8, 12], [3, 2, 5]
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    scores = torch.randn(B, H, T, T, generator=g) * 2
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    tm = torch.zeros(B, T, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        tm[b, p:n] = 1
    ref = torch.where(tm.bool(), torch.rand(B, T, generator=g) * 5, torch.tensor(float("nan")))
    return dict(logits=logits, ids=ids, probs=probs, tm=tm, ref=ref, lengths=lengths)


@pytest.mark.parametrize("warmup", [False, True])
def test_online_sstoken_equals_the_reference_code(fixed, warmup):
    f = fixed
    batch = {S.INPUT_IDS: f["ids"], S.TARGET_MASK: f["tm"], S.REF_LOSS: f["ref"]}
    got = selective_loss(f["logits"], batch, method="sstoken", ratio=0.6, gamma=0.5, warmup=warmup,
                         attention=f["probs"])
    new_labels = torch.full_like(f["ids"], -100)
    for b, n in enumerate(f["lengths"]):
        labels = torch.where(f["tm"][b, :n].bool(), f["ids"][b, :n], torch.tensor(-100))
        new_labels[b, :n] = reference_sstoken_labels(
            f["logits"][b, :n], labels, f["probs"][b, :, :n, :n].mean(0), torch.nan_to_num(f["ref"][b, :n]),
            data_prop=0.6, ratio=0.0 if warmup else 0.5)
    assert torch.equal(got.loss_mask, new_labels != -100)
    expected = F.cross_entropy(f["logits"][:, :-1].reshape(-1, 17), new_labels[:, 1:].reshape(-1))  # mean, -100 ignored
    torch.testing.assert_close(got.loss, expected)
    assert got.num_kept == sum(math.ceil(0.6 * n) for n in (7, 6, 7)) and got.num_targets == 20


def test_online_rho1_equals_the_paper_formula(fixed):
    f = fixed
    batch = {S.INPUT_IDS: f["ids"], S.TARGET_MASK: f["tm"], S.REF_LOSS: f["ref"]}
    got = selective_loss(f["logits"], batch, method="rho1", ratio=0.7)
    ce = F.cross_entropy(f["logits"][:, :-1].reshape(-1, 17), f["ids"][:, 1:].reshape(-1), reduction="none").view(3, 11)
    target = f["tm"][:, 1:].bool()
    excess = (ce - f["ref"][:, 1:])[target]                     # L_current - L_reference
    k = math.ceil(0.7 * excess.numel())
    top = excess.topk(k).indices
    expected_mask = torch.zeros_like(excess, dtype=torch.bool)
    expected_mask[top] = True
    assert torch.equal(got.loss_mask[:, 1:][target], expected_mask)
    torch.testing.assert_close(got.loss, ce[target][top].mean())
    torch.testing.assert_close(got.scores[:, 1:][target], excess)
    # the loss carries the gradient of the kept tokens only
    logits = f["logits"].clone().requires_grad_(True)
    selective_loss(logits, batch, method="rho1", ratio=0.7).loss.backward()
    has_grad = logits.grad.abs().sum(-1)[:, :-1] > 0
    assert torch.equal(has_grad, got.loss_mask[:, 1:])


def test_errors_name_what_is_missing(fixed):
    f = fixed
    batch = {S.INPUT_IDS: f["ids"], S.TARGET_MASK: f["tm"], S.REF_LOSS: f["ref"]}
    with pytest.raises(ValueError, match="needs attention"):
        selective_loss(f["logits"], batch, method="sstoken")
    with pytest.raises(KeyError, match="ref_loss"):
        selective_loss(f["logits"], {S.INPUT_IDS: f["ids"], S.TARGET_MASK: f["tm"]}, method="rho1")
    with pytest.raises(ValueError, match="ref_loss"):
        selective_loss(f["logits"], {**batch, S.REF_LOSS: torch.full_like(f["ref"], float("nan"))}, method="rho1")
    with pytest.raises(ValueError, match="do not match"):
        selective_loss(f["logits"][:, :5], batch, method="rho1")
    with pytest.raises(ValueError, match="needs attention=enable_prompt_attention"):
        SelectiveLoss(method="sstoken")
    with pytest.raises(ValueError, match="no stored ref_loss"):
        SelectiveLoss.from_manifest({"selection": {"method": "none"}})


# ------------------------------------------------------- real models, packed rows
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"current": make_tiny_causal_lm(root / "cur", seed=0, heads=4, kv_heads=2),
            "history": make_tiny_causal_lm(root / "hist", seed=1, heads=4, kv_heads=2)}


@pytest.fixture(scope="module")
def documents():
    """SFT-like documents (prompt then response), one longer than SEQ_LEN (split by pack)."""
    rng = np.random.default_rng(2)
    lengths, prompts = [20, 9, 33, 14, 150, 25, 11, 40], [5, 3, 12, 4, 8, 6, 2, 15]
    ids = [rng.integers(0, VOCAB, n).tolist() for n in lengths]
    tms = [(np.arange(n) >= p).astype(np.uint8) for n, p in zip(lengths, prompts)]
    return tokenized_table(pa.array([f"d{i}" for i in range(len(ids))]), ids, tms)


def rows_to_batch(rows: pa.Table) -> dict:
    out = {}
    for c in (S.INPUT_IDS, S.TARGET_MASK, S.LOSS_MASK, S.POSITION_IDS):
        out[c] = torch.from_numpy(rows.column(c).combine_chunks().flatten().to_numpy().astype(np.int64)
                                  .reshape(-1, SEQ_LEN))
    if S.REF_LOSS in rows.column_names:
        out[S.REF_LOSS] = torch.from_numpy(rows.column(S.REF_LOSS).combine_chunks().flatten()
                                           .to_numpy(zero_copy_only=False).reshape(-1, SEQ_LEN).copy())
    return out


def live(path):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, enable_prompt_attention(model)


def test_pack_carries_ref_loss(models, documents):
    scored = TokenScorer({"method": "rho1", "reference_model": models["history"]}, window_len=SEQ_LEN)(documents)
    rows, stats = pack_table(scored, seq_len=SEQ_LEN, pad_id=0)
    assert rows.schema.field(S.REF_LOSS).type == pa.list_(pa.float32(), SEQ_LEN)
    b = rows_to_batch(rows)
    target = b[S.TARGET_MASK].bool()
    assert torch.isfinite(b[S.REF_LOSS][target]).all() and torch.isnan(b[S.REF_LOSS][~target]).all()
    assert int(target.sum()) == stats.target_tokens
    # every target's stored value is the document's value at that token (pieces at k * SEQ_LEN)
    by_id = dict(zip(scored.column(S.ID).to_pylist(), scored.column(S.REF_LOSS).to_pylist()))
    for r, (doc_ids, offsets, starts) in enumerate(zip(rows.column(S.DOC_IDS).to_pylist(),
                                                       rows.column(S.DOC_OFFSETS).to_pylist(),
                                                       rows.column(S.DOC_TOKEN_STARTS).to_pylist())):
        for d, o, s in zip(doc_ids, offsets, starts):
            doc = np.array(by_id[d], np.float32)[s:s + SEQ_LEN]
            got = b[S.REF_LOSS][r, o:o + doc.size].numpy()
            t = target[r, o:o + doc.size].numpy()
            np.testing.assert_array_equal(got[t], doc[t])


@pytest.mark.parametrize("method", ["sstoken", "rho1"])
def test_offline_mask_equals_online_when_live_is_the_frozen_current(models, documents, method):
    """Acceptance: the static mask the select stage writes from `current_model` is the mask the
    online loss picks when the live model is that same checkpoint (windows = pack pieces)."""
    other = "history_model" if method == "sstoken" else "reference_model"
    scorer = TokenScorer({"method": method, "current_model": models["current"], other: models["history"]},
                         window_len=SEQ_LEN)
    rows, _ = pack_table(scorer(documents), seq_len=SEQ_LEN, pad_id=0)
    batch = rows_to_batch(rows)
    model, attention = live(models["current"])
    with torch.no_grad():
        logits = model(input_ids=batch[S.INPUT_IDS], position_ids=batch[S.POSITION_IDS], use_cache=False).logits
    out = selective_loss(logits, batch, method=method, attention=attention)
    assert torch.equal(out.loss_mask, batch[S.LOSS_MASK].bool())
    assert out.num_kept == int(batch[S.LOSS_MASK].sum())
    # control: another live model (here the history one) selects differently
    model, attention = live(models["history"])
    with torch.no_grad():
        logits = model(input_ids=batch[S.INPUT_IDS], position_ids=batch[S.POSITION_IDS], use_cache=False).logits
    assert not torch.equal(selective_loss(logits, batch, method=method, attention=attention).loss_mask,
                           batch[S.LOSS_MASK].bool())


def test_packed_rows_equal_one_document_per_row(models, documents):
    """Segments from position_ids: the live losses, attention and masks of packed rows equal
    those of the same documents one per row; a call that lets documents see each other is refused."""
    rows, _ = pack_table(TokenScorer({"method": "sstoken", "history_model": models["history"]},
                                     window_len=SEQ_LEN)(documents), seq_len=SEQ_LEN, pad_id=0)
    packed = rows_to_batch(rows)
    model, attention = live(models["current"])
    with torch.no_grad():
        logits = model(input_ids=packed[S.INPUT_IDS], position_ids=packed[S.POSITION_IDS], use_cache=False).logits
    out = selective_loss(logits, packed, method="sstoken", attention=attention)
    # the same pieces, one per row, right-padded, no position_ids
    pieces = []
    for r in range(len(rows)):
        starts = np.flatnonzero(packed[S.POSITION_IDS][r].numpy() == 0)
        for s in starts:
            n = int((packed[S.POSITION_IDS][r, s:] == torch.arange(SEQ_LEN - s)).long().cumprod(0).sum())
            if packed[S.TARGET_MASK][r, s:s + n].any():
                pieces.append((r, s, n))
    single = {k: torch.zeros(len(pieces), SEQ_LEN, dtype=v.dtype) for k, v in packed.items()}
    single[S.REF_LOSS][:] = float("nan")
    for i, (r, s, n) in enumerate(pieces):
        for k in single:
            single[k][i, :n] = packed[k][r, s:s + n]
    lengths = torch.tensor([n for _, _, n in pieces])
    with torch.no_grad():
        logits1 = model(input_ids=single[S.INPUT_IDS], use_cache=False,
                        attention_mask=(torch.arange(SEQ_LEN)[None] < lengths[:, None]).long()).logits
    one = selective_loss(logits1, {k: v for k, v in single.items() if k != S.POSITION_IDS},
                         method="sstoken", attention=attention)
    for i, (r, s, n) in enumerate(pieces):
        assert torch.equal(out.loss_mask[r, s:s + n], one.loss_mask[i, :n])
        torch.testing.assert_close(out.scores[r, s:s + n], one.scores[i, :n], equal_nan=True, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, one.loss, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits = model(input_ids=packed[S.INPUT_IDS], use_cache=False).logits  # no position_ids: one causal mask
    with pytest.raises(ValueError, match="attended to the one before it"):
        selective_loss(logits, packed, method="sstoken", attention=attention)


# ------------------------------------------------------------ trainers
class RowStream(torch.utils.data.IterableDataset):
    """Packed rows in order, as ShardDataset(shuffle=False) yields them."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        n = self.batch[S.INPUT_IDS].shape[0]
        for i in range(n * 4):  # a few epochs, so max_steps is reached
            yield {"index": i, **{k: v[i % n] for k, v in self.batch.items()}}


def test_transformers_trainer_drop_in(models, documents, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments
    rows, _ = pack_table(TokenScorer({"method": "sstoken", "history_model": models["history"]},
                                     window_len=SEQ_LEN)(documents), seq_len=SEQ_LEN, pad_id=0)
    manifest = {"selection": {"method": "sstoken", "ref_loss": True, "ratio": 0.5, "gamma": 0.5,
                              "warmup_fraction": 0.5}}
    batch = rows_to_batch(rows)
    model = AutoModelForCausalLM.from_pretrained(models["current"])
    loss = SelectiveLoss.from_manifest(manifest, attention=enable_prompt_attention(model))
    # the first micro-batch, computed independently before any update
    first = collate_for_trainer([{k: v[i] for k, v in batch.items()} for i in range(2)])
    with torch.no_grad():
        logits = model(input_ids=first["input_ids"], position_ids=first["position_ids"], use_cache=False).logits
    expected_first = selective_loss(logits, first["labels"], method="sstoken", ratio=0.5, gamma=0.5, warmup=True,
                                     attention=loss.attention).loss
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append((state.global_step, loss.last_in_warmup, float(loss.last.loss)))

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             gradient_accumulation_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True,
                             remove_unused_columns=False, save_strategy="no", logging_strategy="no",
                             dataloader_num_workers=0, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=args, train_dataset=RowStream(batch), data_collator=collate_for_trainer,
                      compute_loss_func=loss, callbacks=[loss.callback, Record()])
    trainer.train()
    assert [w for _, w, _ in seen] == [True, True, False, False]  # warm-up: steps < 0.5 * 4
    assert seen[0][2] == pytest.approx(float(expected_first), rel=1e-5)
    assert loss.max_steps == 4 and loss.grad_accum == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert 0 < loss.last.num_kept < loss.last.num_targets


def test_plain_loop_over_shard_dataset(models, documents, tmp_path):
    """Shards written as the pipeline writes them, read back by ShardDataset, trained with the
    online Rho-1 loss in a plain loop."""
    from pipeline import sink
    from pipeline.torch_dataset import ShardDataset
    scored = TokenScorer({"method": "rho1", "reference_model": models["history"]}, window_len=SEQ_LEN)(documents)
    rows, _ = pack_table(scored, seq_len=SEQ_LEN, pad_id=0)
    written = sink.write_table(str(tmp_path / "shard-00000.arrow"), rows, compression="zstd")
    sink.write_manifest(str(tmp_path), {"seq_len": SEQ_LEN, "shards": [
        {"file": "shard-00000.arrow", "rows": rows.num_rows, **written}],
        "selection": {"method": "rho1", "ref_loss": True, "ratio": 0.6}})
    ds = ShardDataset(str(tmp_path), shuffle=False, batch_size=rows.num_rows)
    model = AutoModelForCausalLM.from_pretrained(models["current"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    expected = rows_to_batch(rows)
    for step, b in enumerate(torch.utils.data.DataLoader(ds, batch_size=None)):  # the dataset batches
        torch.testing.assert_close(b[S.REF_LOSS], expected[S.REF_LOSS], equal_nan=True)
        logits = model(input_ids=b[S.INPUT_IDS], position_ids=b[S.POSITION_IDS], use_cache=False).logits
        out = selective_loss(logits, b, method="rho1", ratio=0.6)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        assert out.num_kept == math.ceil(round(0.6 * out.num_targets, 6))
