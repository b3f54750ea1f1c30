"""Documents/s of the DocumentEmbedder operator vs a bare SentenceTransformer.encode.

Same documents, same model directory, same torch threads, same batch size, same run.
The ceiling is `SentenceTransformer.encode(texts, normalize_embeddings=True)` on a
Python list; the operator is timed end to end on an Arrow table (text extraction, its
own length sort, encode, fp32 normalisation, building the fixed_size_list column).
Runs alternate (ceiling, operator, ceiling, ...) and the best of --repeats counts, so
load from other processes on the machine hurts both sides alike. Target: ratio >= 0.9.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_embed_speed.py --n 512 --threads 2
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

from operators import schema  # noqa: E402
from operators.embed import DocumentEmbedder, default_model_path, embedding_matrix  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def read_texts(name: str, n: int) -> list[str]:
    texts = []
    with open(DATA / name, "rb") as fh:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8"):
            texts.append(json.loads(line)["text"])
            if len(texts) == n:
                break
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="news_agnews_5k.jsonl.zst")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    texts = read_texts(args.file, args.n)
    table = pa.table({schema.ID: [str(i) for i in range(len(texts))], schema.TEXT: texts,
                      schema.PROMPT: pa.nulls(len(texts), pa.string()),
                      schema.RESPONSE: pa.nulls(len(texts), pa.string())})
    raw = SentenceTransformer(default_model_path(), device="cpu", local_files_only=True)
    raw.max_seq_length = args.max_seq_length
    embedder = DocumentEmbedder(max_seq_length=args.max_seq_length, batch_size=args.batch_size, device="cpu")
    embedder.setup()

    def run_raw() -> np.ndarray:
        return raw.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)

    def run_operator() -> np.ndarray:
        return embedding_matrix(embedder(table))

    run_raw(), run_operator()  # warm-up (first-call allocations, thread pools) is not measured
    best = {"raw": np.inf, "operator": np.inf}
    outputs = {}
    for _ in range(args.repeats):
        for side, fn in (("raw", run_raw), ("operator", run_operator)):
            start = time.perf_counter()
            outputs[side] = fn()
            best[side] = min(best[side], time.perf_counter() - start)

    raw_rate, op_rate = len(texts) / best["raw"], len(texts) / best["operator"]
    max_diff = float(np.abs(outputs["raw"] - outputs["operator"]).max())
    print(f"{args.file}: {len(texts)} docs, {args.threads} threads, batch {args.batch_size}, "
          f"max_seq_length {args.max_seq_length}, best of {args.repeats}")
    print(f"SentenceTransformer.encode (ceiling): {raw_rate:8.1f} docs/s")
    print(f"DocumentEmbedder (table in/out):      {op_rate:8.1f} docs/s")
    print(f"ratio operator / ceiling:             {op_rate / raw_rate:8.3f}   (target >= 0.9)")
    print(f"max |difference| of the vectors:      {max_diff:.2e}")


if __name__ == "__main__":
    main()
