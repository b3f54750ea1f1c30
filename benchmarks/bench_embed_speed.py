"""Documents/s of the DocumentEmbedder operator vs a bare SentenceTransformer.encode.

Same documents, same model directory, same torch threads, same batch size, same run.
The ceiling is `SentenceTransformer.encode(texts, normalize_embeddings=True)` on a
Python list; the operator is timed end to end on an Arrow table (text extraction, its
own length sort, encode, fp32 normalisation, building the fixed_size_list column).
Runs alternate (ceiling, operator, ceiling, ...) and the best of --repeats counts, so
load from other processes on the machine hurts both sides alike. Target: ratio >= 0.9.

On CUDA both sides run in the dtype the operator picks (bf16 where supported), and the
GPU utilisation (NVML, sampled every 50 ms while the operator runs) is printed too.
`--large` swaps in a BERT-base-sized encoder (768 wide, 12 layers, randomly initialised
with the model's own tokenizer, built at run time: nothing is downloaded) to show how
throughput scales with model size; its vectors are meaningless, its speed is not.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_embed_speed.py --n 512 --threads 2
    python benchmarks/bench_embed_speed.py --device cuda --n 8192 --batch-size 256 [--large] [--workers 4]

`--workers P` (CUDA) then also runs P operator processes side by side on one GPU, each on
its own 1/P of the texts, as P embed actors with `num_gpus: 1/P` would: the aggregate
docs/s and the GPU utilisation show whether the GPU or the tokenizer (CPU) is the limit.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from operators import schema  # noqa: E402
from operators.embed import DocumentEmbedder, default_model_path, embedding_matrix  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def read_texts(name: str, n: int) -> list[str]:
    """The first n texts of a JSONL file: a name in ../shared/data (.zst) or any plain .jsonl path."""
    path = Path(name) if Path(name).is_file() else DATA / name
    texts = []
    with open(path, "rb") as fh:
        if path.suffix == ".zst":
            import zstandard
            fh = zstandard.ZstdDecompressor().stream_reader(fh)
        for line in io.TextIOWrapper(fh, encoding="utf-8"):
            texts.append(json.loads(line)["text"])
            if len(texts) == n:
                break
    return texts


def build_large_encoder(tokenizer_dir: str, out_dir: str) -> str:
    """A BERT-base-sized sentence-transformers model (mean pooling) using tokenizer_dir's tokenizer."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=768, num_hidden_layers=12,
                                num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512))
    bert.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    word = models.Transformer(out_dir)
    SentenceTransformer(modules=[word, models.Pooling(768, "mean")]).save(out_dir)
    return out_dir


class GpuUtilisation:
    """Mean NVML GPU utilisation (%) over the with-block, sampled every `period` seconds."""

    def __init__(self, period: float = 0.05):
        import pynvml
        pynvml.nvmlInit()
        self.nvml, self.handle, self.period = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), period
        self.samples: list[int] = []

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(self.period):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def _worker(model: str, texts: list[str], max_seq_length: int, batch_size: int, threads: int,
            barrier, results) -> None:
    """One side-by-side operator process: load, warm up, wait for the others, then time one pass."""
    torch.set_num_threads(threads)
    embedder = DocumentEmbedder(model=model, max_seq_length=max_seq_length, batch_size=batch_size, device="cuda")
    embedder.setup()
    embedder.embed_texts(texts[:batch_size])
    torch.cuda.synchronize()
    barrier.wait()
    start = time.time()
    embedder.embed_texts(texts)
    results.put((start, time.time()))


def side_by_side(model: str, texts: list[str], workers: int, args) -> tuple[float, float]:
    """(aggregate docs/s, mean GPU utilisation %) of `workers` operator processes on one GPU."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(model, texts[w::workers], args.max_seq_length, args.batch_size,
                                               max(1, args.threads // workers), barrier, results))
             for w in range(workers)]
    for p in procs:
        p.start()
    barrier.wait()
    with GpuUtilisation() as monitor:
        spans = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return len(texts) / (max(e for _, e in spans) - min(s for s, _ in spans)), monitor.mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="news_agnews_5k.jsonl.zst")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, help="model directory (default: the shipped MiniLM)")
    parser.add_argument("--large", action="store_true", help="a BERT-base-sized encoder instead (see above)")
    parser.add_argument("--workers", type=int, default=1, help="also run this many operator processes on one GPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    texts = read_texts(args.file, args.n)
    table = pa.table({schema.ID: [str(i) for i in range(len(texts))], schema.TEXT: texts,
                      schema.PROMPT: pa.nulls(len(texts), pa.string()),
                      schema.RESPONSE: pa.nulls(len(texts), pa.string())})
    tmp = tempfile.TemporaryDirectory()
    model = args.model or default_model_path()
    if args.large:
        model = build_large_encoder(model, tmp.name)
    embedder = DocumentEmbedder(model=model, max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                                device=args.device)
    embedder.setup()
    raw = SentenceTransformer(model, device=args.device, local_files_only=True)
    raw.to(getattr(torch, embedder.resolved_dtype))  # the same precision on both sides
    raw.max_seq_length = args.max_seq_length
    cuda = args.device.startswith("cuda")

    def run_raw() -> np.ndarray:
        return raw.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)

    def run_operator() -> np.ndarray:
        return embedding_matrix(embedder(table))

    run_raw(), run_operator()  # warm-up (first-call allocations, thread pools) is not measured
    best = {"raw": np.inf, "operator": np.inf}
    outputs, utilisation = {}, []
    for _ in range(args.repeats):
        for side, fn in (("raw", run_raw), ("operator", run_operator)):
            monitor = GpuUtilisation() if cuda and side == "operator" else None
            start = time.perf_counter()
            if monitor:
                with monitor:
                    outputs[side] = fn()
                utilisation.append(monitor.mean)
            else:
                outputs[side] = fn()
            best[side] = min(best[side], time.perf_counter() - start)

    raw_rate, op_rate = len(texts) / best["raw"], len(texts) / best["operator"]
    max_diff = float(np.abs(np.asarray(outputs["raw"], np.float32) - outputs["operator"]).max())
    print(f"{args.file}: {len(texts)} docs, model {'BERT-base-sized (random)' if args.large else model}, "
          f"{args.device} {embedder.resolved_dtype}, {args.threads} threads, batch {args.batch_size}, "
          f"max_seq_length {args.max_seq_length}, best of {args.repeats}")
    print(f"SentenceTransformer.encode (ceiling): {raw_rate:8.1f} docs/s")
    print(f"DocumentEmbedder (table in/out):      {op_rate:8.1f} docs/s")
    print(f"ratio operator / ceiling:             {op_rate / raw_rate:8.3f}   (target >= 0.9)")
    print(f"max |difference| of the vectors:      {max_diff:.2e}")
    if cuda:
        print(f"GPU utilisation during the operator:  {np.mean(utilisation):8.1f} %  "
              f"({torch.cuda.get_device_name(0)})")
        if args.workers > 1:
            rate, util = side_by_side(model, texts, args.workers, args)
            print(f"{args.workers} operator processes on the GPU:  {rate:8.1f} docs/s together "
                  f"({rate / op_rate:.2f}x one), GPU utilisation {util:.1f} %")


if __name__ == "__main__":
    main()
