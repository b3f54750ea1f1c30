"""pack/<tok>: tokenized (and mixed, selected) document parts -> fixed-length rows in shards.

    shards/<tok>/shard-<index>.arrow   (shard-format.md); <index> = the part's index

Used for the tokenizers that a later stage (mix, select) needs as intermediate parts; the
others are packed in the tokenize pass (`packed_in_tokenize`). Best-fit decreasing by default
(operators/pack.py); the manifest is written by the runner once every tokenizer is packed.
"""
from __future__ import annotations

import dataclasses

from operators import schema as S
from pipeline import sink
from pipeline.stages.base import Context, Item, Result, Run, Stage, packed_in_tokenize


@dataclasses.dataclass(frozen=True)
class Part(Item):
    input_stage: str
    tokenizer: str
    shard: int
    pad_id: int


class Pack(Stage):
    reads = (S.ID, S.INPUT_IDS, S.TARGET_MASK)

    def __init__(self, config, tokenizer: str):
        super().__init__(config)
        self.tokenizer = tokenizer
        self.name = f"pack/{tokenizer}"

    @classmethod
    def enabled(cls, config) -> bool:
        return config.pack is not None and not config.plain_path

    @classmethod
    def instances(cls, config) -> list[Stage]:
        if not cls.enabled(config):
            return []
        return [cls(config, t.name) for t in config.tokenize.tokenizers if not packed_in_tokenize(config, t.name)]

    def plan(self, run: Run) -> list[Part]:
        pad_id = run.tokenizers[self.tokenizer]["pad_id"]
        return [Part(p["name"], run.documents[self.tokenizer], self.tokenizer, i, pad_id)
                for i, p in enumerate(run.parts)]

    @staticmethod
    def work(ctx: Context, item: Part) -> Result:
        docs = sink.read_table(ctx.layout.part(item.input_stage, item.name))
        shard = sink.write_shard(ctx.layout.shard_dir(item.tokenizer), f"shard-{item.shard:05d}.arrow", docs, pack=ctx.config.pack,
                                 output=ctx.config.output, pad_id=item.pad_id)
        packed = shard["stats"]["docs"]
        return Result(item.name, rows_in=docs.num_rows, rows_out=packed,
                      rows_filtered=docs.num_rows - packed,  # documents with no token at all
                      reasons={"no_tokens": docs.num_rows - packed} if docs.num_rows > packed else {},
                      data={"shard": shard})

    def finish(self, run: Run, results: list[Result]) -> None:
        run.shards[self.tokenizer] = [{"item": r.item, **r.data["shard"]} for r in results]
