"""Token-selection fidelity: can ssToken and Rho-1, run as the papers run them, skip known noise?

Protocol (tiny Llama models trained here, real Alpaca rows; 2 CPU cores):

1. The first --rows rows of sft_alpaca split 2 : 1 : 1 : 1 into pretraining, clean reference
   SFT, training SFT and held-out rows. A BPE tokenizer (vocab --vocab) is trained on the
   pretraining rows. Sequence = BOS + prompt + "\\n" + response + EOS, targets = response + EOS,
   truncated to --seq-len, packed best-fit into rows of --seq-len (operators.pack).
2. Noise: in --noisy-rows of the training rows, --noise of the response tokens (EOS excluded)
   are replaced by uniformly random token ids. Held-out rows stay clean.
3. Base = a tiny Llama pretrained on the pretraining rows (all tokens): ssToken's history
   model. Reference = the base fine-tuned on the clean reference SFT rows: Rho-1's reference
   model. Both trained on clean data.
4. The select stage's model work (operators.score.TokenScorer, window = seq_len) stores the
   history model's and the reference model's per-token losses (ref_loss, fp32) and, per seed,
   the offline static ssToken mask from a frozen "current" = base fine-tuned --warm-steps on
   the training rows.
5. Arms, each from the base with the same batches, steps and learning rate (--sft-steps):
   all tokens; random --ratio per sample; Rho-1 online (live loss - stored reference loss,
   top ratio of each batch); ssToken online (REL = stored history loss - live loss, live
   last-layer attention to the prompt, gamma 0.5, gamma = 0 for the first 20% of steps);
   ssToken offline static mask. Online arms use operators.selective_loss.
6. Per arm, mean +- sd over --seeds seeds (batch order, random mask, warm "current"; the
   base, reference and noise are shared): held-out clean response loss (nats/token), the
   fraction of noisy tokens kept (over every training visit) and the kept tokens' mean
   relative position in their response (0 = first, 1 = last; all tokens ~0.5).

Tiny models on a few thousand rows are far from the papers' setting; the figures are what
this run measured, whichever way they go.

    python benchmarks/bench_sstoken_fidelity.py            # defaults: < 10 min on 2 quiet cores
    python benchmarks/bench_sstoken_fidelity.py --quick    # a 2-minute smoke run
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from operators import schema as S  # noqa: E402
from operators.pack import pack_table  # noqa: E402
from operators.prompt_attention import enable_prompt_attention  # noqa: E402
from operators.score import TokenScorer  # noqa: E402
from operators.select import num_kept  # noqa: E402
from operators.selective_loss import selective_loss  # noqa: E402
from operators.tokenize import tokenized_table  # noqa: E402
from operators.token_loss import token_losses_from_logits  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "sft_alpaca_00000_42147.jsonl.zst")
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
ARMS = ("all tokens", "random", "Rho-1 online", "ssToken online", "ssToken offline mask")


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


def encode(tok, rows: list[dict], seq_len: int, all_targets: bool = False) -> pa.Table:
    """Tokenized documents (id, input_ids, target_mask); rows leaving < 8 response tokens are skipped."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids, tms = [], []
    for r in rows:
        p = [bos] + tok.encode(r["prompt"] + "\n").ids
        resp = (tok.encode(r["response"]).ids + [eos])[:seq_len - len(p)]
        if len(resp) >= 8:
            ids.append(p + resp)
            tms.append(np.r_[0, np.full(len(p) - 1, int(all_targets)), np.ones(len(resp))].astype(np.uint8))
    return tokenized_table(pa.array([f"d{i}" for i in range(len(ids))]), ids, tms)


def add_noise(docs: pa.Table, vocab: int, noisy_rows: float, noise: float, seed: int) -> tuple[pa.Table, list]:
    """Replace `noise` of the response tokens (EOS excluded) of `noisy_rows` of the documents by
    random ids; returns the noisy table and the per-document noise masks."""
    rng = np.random.default_rng(seed)
    ids, tms = docs.column(S.INPUT_IDS).to_pylist(), docs.column(S.TARGET_MASK).to_pylist()
    masks = []
    for i, (x, tm) in enumerate(zip(ids, tms)):
        m = np.zeros(len(x), bool)
        if rng.random() < noisy_rows:
            resp = np.flatnonzero(tm)[:-1]
            pick = rng.choice(resp, int(round(noise * resp.size)), replace=False)
            m[pick] = True
            for t in pick:
                x[t] = int(rng.integers(3, vocab))
        masks.append(m)
    return tokenized_table(docs.column(S.ID), ids, [np.array(t, np.uint8) for t in tms]), masks


def per_token(rows: pa.Table, docs: pa.Table, per_doc: list[np.ndarray], seq_len: int, fill=0.0) -> np.ndarray:
    """A per-document-token value laid out like the packed rows, [rows, seq_len]."""
    where = {d: i for i, d in enumerate(docs.column(S.ID).to_pylist())}
    out = np.full((rows.num_rows, seq_len), fill, dtype=np.float64)
    layout = zip(*(rows.column(c).to_pylist() for c in (S.DOC_IDS, S.DOC_OFFSETS, S.DOC_TOKEN_STARTS)))
    for r, (ds, offs, starts) in enumerate(layout):
        for d, o, s in zip(ds, offs, starts):
            v = per_doc[where[d]][s:s + seq_len - o]
            out[r, o:o + v.size] = v
    return out


def tensors(rows: pa.Table, seq_len: int) -> dict[str, torch.Tensor]:
    def col(c, dtype):
        return torch.from_numpy(rows.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                                .astype(dtype).reshape(-1, seq_len))
    out = {c: col(c, np.int64) for c in (S.INPUT_IDS, S.TARGET_MASK, S.LOSS_MASK, S.POSITION_IDS)}
    if S.REF_LOSS in rows.column_names:
        out[S.REF_LOSS] = col(S.REF_LOSS, np.float32)
    return out


def new_model(vocab: int, args, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg)


def copy_of(model, vocab, args):
    m = new_model(vocab, args, 0)
    m.load_state_dict(model.state_dict())
    return m


def train(model, data: dict, *, steps: int, args, seed: int, select=None, stats=None):
    """AdamW, lr warm-up over 10 steps then constant, clip 1.0. select(logits, batch, step) ->
    SelectiveLossOutput; default: every target (selective_loss method 'none')."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n = data[S.INPUT_IDS].shape[0]
    order = np.random.default_rng(seed).permutation(n)
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(order[np.arange(step * args.batch, (step + 1) * args.batch) % n])
        batch = {k: v[idx] for k, v in data.items()}
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 10)
        logits = model(input_ids=batch[S.INPUT_IDS], position_ids=batch[S.POSITION_IDS], use_cache=False).logits
        out = select(logits, batch, step) if select else selective_loss(logits, batch, method="none")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if stats is not None:
            kept, noise = out.loss_mask.numpy(), batch["noise"].numpy()
            late = "_late" if step >= 0.2 * steps else ""  # after the first 20% (ssToken's warm-up)
            for suffix in ("", late):
                stats["noise_kept" + suffix] = stats.get("noise_kept" + suffix, 0.0) + float(noise[kept].sum())
                stats["noise_seen" + suffix] = stats.get("noise_seen" + suffix, 0.0) + float(
                    noise[batch[S.TARGET_MASK].numpy() == 1].sum())
            stats["relpos"] += float(batch["relpos"].numpy()[kept].sum())
            stats["kept"] += float(kept.sum())
    model.eval()
    return model


@torch.no_grad()
def heldout_loss(model, data: dict, batch: int = 64) -> float:
    total = count = 0.0
    for s in range(0, data[S.INPUT_IDS].shape[0], batch):
        b = {k: v[s:s + batch] for k, v in data.items()}
        logits = model(input_ids=b[S.INPUT_IDS], position_ids=b[S.POSITION_IDS], use_cache=False).logits
        out = selective_loss(logits, b, method="none")
        total += float(out.loss) * out.num_kept
        count += out.num_kept
    return total / count


def random_masks(docs: pa.Table, ratio: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for tm in docs.column(S.TARGET_MASK).to_pylist():
        t = np.flatnonzero(tm)
        m = np.zeros(len(tm), np.uint8)
        m[rng.choice(t, int(num_kept(ratio, t.size)), replace=False)] = 1
        out.append(m)
    return out


def with_column(docs: pa.Table, name: str, values: list[np.ndarray], pa_type) -> pa.Table:
    arr = pa.ListArray.from_arrays(docs.column(S.INPUT_IDS).combine_chunks().offsets,
                                   pa.array(np.concatenate(values), pa_type))
    docs = docs.drop_columns([name]) if name in docs.column_names else docs
    return docs.append_column(name, arr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--rows", type=int, default=3000, help="Alpaca rows (pretrain:reference:train:held-out = 2:1:1:1)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="packed rows per step")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--ref-steps", type=int, default=100)
    ap.add_argument("--warm-steps", type=int, default=20)
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--noisy-rows", type=float, default=0.5)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 OpenMP threads on a shared 2-core "
                    "machine ran 10x slower than 1)")
    ap.add_argument("--quick", action="store_true", help="small smoke run (~2 min)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.pretrain_steps, args.ref_steps = 800, 40, 15
        args.warm_steps, args.sft_steps, args.seeds = 5, 15, 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    rows = read_rows(args.data, args.rows)
    n = len(rows) // 5
    splits = rows[:2 * n], rows[2 * n:3 * n], rows[3 * n:4 * n], rows[4 * n:]
    tok = train_tokenizer([r["prompt"] + "\n" + r["response"] for r in splits[0]], args.vocab)
    vocab = tok.get_vocab_size()
    pre, ref_sft, clean_train, held = (encode(tok, r, args.seq_len, all_targets=i == 0) for i, r in enumerate(splits))
    train_docs, noise = add_noise(clean_train, vocab, args.noisy_rows, args.noise, seed=1234)
    say(f"docs: pretrain {pre.num_rows}, reference {ref_sft.num_rows}, train {train_docs.num_rows} "
        f"({sum(m.any() for m in noise)} noisy rows, {sum(int(m.sum()) for m in noise)} noisy of "
        f"{int(pa.compute.sum(pa.compute.list_flatten(train_docs.column(S.TARGET_MASK))).as_py())} targets), "
        f"held-out {held.num_rows}; vocab {vocab}")

    pack = dict(seq_len=args.seq_len, pad_id=tok.token_to_id(PAD))
    base = train(new_model(vocab, args, 0), tensors(pack_table(pre, **pack)[0], args.seq_len),
                 steps=args.pretrain_steps, args=args, seed=0)
    held_t = tensors(pack_table(held, **pack)[0], args.seq_len)
    say(f"base pretrained ({args.pretrain_steps} steps): held-out response loss {heldout_loss(base, held_t):.4f}")
    reference = train(copy_of(base, vocab, args), tensors(pack_table(ref_sft, **pack)[0], args.seq_len),
                      steps=args.ref_steps, args=args, seed=0)
    say(f"reference model ({args.ref_steps} clean SFT steps): held-out {heldout_loss(reference, held_t):.4f}")

    results = {arm: [] for arm in ARMS}
    # what the online criteria see: mean over training steps on noisy / clean targets
    diag = {m: np.zeros(4) for m in ("sstoken", "rho1")}  # sum noisy, n noisy, sum clean, n clean

    def note(method, values, b):
        t, noisy = b[S.TARGET_MASK].numpy() == 1, b["noise"].numpy()
        v = values.detach().float().cpu().numpy()
        diag[method] += [v[t & noisy].sum(), (t & noisy).sum(), v[t & ~noisy].sum(), (t & ~noisy).sum()]
    with tempfile.TemporaryDirectory() as root:
        paths = {k: os.path.join(root, k) for k in ("history", "reference", "current")}
        base.save_pretrained(paths["history"])
        reference.save_pretrained(paths["reference"])
        window = args.seq_len  # the select stage's window = pack.seq_len
        hist_docs = TokenScorer({"method": "sstoken", "history_model": paths["history"]}, window_len=window)(train_docs)
        ref_docs = TokenScorer({"method": "rho1", "reference_model": paths["reference"]}, window_len=window)(train_docs)
        relpos = []
        for tm in train_docs.column(S.TARGET_MASK).to_pylist():
            t = np.flatnonzero(tm)
            v = np.zeros(len(tm))
            v[t] = np.arange(t.size) / max(1, t.size - 1)
            relpos.append(v)
        say("stored ref_loss (history and reference models, fp32)")
        for seed in range(args.seeds):
            warm_data = tensors(pack_table(train_docs, **pack)[0], args.seq_len)
            train(copy_of(base, vocab, args), warm_data, steps=args.warm_steps, args=args,
                  seed=100 + seed).save_pretrained(paths["current"])
            static = TokenScorer({"method": "sstoken", "history_model": paths["history"],
                                  "current_model": paths["current"], "ratio": args.ratio},
                                 window_len=args.seq_len)(train_docs).column(S.LOSS_MASK)
            static = [np.array(m, np.uint8) for m in static.to_pylist()]
            arms = {"all tokens": (hist_docs, None), "random": (with_column(hist_docs, S.LOSS_MASK,
                    random_masks(train_docs, args.ratio, seed), pa.uint8()), None),
                    "Rho-1 online": (ref_docs, "rho1"), "ssToken online": (hist_docs, "sstoken"),
                    "ssToken offline mask": (with_column(hist_docs, S.LOSS_MASK, static, pa.uint8()), None)}
            for arm, (docs, method) in arms.items():
                rows_t, _ = pack_table(docs, **pack)
                data = tensors(rows_t, args.seq_len)
                data["noise"] = torch.from_numpy(per_token(rows_t, docs, noise, args.seq_len) > 0)
                data["relpos"] = torch.from_numpy(per_token(rows_t, docs, relpos, args.seq_len))
                model = copy_of(base, vocab, args)
                if method == "sstoken":
                    attention = enable_prompt_attention(model)
                    warm = int(0.2 * args.sft_steps)

                    def select(logits, b, step, attention=attention, warm=warm):
                        out = selective_loss(logits, b, method="sstoken", ratio=args.ratio, gamma=0.5,
                                             warmup=step < warm, attention=attention)
                        note("sstoken", b[S.REF_LOSS] - token_losses_from_logits(logits, b[S.INPUT_IDS]), b)  # REL
                        return out
                elif method == "rho1":
                    def select(logits, b, step):
                        out = selective_loss(logits, b, method="rho1", ratio=args.ratio)
                        note("rho1", out.scores, b)  # excess loss
                        return out
                elif arm == "all tokens":
                    select = None
                else:  # a static mask: train on the shard's loss_mask
                    def select(logits, b, step):
                        return selective_loss(logits, {**b, S.TARGET_MASK: b[S.LOSS_MASK]}, method="none")
                stats = dict(relpos=0.0, kept=0.0)
                train(model, data, steps=args.sft_steps, args=args, seed=seed, select=select, stats=stats)
                results[arm].append((heldout_loss(model, held_t), stats["noise_kept"] / max(1, stats["noise_seen"]),
                                     stats["relpos"] / max(1, stats["kept"]),
                                     stats["noise_kept_late"] / max(1, stats["noise_seen_late"])))
                say(f"seed {seed} {arm:22s} held-out {results[arm][-1][0]:.4f}  noisy kept "
                    f"{results[arm][-1][1]:.3f} (after the first 20% of steps {results[arm][-1][3]:.3f})  "
                    f"kept rel. position {results[arm][-1][2]:.3f}")

    print(f"\n{args.seeds} seeds x {args.sft_steps} steps x {args.batch} rows of {args.seq_len}, lr {args.lr}, "
          f"ratio {args.ratio}; noise: {args.noise:.0%} of response tokens in {args.noisy_rows:.0%} of rows")
    print("| arm | held-out clean response loss | noisy tokens kept (after the first 20% of steps) "
          "| kept tokens' mean relative position |")
    print("|---|---|---|---|")
    for arm, runs in results.items():
        a = np.array(runs)
        m, sd = a.mean(0), a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])
        print(f"| {arm} | {m[0]:.4f} ± {sd[0]:.4f} | {m[1]:.3f} ± {sd[1]:.3f} ({m[3]:.3f}) "
              f"| {m[2]:.3f} ± {sd[2]:.3f} |")
    for method, name in (("sstoken", "ssToken online: REL = history loss - live loss"),
                         ("rho1", "Rho-1 online: excess = live loss - reference loss")):
        d = diag[method]
        print(f"{name}, mean over training: noisy targets {d[0] / max(1, d[1]):+.3f} nats, "
              f"clean targets {d[2] / max(1, d[3]):+.3f} nats")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
