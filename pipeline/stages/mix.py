"""mix: sample the corpus to the mixture found, for every tokenizer.

    mix/plan.json, mix/plan.npz   which documents (and how many copies) realise the weights and budget
    mix/<tok>/parts/<part>.arrow  the mixed documents per part

No domain is repeated more than `mixture.max_epochs` times; if the budget needs more, it is
lowered and reported rather than distorting the weights. A document chosen once keeps its id;
one chosen k > 1 times appears as `<id>#0` ... `<id>#<k-1>`, adjacent in its part.
"""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa

from operators import schema as S
from pipeline import sink, storage
from pipeline.layout import INTERMEDIATE_COMPRESSION, RunLayout, load_domains
from pipeline.stages.base import Context, Item, Result, Run, Stage



def write_mix_plan(config, layout: RunLayout, result: dict) -> dict:
    """Choose documents (with copies) for the weights and the token budget; saved once."""
    from operators.mixture import realised_weights, sample_to_mixture
    path = layout.path("mix", "plan.json")
    if storage.exists(path):
        return json.loads(storage.read_text(path))
    domains_N, tokens_N = load_domains(layout)
    num_domains = int(domains_N.max()) + 1 if len(domains_N) else 0
    weights_D = np.zeros(num_domains)
    for d, w in result["weights"].items():
        weights_D[int(d)] = w
    m = config.mixture
    # The largest budget the weights can be realised at without repeating a domain more than
    # max_epochs times: beyond it the shards would drift from the weights instead.
    available_D = np.bincount(domains_N[domains_N >= 0], weights=tokens_N[domains_N >= 0], minlength=num_domains)
    positive = weights_D > 0
    feasible = float(np.min(m.max_epochs * available_D[positive] / weights_D[positive])) if positive.any() else 0.0
    budget = min(float(m.budget_tokens), feasible)
    sample = sample_to_mixture(domains_N, tokens_N, weights_D, budget, seed=m.seed, max_epochs=int(m.max_epochs))
    buf = io.BytesIO()
    np.savez(buf, doc_indices=sample.doc_indices, copy_numbers=sample.copy_numbers)
    storage.write_atomic(layout.path("mix", "plan.npz"), buf.getvalue())
    realised = realised_weights(domains_N, tokens_N, sample.doc_indices, num_domains)
    plan = {"weights": result["weights"], "budget_tokens": m.budget_tokens, "effective_budget_tokens": int(budget),
            "documents": int(len(sample.doc_indices)),
            "realised_weights": {str(d): round(float(w), 6) for d, w in enumerate(realised) if w > 0},
            "report": json.loads(json.dumps(sample.report, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))}
    storage.write_text_atomic(path, json.dumps(plan, indent=1) + "\n")
    return plan


@dataclasses.dataclass(frozen=True)
class Part(Item):
    first_doc: int   # index of the part's first document in corpus order (the plan's numbering)
    rows: int


class Mix(Stage):
    name = "mix"
    reads = (S.ID, S.DOMAIN_ID)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.mixture is not None

    def plan(self, run: Run) -> list[Part]:
        self.mix_plan = write_mix_plan(self.config, run.layout, run.mixture_result)
        items, first = [], 0
        for p in run.parts:
            items.append(Part(p["name"], first, p["rows"]))
            first += p["rows"]
        return items

    @staticmethod
    def work(ctx: Context, item: Part) -> Result:
        layout = ctx.layout
        z = np.load(io.BytesIO(storage.read_bytes(layout.path("mix", "plan.npz"))))
        lo, hi = item.first_doc, item.first_doc + item.rows
        sel = (z["doc_indices"] >= lo) & (z["doc_indices"] < hi)
        rows, copies = z["doc_indices"][sel] - lo, z["copy_numbers"][sel]
        order = np.lexsort((copies, rows))
        rows, copies = rows[order], copies[order]
        repeated = np.isin(rows, rows[copies > 0])
        chosen = int(len(np.unique(rows)))
        for tok in ctx.config.tokenize.tokenizers:
            docs = sink.read_table(layout.part(f"tokenize/{tok.name}", item.name))
            taken = docs.take(pa.array(rows, pa.int64()))
            ids = [f"{i}#{c}" if rep else i
                   for i, c, rep in zip(taken.column(S.ID).to_pylist(), copies.tolist(), repeated.tolist())]
            taken = taken.set_column(taken.column_names.index(S.ID), S.ID, pa.array(ids, pa.string()))
            sink.write_table(layout.part(f"mix/{tok.name}", item.name), taken, compression=INTERMEDIATE_COMPRESSION,
                             rows_per_batch=1 << 16)
        return Result(item.name, rows_in=item.rows, rows_out=chosen, rows_filtered=item.rows - chosen,
                      reasons={"not_sampled": item.rows - chosen} if item.rows > chosen else {},
                      data={"copies": int(len(rows))})

    def finish(self, run: Run, results: list[Result]) -> None:
        plan, copies = self.mix_plan, {r.item: r.data["copies"] for r in results}
        if plan["effective_budget_tokens"] < plan["budget_tokens"]:
            run.say(f"mix: budget_tokens={plan['budget_tokens']} needs more than mixture.max_epochs repeats of some "
                    f"domain at these weights; sampled {plan['effective_budget_tokens']} tokens instead, keeping the weights")
        run.say(f"mix: {plan['documents']} documents (copies counted) for {plan['effective_budget_tokens']} tokens; "
                f"realised weights {plan['realised_weights']}")
        run.parts = [{**p, "rows": copies[p["name"]]} for p in run.parts]
        run.documents = {t.name: f"mix/{t.name}" for t in self.config.tokenize.tokenizers}
        result = run.mixture_result
        run.mixture = {"weights": result["weights"], "prior": result["prior"],
                       "realised_weights": plan["realised_weights"], "budget_tokens": plan["budget_tokens"],
                       "effective_budget_tokens": plan["effective_budget_tokens"], "search": "mixture/mixture.json"}
