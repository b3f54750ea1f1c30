"""select/<tok>: score every target token with two causal LMs and select (ssToken, Rho-1).

    select/<tok>/parts/<part>.arrow   the tokenized documents plus loss_mask and token_scores

An actor pool: each actor loads both models once (operators/score.py). Documents are scored
`select.docs_per_batch` at a time, so Rho-1's top-ratio is taken over a fixed, deterministic
batch of target tokens. Documents longer than the models' context (or `pack.seq_len`) are scored
in windows (operators/windows.py). Besides the offline static mask (`loss_mask`, `token_scores`)
it stores `ref_loss`, the history/reference model's per-token loss in fp32, for online
selection in the trainer (operators/selective_loss.py).
Only the tokenizer named by `select.tokenizer` (default: the first) is selected.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from pipeline import sink
from pipeline.layout import INTERMEDIATE_COMPRESSION
from pipeline.stages.base import Context, Item, Resources, Result, Run, Stage


@dataclasses.dataclass(frozen=True)
class Part(Item):
    input_stage: str
    tokenizer: str


class SelectWorker:
    """One actor of the select stage: loads the two models once, then scores parts."""

    def __init__(self, ctx: Context, resources: Resources):
        from operators.score import TokenScorer  # torch is imported only where models run
        self.config, self.layout = ctx.config, ctx.layout
        self.scorer = TokenScorer(ctx.config.select, window_len=ctx.config.pack.seq_len if ctx.config.pack else None)
        self.scorer.setup()

    def __call__(self, item: Part) -> Result:
        c, layout = self.config.select, self.layout
        docs = sink.read_table(layout.part(item.input_stage, item.name))
        pieces = [self.scorer(docs.slice(start, c.docs_per_batch)) for start in range(0, docs.num_rows, c.docs_per_batch)]
        # An empty part (every document pruned or filtered upstream) still gets the columns.
        out = pa.concat_tables(pieces) if pieces else self.scorer(docs)
        sink.write_table(layout.part(f"select/{item.tokenizer}", item.name), out,
                         compression=INTERMEDIATE_COMPRESSION, rows_per_batch=1 << 16)
        target = int(pc.sum(pc.list_flatten(out.column(S.TARGET_MASK))).as_py() or 0)
        kept = int(pc.sum(pc.list_flatten(out.column(S.LOSS_MASK))).as_py() or 0)
        return Result(item.name, rows_in=docs.num_rows, rows_out=out.num_rows,
                      data={"target_tokens": target, "loss_tokens": kept})


class Select(Stage):
    reads = (S.INPUT_IDS, S.TARGET_MASK)
    adds = (S.LOSS_MASK, S.TOKEN_SCORES, S.REF_LOSS)
    Worker = SelectWorker

    def __init__(self, config, tokenizer: str):
        super().__init__(config)
        self.tokenizer = tokenizer
        self.name = f"select/{tokenizer}"

    @classmethod
    def enabled(cls, config) -> bool:
        return config.selected_tokenizer is not None

    @classmethod
    def instances(cls, config) -> list[Stage]:
        return [cls(config, config.selected_tokenizer)] if cls.enabled(config) else []

    def plan(self, run: Run) -> list[Part]:
        return [Part(p["name"], run.documents[self.tokenizer], self.tokenizer) for p in run.parts]

    def resources(self, run: Run) -> Resources:
        c = self.config.select
        return Resources(num_cpus=c.num_cpus, num_gpus=run.default_gpus(c.num_gpus),
                         actors=min(c.actors, max(1, len(run.parts))))

    def finish(self, run: Run, results: list[Result]) -> None:
        run.documents[self.tokenizer] = self.name
