"""CLIMB preprocessing stages: embed (actor pool), cluster fit (one task), assign (tasks).

    embed/                parts/<part>.arrow  (id, embedding[, quality]); kept so re-clustering never re-embeds
    cluster/fit/          centroids.npy, cluster_fit.json[, domain_centroids.npy]
                          (k-means on a sample, prune, Ward merge, refinement of the merged domains)
    cluster/assignments/  <part>.parquet  (id, cluster_id, domain_id; null domain = pruned cluster)
    cluster/clusters.json per-cluster and per-domain sizes, token counts, top TF-IDF terms, examples

Downstream, tokenize joins `domain_id` onto each part; documents of pruned
clusters are counted as filtered there, and packed rows carry `domain_ids`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import schema as S
from operators.cluster import PRUNED
from pipeline import sink, storage
from pipeline.config import Config
from pipeline.stages import INTERMEDIATE_COMPRESSION, RunLayout, write_marker


def cluster_config(config: Config):
    from operators.climb_config import ClusterConfig
    c = config.cluster
    return ClusterConfig.from_dict({"k_init": c.k_init, "sample_size": c.sample_size, "seed": c.seed,
                                    "prune": c.prune.model_dump() if c.prune else None,
                                    "merge": c.merge.model_dump(exclude_none=True)})


class EmbedWorker:
    """One actor of the embed stage: the sentence-transformers model loads once."""

    def __init__(self, *, config: Config, run_dir: str, threads: int = 1):
        import torch
        from operators.embed import DocumentEmbedder
        from operators.quality import QualityScorer
        torch.set_num_threads(max(1, threads))  # Ray sets 1 thread per worker; use what the actor reserved
        e = config.embed
        self.layout = RunLayout(run_dir)
        self.embedder = DocumentEmbedder(model=e.model, max_seq_length=e.max_seq_length, batch_size=e.batch_size,
                                         device=e.device, dtype=e.dtype)
        self.embedder.setup()
        prune = config.cluster.prune if config.cluster else None
        self.quality = QualityScorer(classifier=prune.classifier) if prune else None

    def __call__(self, item: dict) -> dict:
        docs = sink.read_table(self.layout.part("read", item["name"]))
        out = self.embedder(docs.select([S.ID, S.TEXT, S.PROMPT, S.RESPONSE]))
        if self.quality is not None:
            out = self.quality(out)
        out = out.drop_columns([S.TEXT, S.PROMPT, S.RESPONSE])
        sink.write_table(self.layout.part("embed", item["name"]), out, compression=INTERMEDIATE_COMPRESSION,
                         rows_per_batch=1 << 16)
        result = {"item": item["name"], "rows_in": docs.num_rows, "rows_out": out.num_rows, "rows_filtered": 0,
                  "rows_quarantined": 0, "worker": worker_identity()}
        write_marker(self.layout.done_marker("embed", item["name"]), result)
        return result


def worker_identity() -> dict:
    """Which process and which (logical) GPUs ran an item: recorded in its marker."""
    import ray
    return {"pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def _sample_rows(parts: list[dict], size: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded uniform sample of documents, as row indices per part (sorted)."""
    counts = np.array([p["rows"] for p in parts])
    total = int(counts.sum())
    chosen = np.arange(total) if total <= size else np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
    starts = np.r_[0, np.cumsum(counts)]
    part_of = np.searchsorted(starts, chosen, side="right") - 1
    return {parts[i]["name"]: chosen[part_of == i] - starts[i] for i in np.unique(part_of)}


def cluster_fit_item(config: Config, run_dir: str, item: dict) -> dict:
    """The global fit: k-means on a sample of the stored embeddings, prune, merge."""
    from operators.cluster import fit_clusters
    from operators.embed import embedding_matrix
    layout = RunLayout(run_dir)
    rows = _sample_rows(item["parts"], config.cluster.sample_size, config.cluster.seed)
    xs, qs = [], []
    for name, idx in rows.items():
        t = sink.read_table(layout.part("embed", name)).take(pa.array(idx))
        xs.append(embedding_matrix(t))
        if S.QUALITY in t.column_names:
            qs.append(t.column(S.QUALITY).to_numpy())
    fit = fit_clusters(np.concatenate(xs), cluster_config(config), quality_N=np.concatenate(qs) if qs else None)
    with tempfile.TemporaryDirectory() as tmp:
        names = fit.save(tmp)  # cluster_fit.json last: load_fit reads it to know the others
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_atomic(layout.path("cluster", "fit", name), f.read())
    n = sum(len(v) for v in rows.values())
    result = {"item": item["name"], "rows_in": n, "rows_out": n, "rows_filtered": 0, "rows_quarantined": 0,
              "num_clusters": fit.num_clusters, "num_domains": fit.num_domains}
    write_marker(layout.done_marker("cluster/fit", item["name"]), result)
    return result


_FITS: dict[str, object] = {}


def load_fit(layout: RunLayout):
    from operators.cluster import ClusterFit
    meta = storage.read_bytes(layout.path("cluster", "fit", "cluster_fit.json"))
    files = {name: storage.read_bytes(layout.path("cluster", "fit", name)) for name in ClusterFit.files(json.loads(meta))}
    key = hashlib.sha256(b"".join(files[name] for name in sorted(files))).hexdigest()  # a re-fit is a new fit
    if key not in _FITS:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            _FITS[key] = ClusterFit.load(tmp)
    return _FITS[key]


def assignment_path(layout: RunLayout, part: str) -> str:
    return layout.path("cluster", "assignments", f"{part}.parquet")


def cluster_assign_item(config: Config, run_dir: str, item: dict) -> dict:
    """Assign every document of one part to its cluster and domain; count docs and words per cluster."""
    from operators.cluster import ClusterAssigner
    from operators.cluster_report import cluster_counts, whitespace_word_counts
    layout = RunLayout(run_dir)
    fit = load_fit(layout)
    assigner = ClusterAssigner(fit_dir="")
    assigner.fit = fit
    emb = sink.read_table(layout.part("embed", item["name"]))
    out = assigner(emb.select([S.ID, S.EMBEDDING])).drop_columns([S.EMBEDDING])
    buf = pa.BufferOutputStream()
    pq.write_table(out, buf, compression="zstd")
    storage.write_atomic(assignment_path(layout, item["name"]), buf.getvalue().to_pybytes())
    docs = sink.read_table(layout.part("read", item["name"]))
    texts = pa.compute.coalesce(docs.column(S.TEXT), pa.compute.binary_join_element_wise(
        docs.column(S.PROMPT), docs.column(S.RESPONSE), "\n\n"))
    words_N = whitespace_word_counts(texts)
    num_docs_K, num_words_K = cluster_counts(out.column(S.CLUSTER_ID).to_numpy(), words_N, fit.num_clusters)
    domain_N = out.column(S.DOMAIN_ID).fill_null(PRUNED).to_numpy()
    kept = domain_N != PRUNED
    num_docs_D, num_words_D = cluster_counts(domain_N[kept], words_N[kept], fit.num_domains)
    result = {"item": item["name"], "rows_in": emb.num_rows, "rows_out": out.num_rows, "rows_filtered": 0,
              "rows_quarantined": 0, "num_docs": num_docs_K.tolist(), "num_words": num_words_K.tolist(),
              "num_docs_domain": num_docs_D.tolist(), "num_words_domain": num_words_D.tolist()}
    write_marker(layout.done_marker("cluster/assign", item["name"]), result)
    return result


def domain_columns(layout: RunLayout, part: str) -> dict[str, pa.ChunkedArray]:
    """cluster_id and domain_id of a part's documents, in the part's row order."""
    with storage.open_random_access(assignment_path(layout, part)) as f:
        t = pq.read_table(f)
    return {S.CLUSTER_ID: t.column(S.CLUSTER_ID), S.DOMAIN_ID: t.column(S.DOMAIN_ID)}


def write_cluster_report(config: Config, layout: RunLayout, parts: list[dict], assign_results: list[dict]) -> dict:
    """clusters.json from the corpus-wide counts and a sample of documents read back."""
    from operators.cluster_report import build_cluster_report
    fit = load_fit(layout)
    num_docs_K, num_words_K, num_docs_D, num_words_D = (np.sum([r[key] for r in assign_results], axis=0) for key in
                                                        ("num_docs", "num_words", "num_docs_domain", "num_words_domain"))
    ids, texts, cids, dids = [], [], [], []
    for name, idx in _sample_rows(parts, config.cluster.report_sample, config.cluster.seed + 1).items():
        docs = sink.read_table(layout.part("read", name)).take(pa.array(idx))
        ids += docs.column(S.ID).to_pylist()
        texts += [t if t is not None else f"{p}\n\n{r}" for t, p, r in zip(
            docs.column(S.TEXT).to_pylist(), docs.column(S.PROMPT).to_pylist(), docs.column(S.RESPONSE).to_pylist())]
        columns = domain_columns(layout, name)
        cids.append(columns[S.CLUSTER_ID].to_numpy()[idx])
        dids.append(columns[S.DOMAIN_ID].fill_null(PRUNED).to_numpy()[idx])
    report = build_cluster_report(fit, num_docs_K=num_docs_K, num_tokens_K=num_words_K, num_docs_D=num_docs_D,
                                  num_tokens_D=num_words_D, token_unit="whitespace_words",
                                  sample_cluster_ids_S=np.concatenate(cids), sample_domain_ids_S=np.concatenate(dids),
                                  sample_ids_S=ids, sample_texts_S=texts, seed=config.cluster.seed)
    storage.write_text_atomic(layout.path("cluster", "clusters.json"), json.dumps(report, indent=1) + "\n")
    return report


def describe_domains(report: dict, limit: int = 30) -> str:
    lines = [f"{report['num_domains']} domains from {report['num_clusters']} clusters "
             f"({report['num_docs_pruned']} documents in pruned clusters):"]
    for d in sorted(report["domains"], key=lambda d: -d["num_docs"])[:limit]:
        lines.append(f"  domain {d['domain_id']:>3}: {d['num_docs']:>7} docs  {', '.join(d['top_terms'][:8])}")
    return "\n".join(lines)
