"""Scoring throughput: TokenScorer vs a raw forward pass of the same two models.

Ceiling: the two models' plain forward passes (HF default SDPA attention, logits in the
model's dtype) on exactly the batches TokenScorer forms, measured in the same run, with
separately loaded copies of the same weights. The scorer adds the fp32 output layer (on a
bf16 model), the cross-entropy, the last-layer attention recomputation (ssToken), the
ref_loss column, selection and Arrow in/out; target >= 0.85 of the ceiling. Each figure is the best
of --repeats interleaved runs, because the machine is shared.

On CUDA it also reports the fraction of bf16 dense peak reached, with FLOPs counted
as 2 * (non-embedding params + lm_head) per token per model plus 4 * layers *
hidden * T/2 per token for causal attention.

    python benchmarks/bench_score.py                      # CPU, small models, ~1 min
    python benchmarks/bench_score.py --model-size base    # ~130M-param Llama pair, for a GPU
    python benchmarks/bench_score.py --model-size 1b      # ~0.9B-param pair
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from operators import schema  # noqa: E402
from operators.score import TokenScorer, length_batches, load_causal_lm  # noqa: E402
from operators.select_config import SelectConfig  # noqa: E402

# name: (hidden, layers, heads, kv_heads, vocab)
SIZES = {"tiny": (64, 2, 2, 2, 512), "small": (256, 4, 4, 4, 8192), "base": (768, 12, 12, 12, 32000),
         "1b": (2048, 16, 16, 16, 32000)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def make_models(root: str, size: str) -> tuple[str, str, int]:
    from transformers import AutoModelForCausalLM, LlamaConfig
    hidden, layers, heads, kv, vocab = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    paths = []
    for seed, name in ((0, "current"), (1, "other")):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(os.path.join(root, name))
        paths.append(os.path.join(root, name))
    return paths[0], paths[1], vocab


def make_table(num_docs: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, num_docs)
    ids = [rng.integers(0, vocab, n).tolist() for n in lengths]
    tms = [(np.arange(n) >= max(1, int(n * rng.uniform(0.1, 0.5)))).astype(np.uint8).tolist() for n in lengths]
    return pa.table({schema.ID: [f"d{i}" for i in range(num_docs)],
                     schema.INPUT_IDS: pa.array(ids, pa.list_(pa.int32())),
                     schema.TARGET_MASK: pa.array(tms, pa.list_(pa.uint8()))})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def raw_forward(models, table: pa.Table, batch_tokens: int, device: str) -> None:
    """The ceiling: forward both models over the same length-sorted padded batches."""
    seqs = [np.asarray(x, dtype=np.int64) for x in table.column(schema.INPUT_IDS).to_pylist()]
    lengths = np.array([len(s) for s in seqs])
    for idx in length_batches(lengths, batch_tokens):
        L = lengths[idx]
        ids = np.zeros((idx.size, L.max()), np.int64)
        for r, i in enumerate(idx):
            ids[r, :L[r]] = seqs[i]
        ids_t = torch.from_numpy(ids).to(device)
        mask = (torch.arange(ids.shape[1], device=device)[None] < torch.from_numpy(L).to(device)[:, None]).long()
        for m in models:
            m(input_ids=ids_t, attention_mask=mask, use_cache=False).logits


def flops_per_token(model, mean_len: float) -> float:
    c = model.config
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 2 * params + 4 * c.num_hidden_layers * c.hidden_size * mean_len / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", choices=sorted(SIZES), default="small")
    ap.add_argument("--method", choices=["sstoken", "rho1"], default="sstoken")
    ap.add_argument("--num-docs", type=int, default=None, help="default: 32 on CPU, 512 on CUDA")
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=None, help="default: 256 on CPU, 2048 on CUDA")
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: 4096 on CPU, 16384 on CUDA")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak, overrides the table")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    num_docs = args.num_docs or (512 if gpu else 32)
    max_len = args.max_len or (2048 if gpu else 256)
    batch_tokens = args.batch_tokens or (16384 if gpu else 4096)

    with tempfile.TemporaryDirectory() as root:
        cur_path, other_path, vocab = make_models(root, args.model_size)
        other_key = "history_model" if args.method == "sstoken" else "reference_model"
        config = SelectConfig(method=args.method, current_model=cur_path, device=device, batch_tokens=batch_tokens,
                              **{other_key: other_path})
        scorer = TokenScorer(config)
        scorer.setup()
        dtype = torch.bfloat16 if gpu else torch.float32
        models = tuple(load_causal_lm(p, device=device, dtype=dtype, float32_head=False)  # plain forward
                       for p in (cur_path, other_path))
        table = make_table(num_docs, args.min_len, max_len, vocab)
        num_tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column(schema.INPUT_IDS))).as_py())
        warm = table.slice(0, min(4, num_docs))
        scorer(warm), raw_forward(models, warm, batch_tokens, device)  # warm-up: allocator, kernels

        best = {"scorer": float("inf"), "raw": float("inf")}
        for _ in range(args.repeats):
            for name, fn in (("raw", lambda: raw_forward(models, table, batch_tokens, device)),
                             ("scorer", lambda: scorer(table))):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                best[name] = min(best[name], time.perf_counter() - t0)

    n_params = sum(p.numel() for p in models[0].parameters())
    raw_tps, sc_tps = num_tokens / best["raw"], num_tokens / best["scorer"]
    print(f"device={device} model-size={args.model_size} ({n_params / 1e6:.1f}M params x 2 models) "
          f"method={args.method} docs={num_docs} tokens={num_tokens} batch_tokens={batch_tokens} "
          f"threads={torch.get_num_threads()}")
    print(f"raw forward (ceiling): {raw_tps:,.0f} tokens/s  ({best['raw']:.3f} s)")
    print(f"TokenScorer          : {sc_tps:,.0f} tokens/s  ({best['scorer']:.3f} s)")
    ratio = sc_tps / raw_tps
    print(f"ratio vs ceiling     : {ratio:.3f}  (target >= 0.85: {'PASS' if ratio >= 0.85 else 'FAIL'})")
    if gpu:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
            (v for k, v in PEAK_BF16.items() if k in name), None)
        mean_len = num_tokens / num_docs
        flops = sum(flops_per_token(m, mean_len) for m in models) * num_tokens
        if peak:
            print(f"fraction of bf16 peak ({name}, {peak / 1e12:.0f} TFLOP/s): scorer "
                  f"{flops / best['scorer'] / peak:.3f}, raw {flops / best['raw'] / peak:.3f}")
        else:
            print(f"unknown peak for {name}: pass --peak-tflops")


if __name__ == "__main__":
    main()
