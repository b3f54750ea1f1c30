"""DataTrove 0.10.1's four-stage MinHash pipeline on a folder of JSON Lines files: the peer
of `bench_dedup.py`. Runs only in the cached DataTrove venv that bench_dedup.py builds
(benchmarks/.cache/datatrove-0.10.1/), never imports tokenmill.

    benchmarks/.cache/datatrove-0.10.1/bin/python benchmarks/peer_datatrove_minhash.py \
        --input DIR --work DIR --out result.json [--shingle 5 --bands 14 --rows 8 --seed 1]

Settings: DataTrove's own defaults (English spaCy word tokenizer, its text normalisation,
64-bit xxhash shingles) with the shingle size, bands and rows given. One task per input
file for stages 1 and 4, one per band for stage 2, one for stage 3; `workers=1`, so every
task runs in this process, one after another (the same single core as our side).
Writes {"seconds": {stage: s}, "removed": [ids]} to --out.
"""
import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shingle", type=int, default=5)
    ap.add_argument("--bands", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    from datatrove.utils.typeshelper import Languages

    files = sorted(f for f in os.listdir(args.input) if f.endswith(".jsonl"))
    config = MinhashConfig(n_grams=args.shingle, num_buckets=args.bands, hashes_per_bucket=args.rows, seed=args.seed)
    w = args.work

    def reader():
        return JsonlReader(args.input, glob_pattern="*.jsonl", text_key="text", id_key="id")

    stages = {
        "signatures": LocalPipelineExecutor(
            pipeline=[reader(), MinhashDedupSignature(output_folder=f"{w}/signatures", config=config,
                                                      language=Languages.english)],
            tasks=len(files), workers=1, logging_dir=f"{w}/logs/signatures"),
        "buckets": LocalPipelineExecutor(
            pipeline=[MinhashDedupBuckets(input_folder=f"{w}/signatures", output_folder=f"{w}/buckets",
                                          config=config)],
            tasks=config.num_buckets, workers=1, logging_dir=f"{w}/logs/buckets"),
        "cluster": LocalPipelineExecutor(
            pipeline=[MinhashDedupCluster(input_folder=f"{w}/buckets", output_folder=f"{w}/remove_ids",
                                          config=config)],
            tasks=1, workers=1, logging_dir=f"{w}/logs/cluster"),
        "filter": LocalPipelineExecutor(
            pipeline=[reader(), MinhashDedupFilter(input_folder=f"{w}/remove_ids",
                                                   exclusion_writer=JsonlWriter(f"{w}/removed", compression=None)),
                      JsonlWriter(f"{w}/kept", compression=None)],
            tasks=len(files), workers=1, logging_dir=f"{w}/logs/filter"),
    }
    seconds = {}
    for name, executor in stages.items():
        start = time.perf_counter()
        executor.run()
        seconds[name] = time.perf_counter() - start
    removed = []
    for name in sorted(os.listdir(f"{w}/removed")):
        with open(os.path.join(w, "removed", name)) as f:
            removed += [json.loads(line)["id"] for line in f]
    with open(args.out, "w") as f:
        json.dump({"seconds": seconds, "removed": removed}, f)


if __name__ == "__main__":   # the local executor re-imports this module in its workers
    main()
