"""Does CLIMB's k-means -> Ward merge find the labelled topics as well as plain k-means?

For AG News (4 labels), 20 Newsgroups (20) and DBpedia-14 (14), each separately, on a
seeded random subsample: embed with DocumentEmbedder (cached under benchmarks/.cache/),
then compare normalized mutual information with the gold labels of

* the ceiling: plain k-means with k = number of labels (scikit-learn, best of
  n_init=10 restarts); also printed: k-means with one k-means++ start (n_init=1, the
  library default and what the pipeline's own k-means does), and
* the pipeline: fit_clusters with k_init clusters and merge {num_domains: number of
  labels}, for several k_init values, no pruning unless --prune is given, twice: "ward"
  (merge.refine false: each domain is a union of k_init clusters, as in the paper) and
  "refined" (the default: the Ward merges seed Lloyd iterations over the documents,
  merge.restarts of them, lowest within-domain SSE kept).

With --prune MIN, clusters whose mean heuristic quality is below MIN are pruned and their
documents are EXCLUDED from the pipeline's NMI (coverage is printed); the ceiling is
always computed on every document. Each figure is the mean over --seeds seeds (the seed
of every k-means, subset and restart), +- its standard error.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_cluster_quality.py
"""
from __future__ import annotations

import argparse
import hashlib
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
import zstandard  # noqa: E402
from sklearn.metrics import normalized_mutual_info_score  # noqa: E402

from operators.cluster_config import ClusterConfig, MergeConfig, PruneConfig  # noqa: E402
from operators.cluster import PRUNED, assign_domains, fit_clusters, kmeans_assign, kmeans_fit  # noqa: E402
from operators.quality import heuristic_scores  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "benchmarks" / ".cache"
DATASETS = {  # file -> default subsample size (20NG posts are long: ~4x slower to embed)
    "news_agnews_5k.jsonl.zst": 3000,
    "news_20newsgroups_train.jsonl.zst": 2000,
    "encyclopedia_dbpedia14_9800.jsonl.zst": 3000,
}


def load_sample(name: str, n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(ids, texts, labels) of n rows drawn uniformly with `seed` (files may be sorted by label)."""
    with open(DATA / name, "rb") as fh:
        rows = [json.loads(line) for line in
                io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")]
    picked = np.sort(np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False))
    return ([rows[i]["id"] for i in picked], [rows[i]["text"] for i in picked], [rows[i]["label"] for i in picked])


def embeddings(name: str, ids: list[str], texts: list[str], model: str | None, max_seq_length: int) -> np.ndarray:
    """float32 [N, D], cached by file + n + model + max_seq_length (+ a hash of the ids)."""
    from operators.embed import DocumentEmbedder, default_model_path

    model_key = Path(model or default_model_path()).name
    ids_hash = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:10]
    key = f"{name.split('.')[0]}-n{len(ids)}-{model_key}-L{max_seq_length}-{ids_hash}"
    path = CACHE / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    embedder = DocumentEmbedder(model=model, max_seq_length=max_seq_length)
    embedder.setup()
    start = time.perf_counter()
    x = embedder.embed_texts(texts)
    print(f"  embedded {len(texts)} docs of {name} in {time.perf_counter() - start:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    return x


def mean_se(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values) / np.sqrt(len(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="docs per file (default: 3000, 2000 for 20NG)")
    parser.add_argument("--k-init", type=int, nargs="+", default=[50, 200, 1000],
                        help="k-means clusters before the merge (clamped to the number of documents)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--prune", type=float, default=None, help="min_quality; off by default")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-seq-length", type=int, default=256)
    args = parser.parse_args()
    seeds = range(args.seeds)
    variants = [(k, refine) for k in args.k_init for refine in (False, True)]

    def label(k: int, refine: bool) -> str:
        return f"{'refined' if refine else 'ward'}@{k}"

    header = (f"{'dataset':<22} {'N':>5} {'L':>3} {'km(10)':>13} {'km(1)':>6} "
              + " ".join(f"{label(k, r):>13} {'ratio':>5}" for k, r in variants))
    lines, ratios = [], {v: [] for v in variants}
    for name, default_n in DATASETS.items():
        ids, texts, labels = load_sample(name, args.n or default_n, seed=0)
        x = embeddings(name, ids, texts, args.model, args.max_seq_length)
        gold = np.unique(labels, return_inverse=True)[1]
        num_labels = int(gold.max()) + 1
        quality = heuristic_scores(texts) if args.prune is not None else None

        (ceiling, ceiling_se), (single_start, _) = (mean_se([normalized_mutual_info_score(
            gold, kmeans_assign(x, kmeans_fit(x, num_labels, seed=s, n_init=n_init))) for s in seeds])
            for n_init in (10, 1))
        row = (f"{name.split('.')[0][:22]:<22} {len(x):>5} {num_labels:>3} {ceiling:>6.3f}+-{ceiling_se:.3f} "
               f"{single_start:>6.3f} ")
        for k, refine in variants:
            scores, coverage = [], []
            for s in seeds:
                config = ClusterConfig(k_init=min(k, len(x)), sample_size=len(x), seed=s,
                                       prune=None if args.prune is None else PruneConfig(min_quality=args.prune),
                                       merge=MergeConfig(num_domains=num_labels, refine=refine))
                _, domain = assign_domains(x, fit_clusters(x, config, quality_N=quality))
                kept = domain != PRUNED  # pruned documents are excluded from the NMI
                scores.append(normalized_mutual_info_score(gold[kept], domain[kept]))
                coverage.append(kept.mean())
            nmi, se = mean_se(scores)
            ratios[(k, refine)].append(nmi / ceiling)
            row += f" {nmi:>6.3f}+-{se:.3f} {nmi / ceiling:>5.3f}"
            if args.prune is not None:
                row += f" (kept {np.mean(coverage):.0%})"
        lines.append(row)
        print(row, flush=True)

    print(f"\nNMI vs gold labels, mean +- standard error over {args.seeds} seeds; km(10)/km(1): plain k-means, "
          "k = labels, best of 10 / 1 start(s); ward@K: k_init=K, Ward cut, no refinement; refined@K: the "
          "default merge (refine, 10 restarts); ratio = pipeline / km(10), the ceiling"
          + ("" if args.prune is None else f"; pruning at min_quality {args.prune}, pruned docs excluded"))
    print(header)
    print("\n".join(lines))
    print(f"{'mean ratio':<57}" + " ".join(f"{'':>13} {np.mean(ratios[v]):>5.3f}" for v in variants))


if __name__ == "__main__":
    main()
