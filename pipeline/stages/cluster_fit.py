"""cluster/fit: the global fit of CLIMB clustering, one task (a fit/apply pair with cluster/assign).

    cluster/fit/   centroids.npy, cluster_fit.json[, domain_centroids.npy]

k-means on a seeded sample of the stored embeddings (`cluster.sample_size`), quality pruning,
Ward merge of the kept centroids into domains, refinement (operators/cluster.py).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import pyarrow as pa

from operators import schema as S
from operators.sampling import sample_rows
from pipeline import sink, storage
from pipeline.stages.base import Context, Item, Result, Run, Stage


@dataclasses.dataclass(frozen=True)
class FitItem(Item):
    parts: tuple[dict, ...]


class ClusterFit(Stage):
    name = "cluster/fit"
    reads = (S.EMBEDDING,)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.cluster is not None

    def plan(self, run: Run) -> list[FitItem]:
        return [FitItem("fit", tuple({"name": p["name"], "rows": p["rows"]} for p in run.parts))]

    @staticmethod
    def work(ctx: Context, item: FitItem) -> Result:
        from operators.cluster import fit_clusters
        from operators.embed import embedding_matrix
        c, layout = ctx.config.cluster, ctx.layout
        rows = sample_rows([p["rows"] for p in item.parts], c.sample_size, c.seed)
        xs, qs = [], []
        for i, idx in rows.items():
            t = sink.read_table(layout.part("embed", item.parts[i]["name"])).take(pa.array(idx))
            xs.append(embedding_matrix(t))
            if S.QUALITY in t.column_names:
                qs.append(t.column(S.QUALITY).to_numpy())
        fit = fit_clusters(np.concatenate(xs), c, quality_N=np.concatenate(qs) if qs else None)
        with tempfile.TemporaryDirectory() as tmp:
            for name in fit.save(tmp):  # cluster_fit.json last: load_fit reads it to know the others
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_atomic(layout.path("cluster", "fit", name), f.read())
        n = sum(len(v) for v in rows.values())
        return Result(item.name, rows_in=n, rows_out=n,
                      data={"num_clusters": fit.num_clusters, "num_domains": fit.num_domains})
