"""k-means fit/assign, quality scorers, Ward merge, report and configs (no model, no Ray)."""
import json
import pickle

import joblib
import numpy as np
import pyarrow as pa
import pydantic
import pytest

from operators import schema
from operators.cluster import (PRUNED, ClusterFit, assign_domains, fit_clusters, kmeans_assign,
                               kmeans_fit, merge_ward)
from operators.cluster_assign import ClusterAssigner
from operators.cluster_config import ClusterConfig, MergeConfig, PruneConfig
from operators.cluster_report import build_cluster_report, cluster_counts, whitespace_word_counts
from operators.quality import HEURISTIC_SIGNALS, ClassifierScorer, QualityScorer, heuristic_features
from pipeline.config import ConfigError, parse_config
from tests.conftest import shared_rows

JUNK = ["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "#$%^&*()!@ %^&*( !@#$% ^&*()_+ {}|:<> ?~` ><>< ### $$$ %%%",
        "buy now buy now buy now buy now buy now buy now buy now buy now",
        "a a a a a a a a a a a a a a a a a a a a",
        "| | | | |\n|-|-|-|\n| | | | |\n|-|-|-|\n| | | | |\n|-|-|-|"]


def read_texts(name: str, n: int) -> list[str]:
    return [row["text"] for row in shared_rows(name, n)]


@pytest.fixture(scope="module")
def prose() -> list[str]:
    return read_texts("news_agnews_5k.jsonl.zst", 20) + read_texts("encyclopedia_dbpedia14_9800.jsonl.zst", 20)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(num_blobs: int, per_blob: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised points around `num_blobs` well-separated directions, and their blob ids."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.normal(size=(num_blobs, dim)))
    labels = np.repeat(np.arange(num_blobs), per_blob)
    return unit_rows(centres[labels] + 0.05 * rng.normal(size=(len(labels), dim))), labels


def embedding_table(x: np.ndarray) -> pa.Table:
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.table({schema.ID: [f"d{i}" for i in range(len(x))], schema.EMBEDDING: column})


# --- k-means -----------------------------------------------------------------

def test_assign_equals_brute_force_nearest_centroid():
    rng = np.random.default_rng(1)
    x, c = unit_rows(rng.normal(size=(3000, 32))), rng.normal(size=(37, 32)).astype(np.float32)
    got = kmeans_assign(x, c, max_chunk_bytes=4 * 37 * 128)  # 128-row chunks: exercises chunking
    dist = ((x[:, None, :].astype(np.float64) - c[None, :, :]) ** 2).sum(-1)
    expected = dist.argmin(1)
    assert got.dtype == np.int32
    # Equal up to float32 ties: where they differ, both centroids are equally near.
    differ = got != expected
    assert differ.mean() < 1e-3
    np.testing.assert_allclose(dist[differ, got[differ]], dist[differ, expected[differ]], rtol=1e-5)


def test_kmeans_recovers_separated_blobs_and_clamps_k():
    x, labels = blobs(4, 50)
    ids = kmeans_assign(x, kmeans_fit(x, 4, seed=0))
    assert all(len(set(ids[labels == b])) == 1 for b in range(4)) and len(set(ids)) == 4
    with pytest.warns(UserWarning, match="k=500"):
        assert kmeans_fit(x[:30], 500).shape == (30, 16)


# --- Ward merge and pruning ----------------------------------------------------

@pytest.mark.parametrize("num_domains", [1, 2, 7, 40])
def test_ward_cut_gives_exactly_num_domains(num_domains):
    centroids = np.random.default_rng(2).normal(size=(40, 8)).astype(np.float32)
    domains = merge_ward(centroids, np.ones(40, bool), num_domains=num_domains)
    assert sorted(set(domains.tolist())) == list(range(num_domains))


def test_ward_distance_cut_is_monotone_and_skips_pruned():
    centroids = np.random.default_rng(3).normal(size=(30, 8)).astype(np.float32)
    keep = np.arange(30) % 3 != 0
    counts = [len(set(merge_ward(centroids, keep, distance=d)[keep])) for d in (0.5, 3.0, 1e6)]
    assert counts[0] >= counts[1] >= counts[2] == 1
    assert (merge_ward(centroids, keep, distance=3.0)[~keep] == PRUNED).all()


def test_pruned_clusters_get_null_domain(tmp_path):
    x, labels = blobs(6, 40)
    quality = np.where(labels < 2, 1.0, 4.5)  # blobs 0 and 1 are low quality
    config = ClusterConfig(k_init=12, sample_size=1000, prune=PruneConfig(min_quality=3.0),
                           merge=MergeConfig(num_domains=3))
    fit = fit_clusters(x, config, quality_N=quality)
    fit.save(tmp_path)
    assigner = pickle.loads(pickle.dumps(ClusterAssigner(fit_dir=str(tmp_path))))  # loads nothing until used
    out = assigner(embedding_table(x))
    domain = out.column(schema.DOMAIN_ID)
    assert out.schema.field(schema.DOMAIN_ID).type == pa.int32()
    np.testing.assert_array_equal(domain.is_null().to_numpy(zero_copy_only=False), labels < 2)
    assert sorted(set(domain.drop_null().to_pylist())) == [0, 1, 2]
    loaded = ClusterFit.load(tmp_path)
    np.testing.assert_array_equal(loaded.domain_of_cluster_K, fit.domain_of_cluster_K)
    np.testing.assert_allclose(loaded.quality_mean_K, fit.quality_mean_K, atol=1e-4)


def overlapping_clouds(per_cloud: int = 400, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian clouds one standard deviation apart on each side: fine clusters straddle them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], per_cloud)
    x = rng.normal(size=(2 * per_cloud, dim))
    x[:, 0] += np.where(labels == 0, -1.0, 1.0)
    return x.astype(np.float32), labels


def partition_sse(x: np.ndarray, groups: np.ndarray) -> float:
    return float(sum(((x[groups == g] - x[groups == g].mean(axis=0)) ** 2).sum() for g in np.unique(groups)))


def test_refinement_never_raises_the_within_domain_sse_and_moves_through_clusters():
    x, labels = overlapping_clouds()
    fits = {refine: fit_clusters(x, ClusterConfig(k_init=40, sample_size=len(x), seed=3,
                                                  merge=MergeConfig(num_domains=2, refine=refine)))
            for refine in (False, True)}
    (clusters, unions), (clusters_r, refined) = assign_domains(x, fits[False]), assign_domains(x, fits[True])
    np.testing.assert_array_equal(clusters, clusters_r)  # same k-means, only the domains differ
    assert fits[False].domain_centroids is None and fits[True].domain_centroids.shape == (2, 8)
    # Without refinement a domain is a union of clusters; with it, some cluster is split.
    assert all(len(set(unions[clusters == c])) == 1 for c in np.unique(clusters))
    assert any(len(set(refined[clusters == c])) == 2 for c in np.unique(clusters))
    assert partition_sse(x, refined) <= partition_sse(x, unions) + 1e-3
    agreement = {name: max((d == labels).mean(), (d != labels).mean()) for name, d in
                 (("unions", unions), ("refined", refined))}
    assert agreement["refined"] >= agreement["unions"], agreement
    assert fits[True].merge == {"num_domains": 2, "refine": True, "restarts": 10}


def test_refined_fit_round_trips_and_keeps_pruned_documents_out(tmp_path):
    x, labels = blobs(6, 40)
    config = ClusterConfig(k_init=12, sample_size=1000, prune=PruneConfig(min_quality=3.0),
                           merge=MergeConfig(distance=0.5, restarts=3))
    fit = fit_clusters(x, config, quality_N=np.where(labels < 2, 1.0, 4.5))
    assert sorted(fit.save(tmp_path)) == ["centroids.npy", "cluster_fit.json", "domain_centroids.npy"]
    loaded = ClusterFit.load(tmp_path)
    np.testing.assert_array_equal(loaded.domain_centroids, fit.domain_centroids)
    cluster_ids, domain_ids = assign_domains(x, loaded)
    np.testing.assert_array_equal(domain_ids == PRUNED, labels < 2)
    nearest = kmeans_assign(x, fit.domain_centroids)
    np.testing.assert_array_equal(domain_ids[labels >= 2], nearest[labels >= 2])
    assert set(fit.domain_of_cluster_K[fit.domain_of_cluster_K != PRUNED]) <= set(range(fit.num_domains))
    assert (assign_domains(x[labels < 2], loaded)[1] == PRUNED).all()  # a batch with only pruned rows
    (tmp_path / "domain_centroids.npy").unlink()
    with pytest.raises(FileNotFoundError, match="domain_centroids.npy"):
        ClusterFit.load(tmp_path)


def test_pruning_everything_is_a_clear_error():
    x, _ = blobs(3, 20)
    config = ClusterConfig(k_init=3, sample_size=100, prune=PruneConfig(min_quality=4.0))
    with pytest.raises(ValueError, match="prunes every cluster"):
        fit_clusters(x, config, quality_N=np.full(len(x), 2.0))
    with pytest.raises(ValueError, match="quality_N"):
        fit_clusters(x, config)


# --- quality scorers ---------------------------------------------------------

def test_heuristics_rank_real_prose_above_junk(prose):
    scorer = QualityScorer()
    good, bad = scorer.score_texts(prose), scorer.score_texts(JUNK)
    assert good.min() > bad.max() and good.mean() > 4.0 and bad.max() < 3.0
    assert ((0 <= good) & (good <= 5)).all() and ((0 <= bad) & (bad <= 5)).all()
    assert set(heuristic_features(JUNK)) == set(HEURISTIC_SIGNALS)


def test_classifier_scorer_loads_a_joblib_pipeline(tmp_path, prose):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts, levels = prose[:30] + JUNK * 6, [5] * 30 + [0] * 30
    path = tmp_path / "quality.joblib"
    joblib.dump(make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 2)),
                              LogisticRegression()).fit(texts, levels), path)
    table = pa.table({schema.ID: ["p", "j"], schema.TEXT: [prose[35], JUNK[2]],
                      schema.PROMPT: pa.array([None, None], pa.string()),
                      schema.RESPONSE: pa.array([None, None], pa.string())})
    scorer = pickle.loads(pickle.dumps(QualityScorer(classifier=str(path), trust_pickle=True)))  # joblib: trusted here
    scorer.setup()
    quality = scorer(table).column(schema.QUALITY).to_numpy()
    assert quality.dtype == np.float32 and 0 <= quality[1] < quality[0] <= 5

    joblib.dump(make_pipeline(TfidfVectorizer(), LinearRegression()).fit(texts, levels), path)  # predict only
    scores = ClassifierScorer(path, trust_pickle=True)(JUNK)
    assert ((0 <= scores) & (scores <= 5)).all()
    joblib.dump(make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, ["good"] * 30 + ["bad"] * 30), path)
    with pytest.raises(ValueError, match="numeric classes_"):
        ClassifierScorer(path, trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="nope.joblib"):
        ClassifierScorer(tmp_path / "nope.joblib")


# --- report ------------------------------------------------------------------

def test_report_counts_balance(prose):
    x, labels = blobs(4, 10)  # 40 docs, one per prose text
    config = ClusterConfig(k_init=8, sample_size=100, prune=PruneConfig(min_quality=3.0),
                           merge=MergeConfig(num_domains=2))
    fit = fit_clusters(x, config, quality_N=np.where(labels == 0, 1.0, 5.0))
    ids, domains = assign_domains(x, fit)
    words = whitespace_word_counts(pa.array(prose))
    # Counts are additive: summing two halves equals counting everything at once.
    halves = [cluster_counts(ids[s], words[s], fit.num_clusters) for s in (slice(0, 17), slice(17, None))]
    num_docs_K, num_tokens_K = halves[0][0] + halves[1][0], halves[0][1] + halves[1][1]
    kept = domains != PRUNED
    num_docs_D, num_tokens_D = cluster_counts(domains[kept], words[kept], fit.num_domains)
    args = dict(num_docs_K=num_docs_K, num_tokens_K=num_tokens_K, num_docs_D=num_docs_D, num_tokens_D=num_tokens_D,
                token_unit="whitespace_words", sample_cluster_ids_S=ids, sample_domain_ids_S=domains,
                sample_ids_S=[f"d{i}" for i in range(40)], sample_texts_S=prose)
    report = build_cluster_report(fit, **args)

    assert sum(c["num_docs"] for c in report["clusters"]) == report["num_docs"] == 40
    assert sum(c["num_tokens"] for c in report["clusters"]) == report["num_tokens"] == words.sum()
    assert sum(d["num_docs"] for d in report["domains"]) + report["num_docs_pruned"] == 40
    assert sum(d["num_tokens"] for d in report["domains"]) + report["num_tokens_pruned"] == words.sum()
    assert report["num_docs_pruned"] == 10 and len(report["domains"]) == 2
    assert all(c["domain_id"] is None for c in report["clusters"] if c["quality_mean"] < 3.0)
    assert all(c["top_terms"] and c["examples"] for c in report["clusters"] if c["num_docs"])
    assert json.dumps(report) == json.dumps(build_cluster_report(fit, **args))  # deterministic, JSON-ready


# --- configs -----------------------------------------------------------------

def cluster_section(data: dict) -> ClusterConfig:
    """`data` as the `cluster:` block of a config, loaded the way `tokenmill run` loads it."""
    return parse_config({"run_dir": "r", "sources": [{"path": "a.jsonl"}], "embed": {}, "cluster": data}).cluster


def test_the_yaml_block_is_the_operator_config():
    cluster = cluster_section({"k_init": 1000, "sample_size": 200000,
                               "prune": {"min_quality": 3.0}, "merge": {"num_domains": 20}})
    assert type(cluster) is ClusterConfig  # one tree: what the YAML gives is what fit_clusters takes
    assert cluster.prune == PruneConfig(min_quality=3.0) and cluster.merge == MergeConfig(num_domains=20)
    assert cluster_section({}).merge == MergeConfig(distance=1.5) and ClusterConfig().prune is None
    assert cluster_section({}) == ClusterConfig()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cluster.k_init = 5


@pytest.mark.parametrize("data, message", [
    ({"merge": {"foo": 1}}, r"cluster\.merge\.foo: unknown key"),
    ({"prune": {"min_quality": 3, "bar": 1}}, r"cluster\.prune\.bar: unknown key"),
    ({"k_int": 10}, r"cluster\.k_int: unknown key"),
    ({"merge": {"num_domains": 20, "distance": 1.5}}, r"cluster\.merge: give exactly one of num_domains or distance"),
    ({"merge": {}}, r"cluster\.merge: give exactly one of num_domains or distance"),
    ({"k_init": 100, "sample_size": 10}, r"cluster: sample_size \(10\) must be >= k_init \(100\)"),
    ({"k_init": True}, r"cluster\.k_init"),
    ({"merge": {"num_domains": 2, "refine": "yes"}}, r"cluster\.merge\.refine"),
    ({"merge": {"num_domains": 2, "restarts": 0}}, r"cluster\.merge\.restarts"),
    ({"prune": {"min_quality": 7}}, r"cluster\.prune\.min_quality"),
    ({"prune": {"classifier": ""}}, r"cluster\.prune\.classifier"),
    ({"report_sample": 0}, r"cluster\.report_sample"),
])
def test_cluster_config_rejects(data, message):
    with pytest.raises(ConfigError, match=message):
        cluster_section(data)
    with pytest.raises(ValueError):  # the same rule when the operator's config is built directly
        ClusterConfig.model_validate(data)


def test_embed_section_rejects_unknown_keys_and_bad_values():
    config = {"run_dir": "r", "sources": [{"path": "a.jsonl"}]}
    with pytest.raises(ConfigError, match=r"embed\.max_len: unknown key"):
        parse_config({**config, "embed": {"max_len": 128}})
    with pytest.raises(ConfigError, match=r"embed\.max_seq_length"):
        parse_config({**config, "embed": {"max_seq_length": 0}})
