"""The apply side of CLIMB clustering as an Arrow operator: every document's cluster and domain
from a saved fit (operators/cluster.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from operators.base import Operator, check_columns
from operators.cluster import PRUNED, ClusterFit, assign_domains
from operators.embed import embedding_matrix
from operators.schema import CLUSTER_ID, DOMAIN_ID, EMBEDDING


class ClusterAssigner(Operator):
    """Adds `cluster_id` (int32) and `domain_id` (int32, null if pruned) from a saved fit.

    The runner drops `embedding` afterwards; it is not needed downstream.
    """
    reads = (EMBEDDING,)
    adds = (CLUSTER_ID, DOMAIN_ID)

    def __init__(self, *, fit_dir: str):
        self.fit_dir = fit_dir
        self.fit: ClusterFit | None = None

    def setup(self) -> None:
        if self.fit is None:
            self.fit = ClusterFit.load(self.fit_dir)

    def __call__(self, table: pa.Table) -> pa.Table:
        check_columns(table, self.reads, type(self).__name__)
        self.setup()
        if len(table) == 0:
            cluster_ids_N = domain_ids_N = np.zeros(0, np.int32)
        else:
            cluster_ids_N, domain_ids_N = assign_domains(embedding_matrix(table), self.fit)
        return (table.append_column(pa.field(CLUSTER_ID, pa.int32(), nullable=False), pa.array(cluster_ids_N))
                .append_column(pa.field(DOMAIN_ID, pa.int32()),
                               pa.array(domain_ids_N, pa.int32(), mask=domain_ids_N == PRUNED)))
