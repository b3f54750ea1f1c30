"""select/<tok>: score every target token with two causal LMs and select (ssToken, Rho-1).

    select/<tok>/parts/<part>.arrow   the tokenized documents plus loss_mask and token_scores

An actor pool: each actor loads both models once (operators/score.py). Documents are scored
`select.docs_per_batch` at a time, so Rho-1's top-ratio is taken over a fixed, deterministic
batch of target tokens; documents within the first `select.warmup_docs` (corpus order) use
gamma = 0. Documents longer than the models' context are scored in windows (operators/windows.py).
Only the tokenizer named by `select.tokenizer` (default: the first) is selected.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from operators.windows import join_windows, split_long_documents
from pipeline import sink
from pipeline.layout import INTERMEDIATE_COMPRESSION
from pipeline.stages.base import Context, Item, Resources, Result, Run, Stage


@dataclasses.dataclass(frozen=True)
class Part(Item):
    input_stage: str
    tokenizer: str
    first_doc: int   # corpus index of the part's first document (for warm-up)


class SelectWorker:
    """One actor of the select stage: loads the two models once, then scores parts."""

    def __init__(self, ctx: Context, resources: Resources):
        from operators.score import TokenScorer  # torch is imported only where models run
        c = ctx.config.select
        self.config, self.layout = ctx.config, ctx.layout
        self.scorer = TokenScorer(current_model=c.current_model, other_model=c.other_model, method=c.method,
                                  device=c.device, dtype=c.dtype, batch_tokens=c.batch_tokens,
                                  trust_remote_code=c.trust_remote_code, gamma=c.gamma, ratio=c.ratio)
        self.scorer.setup()

    def __call__(self, item: Part) -> Result:
        c, layout = self.config.select, self.layout
        docs = sink.read_table(layout.part(item.input_stage, item.name))
        base, warm = self.scorer.config, dataclasses.replace(self.scorer.config, warmup=True)
        pieces = []
        for start in range(0, docs.num_rows, c.docs_per_batch):
            batch = docs.slice(start, c.docs_per_batch)
            n_warm = min(batch.num_rows, max(0, c.warmup_docs - item.first_doc - start))
            for sub, cfg in ((batch.slice(0, n_warm), warm), (batch.slice(n_warm), base)):
                if sub.num_rows:
                    self.scorer.config = cfg
                    windows, n_win = split_long_documents(sub, self.scorer.max_len or (1 << 31))
                    pieces.append(join_windows(sub, self.scorer(windows), n_win))
        self.scorer.config = base
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
    adds = (S.LOSS_MASK, S.TOKEN_SCORES)
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
        items, first = [], 0
        for p in run.parts:
            items.append(Part(p["name"], run.documents[self.tokenizer], self.tokenizer, first))
            first += p["rows"]
        return items

    def resources(self, run: Run) -> Resources:
        c = self.config.select
        return Resources(num_cpus=c.num_cpus, num_gpus=run.default_gpus(c.num_gpus),
                         actors=min(c.actors, max(1, len(run.parts))))

    def finish(self, run: Run, results: list[Result]) -> None:
        run.documents[self.tokenizer] = self.name
