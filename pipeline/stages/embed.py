"""embed: every document -> an L2-normalised embedding, on an actor pool (CLIMB preprocessing).

    embed/parts/<part>.arrow   id, embedding[, quality]: kept so re-clustering never re-embeds

One model load per actor (sentence-transformers, local directory), `num_gpus` per actor; on
CPU the actors share the node's CPUs (torch threads = the CPUs an actor reserved). When
`cluster.prune` is set the quality scores for pruning are computed here too, from the text.
"""
from __future__ import annotations

import dataclasses

from operators import schema as S
from pipeline import sink
from pipeline.layout import INTERMEDIATE_COMPRESSION
from pipeline.stages.base import Context, Item, Resources, Result, Run, Stage


@dataclasses.dataclass(frozen=True)
class Part(Item):
    input_stage: str


class EmbedWorker:
    """One actor of the embed stage: the sentence-transformers model loads once."""

    def __init__(self, ctx: Context, resources: Resources):
        import torch
        from operators.embed import DocumentEmbedder
        from operators.quality import QualityScorer
        e, self.layout = ctx.config.embed, ctx.layout
        torch.set_num_threads(max(1, int(resources.num_cpus)))  # Ray sets 1 thread per worker; use what the actor reserved
        self.embedder = DocumentEmbedder(model=e.model, max_seq_length=e.max_seq_length, batch_size=e.batch_size,
                                         device=e.device, dtype=e.dtype)
        self.embedder.setup()
        prune = ctx.config.cluster.prune if ctx.config.cluster else None
        self.quality = QualityScorer(classifier=prune.classifier, trust_pickle=prune.trust_pickle) if prune else None

    def __call__(self, item: Part) -> Result:
        docs = sink.read_table(self.layout.part(item.input_stage, item.name))
        out = self.embedder(docs.select([S.ID, S.TEXT, S.PROMPT, S.RESPONSE]))
        if self.quality is not None:
            out = self.quality(out)
        out = out.drop_columns([S.TEXT, S.PROMPT, S.RESPONSE])
        sink.write_table(self.layout.part("embed", item.name), out, compression=INTERMEDIATE_COMPRESSION,
                         rows_per_batch=1 << 16)
        return Result(item.name, rows_in=docs.num_rows, rows_out=out.num_rows)


class Embed(Stage):
    name = "embed"
    reads = (S.TEXT, S.PROMPT, S.RESPONSE)
    adds = (S.EMBEDDING,)
    Worker = EmbedWorker

    @classmethod
    def enabled(cls, config) -> bool:
        return config.embed is not None

    def plan(self, run: Run) -> list[Part]:
        return [Part(p["name"], run.doc_stage) for p in run.parts]

    def resources(self, run: Run) -> Resources:
        e = self.config.embed
        num_gpus = run.default_gpus(e.num_gpus)
        actors = min(e.actors, max(1, len(run.parts)))
        num_cpus = e.num_cpus or (1.0 if num_gpus else max(1.0, run.cluster.get("CPU", 1) // actors))
        return Resources(num_cpus=num_cpus, num_gpus=num_gpus, actors=actors)
