"""tokenize: every document part -> token ids and target masks, for every tokenizer in one pass.

    tokenize/<tok>/parts/<part>.arrow   id, input_ids, target_mask, num_tokens[, cluster_id, domain_id]

Reading a part once for every tokenizer, and packing straight from memory the tokenizers whose
shards need no later stage (no mixture, not the selected tokenizer), keeps the pipeline close
to the raw tokenizer's speed: those tokenizers write `shards/<tok>/shard-<index>.arrow` here
and no intermediate part. When clustering ran, `domain_id` is joined onto each part and the
documents of pruned clusters (null domain) are counted as filtered.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from operators.tokenize import Tokenize
from pipeline import sink
from pipeline.layout import INTERMEDIATE_COMPRESSION, read_domain_columns
from pipeline.stages.base import Context, Item, Result, Run, Stage, packed_in_tokenize
from pipeline.tokenizer_cache import get_tokenizer


@dataclasses.dataclass(frozen=True)
class Part(Item):
    input_stage: str
    shard: int        # the part's index: names its shard when packed here


def _documents(ctx: Context, item: Part) -> tuple[pa.Table, int]:
    """The part's documents with cluster_id/domain_id joined when clustering ran; documents of
    pruned clusters are left out and counted."""
    docs = sink.read_table(ctx.layout.part(item.input_stage, item.name))
    if ctx.config.cluster is None:
        return docs, 0
    for name, column in read_domain_columns(ctx.layout, item.name).items():
        docs = docs.append_column(name, column)
    kept = docs.filter(pc.is_valid(docs.column(S.DOMAIN_ID)))
    return kept, docs.num_rows - kept.num_rows


def tokenize_table(op: Tokenize, docs: pa.Table, docs_per_batch: int) -> pa.Table:
    """Tokenized rows in input order, `docs_per_batch` documents per encoder call."""
    pieces = [op(docs.slice(start, docs_per_batch)) for start in range(0, docs.num_rows, docs_per_batch)]
    return pa.concat_tables(pieces) if pieces else op(docs.slice(0, 0))


class TokenizeStage(Stage):
    name = "tokenize"
    reads = Tokenize.reads
    adds = Tokenize.adds

    @classmethod
    def enabled(cls, config) -> bool:
        return config.tokenize is not None and not config.plain_path

    def plan(self, run: Run) -> list[Part]:
        # Largest parts first: the last tasks are then small, and no core idles long at the end.
        items = [Part(p["name"], run.doc_stage, i) for i, p in enumerate(run.parts)]
        size = {p["name"]: p.get("bytes", p["rows"]) for p in run.parts}
        return sorted(items, key=lambda it: -size[it.name])

    @staticmethod
    def work(ctx: Context, item: Part) -> Result:
        config, layout = ctx.config, ctx.layout
        docs, pruned = _documents(ctx, item)
        per_tokenizer = {}
        for t, tok in enumerate(config.tokenize.tokenizers):
            op = get_tokenizer(config, t, ctx.verified)
            out = tokenize_table(op, docs, config.tokenize.docs_per_batch)
            entry = {"tokens": int(pc.sum(out.column(S.NUM_TOKENS)).as_py() or 0)}
            if packed_in_tokenize(config, tok.name):
                entry["shard"] = sink.write_shard(layout.shard_dir(tok.name), f"shard-{item.shard:05d}.arrow", out, pack=config.pack,
                                                  output=config.output, pad_id=op.tok.pad_id)
            else:
                sink.write_table(layout.part(f"tokenize/{tok.name}", item.name), out,
                                 compression=INTERMEDIATE_COMPRESSION, rows_per_batch=1 << 16)
            per_tokenizer[tok.name] = entry
        return Result(item.name, rows_in=docs.num_rows + pruned, rows_out=docs.num_rows, rows_filtered=pruned,
                      reasons={"pruned_cluster": pruned} if pruned else {},
                      data={"tokenizers": per_tokenizer, "rows": docs.num_rows})

    def execute(self, run: Run, executor) -> list[Result]:
        results = super().execute(run, executor)
        by_name = {r.item: r for r in results}
        for tok in self.config.tokenize.tokenizers:
            run.documents[tok.name] = f"tokenize/{tok.name}"
            if packed_in_tokenize(self.config, tok.name):
                run.shards[tok.name] = [shard_result(by_name[p["name"]], tok.name) for p in run.parts]
        run.parts = [{**p, "rows": by_name[p["name"]].data["rows"]} for p in run.parts]
        return results


def shard_result(result: Result, tokenizer: str) -> dict:
    """The shard record a tokenize item wrote for a tokenizer packed in the same pass."""
    return {"item": result.item, **result.data["tokenizers"][tokenizer]["shard"]}
