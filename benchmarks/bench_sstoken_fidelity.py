"""ssToken fidelity: does the selected 60% of response tokens train as well as all of them?

Protocol (algorithms.md, ssToken), scaled down to run on 2 CPU cores in a few minutes:

1. Real SFT data: the first rows of sft_alpaca (prompt / response), split into a
   pretraining set, an SFT training set and a held-out set. A small BPE tokenizer
   (`tokenizers`, vocab --vocab) is trained on the pretraining rows only.
   Sequence = BOS + prompt + "\\n" + response + EOS; targets = response + EOS.
2. Base model: a tiny Llama pretrained on the pretraining rows with the loss on all
   tokens (it stands in for the published runs' pretrained base = history model).
3. Offline ssToken: "current" = base fine-tuned --warm-steps on the SFT set; the
   training set is scored by TokenScorer (current vs history = base), real loading
   path, ratio 0.6, gamma 0.5.
4. From the same base, same batches, same steps and learning rate, fine-tune with
   (a) all response tokens, (b) a random mask keeping ceil(0.6 |R|) per sample,
   (c) the offline ssToken mask, (d) online ssToken as in the reference code
   (current = the model being trained, history = base, masks from
   `masks_from_logits` with its eager last-layer attention, gamma = 0 for the first
   20% of samples). Loss = mean CE over the kept tokens, as in the reference code.
5. Report the held-out loss over ALL response tokens for each, and the base's.

Tiny models on a few thousand samples are far from the paper's setting; the figures
are what this run measured, nothing more.

    python benchmarks/bench_sstoken_fidelity.py   # defaults: a few minutes on 2 cores (more when shared)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from operators import schema  # noqa: E402
from operators.score import TokenScorer  # noqa: E402
from operators.select import masks_from_logits, num_kept  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "sft_alpaca_00000_42147.jsonl.zst")
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"


def read_rows(path: str, n: int) -> list[dict]:
    import zstandard
    rows = []
    with open(path, "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[PAD, BOS, EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tok


def encode(tok, rows: list[dict], max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, target_mask) per row; responses truncated to max_len; rows whose
    prompt leaves fewer than 8 response tokens are skipped."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    out = []
    for r in rows:
        p = [bos] + tok.encode(r["prompt"] + "\n").ids
        if len(p) > max_len - 8:
            continue
        resp = (tok.encode(r["response"]).ids + [eos])[:max_len - len(p)]
        if len(resp) >= 8:
            out.append((np.array(p + resp, np.int64), np.r_[np.zeros(len(p)), np.ones(len(resp))].astype(np.uint8)))
    return out


def collate(docs, idx, masks=None):
    L = max(len(docs[i][0]) for i in idx)
    ids = torch.zeros(len(idx), L, dtype=torch.long)
    tm, lm, att = (torch.zeros(len(idx), L, dtype=torch.uint8) for _ in range(3))
    for r, i in enumerate(idx):
        n = len(docs[i][0])
        ids[r, :n], tm[r, :n], att[r, :n] = torch.from_numpy(docs[i][0]), torch.from_numpy(docs[i][1]), 1
        lm[r, :n] = torch.from_numpy(masks[i] if masks is not None else docs[i][1])
    return ids, tm, lm, att.long()


def masked_ce(logits, ids, mask):
    """Mean CE over positions t >= 1 where mask[t] = 1 (loss of predicting token t)."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    m = mask[:, 1:].flatten().float()
    return (ce * m).sum() / m.sum().clamp(min=1)


def new_model(vocab: int, args, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      max_position_embeddings=args.max_len, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def train(model, docs, order, *, steps, batch, lr, masks=None, online=None, all_tokens=False):
    """AdamW, constant lr after 10 warm-up steps. `online` = (history_model, warmup_samples)
    switches to reference-style online ssToken selection; all_tokens = pretraining loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    model.train()
    for step in range(steps):
        idx = order[(step * batch) % len(order):][:batch]
        ids, tm, lm, att = collate(docs, idx, masks)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10)
        out = model(input_ids=ids, attention_mask=att, output_attentions=online is not None)
        if all_tokens:
            lm = att.to(torch.uint8)
        elif online is not None:
            history, warmup_samples = online
            with torch.no_grad():
                hist_logits = history(input_ids=ids, attention_mask=att).logits
            lm = masks_from_logits(out.logits, hist_logits, ids, tm, "sstoken", attn_last_layer=out.attentions[-1],
                                   warmup=step * batch < warmup_samples)
        loss = masked_ce(out.logits, ids, lm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def heldout_loss(model, docs, batch=64) -> float:
    total, count = 0.0, 0
    for s in range(0, len(docs), batch):
        ids, tm, _, att = collate(docs, list(range(s, min(s + batch, len(docs)))))
        logits = model(input_ids=ids, attention_mask=att).logits
        n = tm[:, 1:].sum().item()
        total += masked_ce(logits, ids, tm).item() * n
        count += n
    return total / count


def random_masks(docs, ratio, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _, tm in docs:
        targets = np.flatnonzero(tm)
        m = np.zeros_like(tm)
        m[rng.choice(targets, int(num_kept(ratio, targets.size)), replace=False)] = 1
        out.append(m)
    return out


def mean_relative_position(docs, masks) -> float:
    """Mean position of the kept tokens within their response, 0 = first, 1 = last: shows
    whether a selection is biased towards the start or the end of responses."""
    rel = []
    for (_, tm), m in zip(docs, masks):
        r = np.flatnonzero(tm)
        rel.append((np.flatnonzero(m[r]) / max(1, r.size - 1)))
    return float(np.concatenate(rel).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DATA, help="SFT JSON Lines (.zst) with prompt/response")
    ap.add_argument("--rows", type=int, default=3000, help="Alpaca rows read (pretrain : sft : held-out = 2 : 2 : 1)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--warm-steps", type=int, default=20)
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-online", action="store_true", help="skip variant (d), online ssToken")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    rows = read_rows(args.data, args.rows)
    n = len(rows) // 5
    pre_rows, sft_rows, held_rows = rows[:2 * n], rows[2 * n:4 * n], rows[4 * n:]
    tok = train_tokenizer([r["prompt"] + "\n" + r["response"] for r in pre_rows], args.vocab)
    vocab = tok.get_vocab_size()
    pre, sft, held = (encode(tok, r, args.max_len) for r in (pre_rows, sft_rows, held_rows))
    print(f"docs: pretrain {len(pre)}, sft {len(sft)}, held-out {len(held)}; vocab {vocab}; "
          f"sft response tokens {sum(int(t.sum()) for _, t in sft):,}")

    rng = np.random.default_rng(args.seed)
    base = train(new_model(vocab, args, args.seed), pre, rng.permutation(len(pre)),
                 steps=args.pretrain_steps, batch=args.batch, lr=args.lr, all_tokens=True)
    sft_order = rng.permutation(len(sft))  # one batch order shared by every variant
    results = {"base (no SFT)": heldout_loss(base, held)}
    print(f"[{time.perf_counter() - t_start:5.0f}s] base pretrained; held-out response loss "
          f"{results['base (no SFT)']:.4f}")

    def from_base():
        m = new_model(vocab, args, args.seed)
        m.load_state_dict(base.state_dict())
        return m

    with tempfile.TemporaryDirectory() as root:
        warm = train(from_base(), sft, sft_order, steps=args.warm_steps, batch=args.batch, lr=args.lr)
        base.save_pretrained(os.path.join(root, "history"))
        warm.save_pretrained(os.path.join(root, "current"))
        table = pa.table({schema.ID: [str(i) for i in range(len(sft))],
                          schema.INPUT_IDS: pa.array([d[0].tolist() for d in sft], pa.list_(pa.int32())),
                          schema.TARGET_MASK: pa.array([d[1].tolist() for d in sft], pa.list_(pa.uint8()))})
        scorer = TokenScorer(current_model=os.path.join(root, "current"), other_model=os.path.join(root, "history"),
                             method="sstoken", ratio=args.ratio, device="cpu", batch_tokens=8192)
        sstoken_masks = [np.array(m, np.uint8) for m in scorer(table).column(schema.LOSS_MASK).to_pylist()]
    kept = sum(int(m.sum()) for m in sstoken_masks) / sum(int(t.sum()) for _, t in sft)
    print(f"[{time.perf_counter() - t_start:5.0f}s] offline ssToken masks: {kept:.3f} of response tokens kept")

    variants = {"(a) all response tokens": dict(),
                "(b) random 60% per sample": dict(masks=random_masks(sft, args.ratio, args.seed)),
                "(c) ssToken offline mask": dict(masks=sstoken_masks)}
    if not args.no_online:
        variants["(d) ssToken online (reference)"] = dict(online=(base, int(0.2 * args.sft_steps * args.batch)))
    for name, kw in variants.items():
        if "masks" in kw:
            print(f"  {name}: kept tokens' mean relative position in the response "
                  f"{mean_relative_position(sft, kw['masks']):.3f} (all tokens: "
                  f"{mean_relative_position(sft, [t for _, t in sft]):.3f})")
        model = train(from_base(), sft, sft_order, steps=args.sft_steps, batch=args.batch, lr=args.lr, **kw)
        results[name] = heldout_loss(model, held)
        print(f"[{time.perf_counter() - t_start:5.0f}s] {name}: held-out response loss {results[name]:.4f}")

    ref = results["(a) all response tokens"]
    print(f"\nheld-out loss over all response tokens ({len(held)} samples, {args.sft_steps} steps x "
          f"{args.batch}, lr {args.lr}, seed {args.seed}); lower is better; delta vs (a):")
    for name, value in results.items():
        print(f"  {name:34s} {value:.4f}  ({value - ref:+.4f})")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
