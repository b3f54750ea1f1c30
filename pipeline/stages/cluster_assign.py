"""cluster/assign: every document -> its cluster and domain; then the clusters.json report.

    cluster/assignments/<part>.parquet   id, cluster_id, domain_id (null domain = pruned cluster)
    cluster/clusters.json                per-cluster and per-domain sizes, word counts, top terms, examples

Downstream, tokenize joins `domain_id` onto each part; documents of pruned clusters are counted
as filtered there, and packed rows carry `domain_ids`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import schema as S
from operators.cluster import PRUNED
from operators.sampling import sample_rows
from pipeline import sink, storage
from pipeline.layout import RunLayout, assignment_path, read_domain_columns
from pipeline.stages.base import Context, Item, Result, Run, Stage

_FITS: dict[str, object] = {}  # one load per worker process and fit


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


def _texts(docs: pa.Table) -> pa.ChunkedArray:
    return pa.compute.coalesce(docs.column(S.TEXT), pa.compute.binary_join_element_wise(
        docs.column(S.PROMPT), docs.column(S.RESPONSE), "\n\n"))


@dataclasses.dataclass(frozen=True)
class Part(Item):
    input_stage: str


class ClusterAssign(Stage):
    name = "cluster/assign"
    reads = (S.EMBEDDING,)
    adds = (S.CLUSTER_ID, S.DOMAIN_ID)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.cluster is not None

    def plan(self, run: Run) -> list[Part]:
        return [Part(p["name"], run.doc_stage) for p in run.parts]

    @staticmethod
    def work(ctx: Context, item: Part) -> Result:
        from operators.cluster_assign import ClusterAssigner
        from operators.cluster_report import cluster_counts, whitespace_word_counts
        layout = ctx.layout
        fit = load_fit(layout)
        assigner = ClusterAssigner(fit_dir="")
        assigner.fit = fit
        emb = sink.read_table(layout.part("embed", item.name))
        out = assigner(emb.select([S.ID, S.EMBEDDING])).drop_columns([S.EMBEDDING])
        cluster_N = out.column(S.CLUSTER_ID).to_numpy()
        domain_N = out.column(S.DOMAIN_ID).fill_null(PRUNED).to_numpy()
        buf = pa.BufferOutputStream()
        pq.write_table(out, buf, compression="zstd")
        storage.write_atomic(assignment_path(layout, item.name), buf.getvalue().to_pybytes())
        words_N = whitespace_word_counts(_texts(sink.read_table(layout.part(item.input_stage, item.name))))
        num_docs_K, num_words_K = cluster_counts(cluster_N, words_N, fit.num_clusters)
        kept = domain_N != PRUNED
        num_docs_D, num_words_D = cluster_counts(domain_N[kept], words_N[kept], fit.num_domains)
        return Result(item.name, rows_in=emb.num_rows, rows_out=out.num_rows,
                      data={"num_docs": num_docs_K.tolist(), "num_words": num_words_K.tolist(),
                            "num_docs_domain": num_docs_D.tolist(), "num_words_domain": num_words_D.tolist()})

    def finish(self, run: Run, results: list[Result]) -> None:
        path = run.layout.path("cluster", "clusters.json")
        report = (json.loads(storage.read_text(path)) if storage.exists(path)
                  else self.write_report(run, results))
        run.say(describe_domains(report))

    def write_report(self, run: Run, results: list[Result]) -> dict:
        """clusters.json from the corpus-wide counts and a sample of documents read back."""
        from operators.cluster_report import build_cluster_report
        c, layout = self.config.cluster, run.layout
        fit = load_fit(layout)
        sums = {key: np.sum([r.data[key] for r in results], axis=0)
                for key in ("num_docs", "num_words", "num_docs_domain", "num_words_domain")}
        ids, texts, cids, dids = [], [], [], []
        for i, idx in sample_rows([p["rows"] for p in run.parts], c.report_sample, c.seed + 1).items():
            name = run.parts[i]["name"]
            docs = sink.read_table(layout.part(run.doc_stage, name)).take(pa.array(idx))
            ids += docs.column(S.ID).to_pylist()
            texts += _texts(docs).to_pylist()
            columns = read_domain_columns(layout, name)
            cids.append(columns[S.CLUSTER_ID].to_numpy()[idx])
            dids.append(columns[S.DOMAIN_ID].fill_null(PRUNED).to_numpy()[idx])
        report = build_cluster_report(
            fit, num_docs_K=sums["num_docs"], num_tokens_K=sums["num_words"], num_docs_D=sums["num_docs_domain"],
            num_tokens_D=sums["num_words_domain"], token_unit="whitespace_words",
            sample_cluster_ids_S=np.concatenate(cids), sample_domain_ids_S=np.concatenate(dids),
            sample_ids_S=ids, sample_texts_S=texts, seed=c.seed)
        storage.write_text_atomic(layout.path("cluster", "clusters.json"), json.dumps(report, indent=1) + "\n")
        return report


def describe_domains(report: dict, limit: int = 30) -> str:
    lines = [f"{report['num_domains']} domains from {report['num_clusters']} clusters "
             f"({report['num_docs_pruned']} documents in pruned clusters):"]
    for d in sorted(report["domains"], key=lambda d: -d["num_docs"])[:limit]:
        lines.append(f"  domain {d['domain_id']:>3}: {d['num_docs']:>7} docs  {', '.join(d['top_terms'][:8])}")
    return "\n".join(lines)
