"""The issue's cluster config, run as written through `tokenmill run`, on documents the tests never use.

A rehearsal of the acceptance check for CLIMB domains. For each labelled set (AG News,
20 Newsgroups, DBpedia-14) it writes --n rows that bench_cluster_quality.py's sample
does not hold (drawn with a different seed from the rest of the file) to a temporary
JSONL file, runs the CLI on it with

    embed:   {max_seq_length: 256}                       # the shipped MiniLM
    cluster: {k_init: 1000, sample_size: 200000, merge: {num_domains: <number of labels>}}

and compares the NMI of the pipeline's `domain_id` (cluster/assignments/) with the labels
against plain k-means (k = number of labels; best of 10 starts, and 1 start) on the
embeddings the run stored in run_dir/embed/. k_init 1000 is clamped to the number of
documents when there are fewer. Runs are kept under --work (default: a temporary
directory) so a second call reuses the embeddings.

    .venv/bin/python benchmarks/bench_cluster_pipeline.py [--n 2000] [--seeds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from sklearn.metrics import normalized_mutual_info_score  # noqa: E402

from bench_cluster_quality import DATASETS, load_sample  # noqa: E402
from operators.cluster import kmeans_assign, kmeans_fit  # noqa: E402


def unseen_rows(name: str, n: int) -> list[dict]:
    """n rows of `name` outside bench_cluster_quality's seed-0 sample, drawn with seed 1."""
    seen = set(load_sample(name, DATASETS[name], seed=0)[0])
    every = load_sample(name, 10**9, seed=0)
    rest = [i for i, doc_id in enumerate(every[0]) if doc_id not in seen]
    picked = np.sort(np.random.default_rng(1).choice(len(rest), min(n, len(rest)), replace=False))
    return [{"id": every[0][rest[i]], "text": every[1][rest[i]], "label": every[2][rest[i]]} for i in picked]


def run_pipeline(work: Path, name: str, rows: list[dict], num_labels: int) -> Path:
    stem = name.split(".")[0]
    data, run_dir, config = work / f"{stem}.jsonl", work / f"run-{stem}", work / f"{stem}.yaml"
    data.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows))
    config.write_text(json.dumps({  # JSON is YAML
        "run_dir": str(run_dir),
        "sources": [{"path": str(data), "text_field": "text", "id_field": "id"}],
        "embed": {"max_seq_length": 256},
        "cluster": {"k_init": 1000, "sample_size": 200000, "merge": {"num_domains": num_labels}},
    }, indent=1))
    if not (run_dir / "cluster" / "_SUCCESS.json").is_file():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=ROOT, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return run_dir


def read_run(run_dir: Path) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """(ids, embeddings [N, D] in the same order, domain_id by id) from a finished run."""
    ids, xs = [], []
    for part in sorted((run_dir / "embed" / "parts").glob("*.arrow")):
        with pa.memory_map(str(part)) as f:
            t = pa.ipc.open_file(f).read_all()
        ids += t.column("id").to_pylist()
        emb = t.column("embedding").combine_chunks()
        xs.append(emb.flatten().to_numpy().reshape(len(t), -1))
    assign = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "cluster" / "assignments").glob("*.parquet"))])
    return ids, np.concatenate(xs), dict(zip(assign.column("id").to_pylist(), assign.column("domain_id").to_pylist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="unseen documents per labelled set")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the plain k-means ceiling")
    parser.add_argument("--work", default=None, help="keep runs here (default: a temporary directory)")
    args = parser.parse_args()
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    lines, ratios = [], []
    for name in DATASETS:
        rows = unseen_rows(name, args.n)
        label_of = {r["id"]: r["label"] for r in rows}
        num_labels = len(set(label_of.values()))
        run_dir = run_pipeline(work, name, rows, num_labels)
        ids, x, domain_of = read_run(run_dir)
        gold = np.unique([label_of[i] for i in ids], return_inverse=True)[1]
        domains = np.array([domain_of[i] for i in ids])
        pipeline = normalized_mutual_info_score(gold, domains)
        plain = {n_init: np.mean([normalized_mutual_info_score(gold, kmeans_assign(x, kmeans_fit(
            x, num_labels, seed=s, n_init=n_init))) for s in range(args.seeds)]) for n_init in (10, 1)}
        ratios.append(pipeline / plain[10])
        lines.append(f"{name.split('.')[0][:28]:<28} {len(ids):>5} {num_labels:>6} {plain[10]:>7.3f} {plain[1]:>7.3f} "
                     f"{pipeline:>9.3f} {pipeline / plain[10]:>6.3f} {pipeline / plain[1]:>6.3f}")
        print(lines[-1], flush=True)

    print(f"\nNMI vs labels on unseen documents; pipeline = `tokenmill run` with k_init 1000, sample_size 200000, "
          f"merge.num_domains = labels (refine on, the default); km(10)/km(1) = plain k-means on the run's "
          f"embeddings, k = labels, best of 10 / 1 start(s), mean of {args.seeds} seeds")
    print(f"{'dataset':<28} {'N':>5} {'labels':>6} {'km(10)':>7} {'km(1)':>7} {'pipeline':>9} {'/km10':>6} {'/km1':>6}")
    print("\n".join(lines))
    print(f"{'mean ratio to km(10)':<67}{np.mean(ratios):>6.3f}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
