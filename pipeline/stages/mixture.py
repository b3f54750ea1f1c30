"""mixture: the CLIMB mixture search (algorithms.md), proxies trained in parallel as Ray tasks.

    mixture/data/         domains.npz (domain id and tokens per document, corpus order),
                          domain-<d>.npy (proxy training streams), target.npy, vocab.npy
    mixture/state.json    the search: prior, schedule, every planned mixture (operators/mixture)
    mixture/round-<r>/    done/t<i>.json: one proxy run each, persisted as it finishes
    mixture/mixture.json  weights, prior, history, predictor rank correlation

Rounds run one after another; the proxies of a round run in parallel (`num_gpus` each when GPUs
exist). A killed search resumes: planned rounds are in state.json, finished proxies in their
markers, and a round's plan is a pure function of the trials before it.
"""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from operators import schema as S
from pipeline import sink, storage
from pipeline.layout import RunLayout, load_domains
from pipeline.stages.base import Context, Item, Resources, Result, Run, Stage
from pipeline.tokenizer_cache import get_tokenizer


def search_tokenizer(config) -> tuple[int, str]:
    names = [t.name for t in config.tokenize.tokenizers]
    name = config.mixture.tokenizer or names[0]
    return names.index(name), name


def save_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    storage.write_atomic(path, buf.getvalue())


def load_npy(path: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(path)))



def compact_ids(ids: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Token ids -> positions in the sorted `vocab`; ids not in it -> len(vocab)."""
    pos = np.searchsorted(vocab, ids)
    found = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == ids)
    return np.where(found, pos, len(vocab)).astype(np.int32)


def proxy_vocab(streams: list[np.ndarray], limit: int | None) -> np.ndarray:
    """The token ids proxies see, sorted int64; every other id shares one out-of-vocabulary id.

    All ids seen when there are at most `limit`; else the `limit` ids of highest summed share
    sum_s count_s(id) / len(s) over the streams (ties to the lower id). Each stream (a domain,
    the target rows, the task's questions and choices) counts equally, so the target's and a
    small domain's own tokens are not crowded out by a big domain's: the search upweights small
    domains and scores on the target. With a 50k-200k vocabulary tokenizer the embedding and
    logits of a tiny proxy are otherwise its whole cost; benchmarks/bench_proxy_vocab.py
    measures time and rank agreement against the full vocabulary."""
    streams = [np.asarray(s).ravel() for s in streams if np.size(s)]
    seen = np.unique(np.concatenate(streams)).astype(np.int64) if streams else np.zeros(0, np.int64)
    if limit is None or len(seen) <= limit:
        return seen
    size = int(seen[-1]) + 1
    share = sum(np.bincount(s, minlength=size) / s.size for s in streams)
    return np.sort(np.lexsort((np.arange(size), -share))[:limit])  # every id with share > 0: > limit are seen


@dataclasses.dataclass(frozen=True)
class DataItem(Item):
    parts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Trial(Item):
    round: int
    index: int
    seed: int
    vocab_size: int
    weights: dict


def mixture_data(ctx: Context, item: DataItem) -> Result:
    """Per-document domains and token counts, per-domain token streams, and the target rows."""
    from operators.mixture import token_prior
    config, layout, m = ctx.config, ctx.layout, ctx.config.mixture
    t, name = search_tokenizer(config)
    domains, tokens, streams, kept = [], [], {}, {}
    for part in item.parts:
        docs = sink.read_table(layout.part(f"tokenize/{name}", part))
        dom = docs.column(S.DOMAIN_ID).to_numpy(zero_copy_only=False).astype(np.int64)
        domains.append(dom)
        tokens.append(docs.column(S.NUM_TOKENS).to_numpy())
        flat = docs.column(S.INPUT_IDS).combine_chunks()
        offsets, values = flat.offsets.to_numpy(), flat.values.to_numpy()
        for i, d in enumerate(dom.tolist()):  # documents in corpus order until a domain has enough
            if kept.get(d, 0) < m.domain_tokens:
                streams.setdefault(d, []).append(values[offsets[i]:offsets[i + 1]].copy())  # no view: parts are freed
                kept[d] = kept.get(d, 0) + int(offsets[i + 1] - offsets[i])
    domains_N, tokens_N = np.concatenate(domains), np.concatenate(tokens)
    streams = {d: np.concatenate(chunks)[:m.domain_tokens] for d, chunks in streams.items()}
    target = _target_rows(config, t, ctx.verified) if m.target is not None else None
    scored = [target] if target is not None else [_task_ids(config, t, ctx.verified)]  # what the proxies are scored on
    vocab = proxy_vocab([s for d, s in streams.items() if d >= 0] + scored, m.proxy_vocab)
    save_npy(layout.path("mixture", "data", "vocab.npy"), vocab)
    buf = io.BytesIO()
    np.savez(buf, domain_ids=domains_N, num_tokens=tokens_N)
    storage.write_atomic(layout.path("mixture", "data", "domains.npz"), buf.getvalue())
    for d, stream in streams.items():
        save_npy(layout.path("mixture", "data", f"domain-{d}.npy"), compact_ids(stream, vocab))
    if target is not None:
        save_npy(layout.path("mixture", "data", "target.npy"), compact_ids(target, vocab))
    ids_D, prior_D = token_prior(domains_N, tokens_N)
    return Result(item.name, rows_in=len(domains_N), rows_out=len(domains_N),
                  data={"domain_ids": ids_D.tolist(), "prior": prior_D.tolist(), "vocab_size": int(len(vocab)) + 1})


def _target_rows(config, t: int, trusted: tuple[str, ...] = ()) -> np.ndarray:
    """The target corpus, tokenized by the search tokenizer, cut into proxy rows [n, seq_len]."""
    from pipeline.readers import expand_source, read_file
    m = config.mixture
    op = get_tokenizer(config, t, trusted)
    stream = []
    for path in expand_source(m.target):
        for chunk in read_file(m.target, path, config.read):
            stream += op(chunk.docs).column(S.INPUT_IDS).to_pylist()
    flat = np.concatenate([np.asarray(x, np.int32) for x in stream]) if stream else np.zeros(0, np.int32)
    n = min(m.target_rows, len(flat) // m.proxy.seq_len)
    if n < 1:
        raise ValueError(f"mixture.target: {len(flat)} tokens, fewer than one proxy row of {m.proxy.seq_len}")
    return flat[: n * m.proxy.seq_len].reshape(n, -1)


def _task_ids(config, t: int, trusted: tuple[str, ...] = ()) -> np.ndarray:
    """Token ids of the task's questions and " " + choices, as eval_multiple_choice encodes them."""
    texts = []
    for n, line in enumerate(storage.read_text(config.mixture.task).splitlines(), 1):
        try:
            item = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"mixture.task {config.mixture.task} line {n}: not JSON ({e})") from None
        if not isinstance(item, dict):
            raise ValueError(f"mixture.task {config.mixture.task} line {n}: expected an object, got {item!r:.100}")
        texts += [item["question"]] if isinstance(item.get("question"), str) else []
        texts += [" " + c for c in item.get("choices") or () if isinstance(c, str)]
    ids = get_tokenizer(config, t, trusted).tok.encode_texts(texts) if texts else []
    return np.concatenate([np.asarray(x, np.int64) for x in ids]) if ids else np.zeros(0, np.int64)


def proxy_trial(ctx: Context, item: Trial) -> Result:
    """Train and evaluate one proxy on one candidate mixture."""
    import time

    import torch
    from operators.proxy import eval_loss, eval_multiple_choice, rows_for_mixture, train_proxy
    config, layout, m = ctx.config, ctx.layout, ctx.config.mixture
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    streams = {int(d): load_npy(layout.path("mixture", "data", f"domain-{d}.npy"))
               for d, w in item.weights.items() if w > 0}
    rng = np.random.default_rng(item.seed)
    rows = rows_for_mixture(streams, {int(d): w for d, w in item.weights.items()}, m.proxy.steps * m.proxy.batch_size,
                            m.proxy.seq_len, rng)
    model = train_proxy(rows, item.vocab_size, m.proxy, device, seed=item.seed, num_threads=max(1, int(m.num_cpus)))
    if m.target is not None:
        score = eval_loss(model, load_npy(layout.path("mixture", "data", "target.npy")))
    else:
        op = get_tokenizer(config, search_tokenizer(config)[0], ctx.verified)
        questions = [json.loads(line) for line in storage.read_text(m.task).splitlines() if line.strip()]
        vocab = load_npy(layout.path("mixture", "data", "vocab.npy"))
        score = eval_multiple_choice(
            model, lambda s: compact_ids(np.asarray(op.tok.encode_texts([s])[0]), vocab).tolist(), questions)
    return Result(item.name, rows_in=1, rows_out=1,
                  data={"round": item.round, "index": item.index, "score": score, "seed": item.seed,
                        "seconds": round(time.time() - t0, 2)})


class Mixture(Stage):
    name = "mixture"
    reads = (S.DOMAIN_ID, S.INPUT_IDS, S.NUM_TOKENS)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.mixture is not None

    def execute(self, run: Run, executor) -> list[Result]:
        """Every round, then mixture.json; `run.mixture_result` holds its content."""
        out_path = run.layout.path("mixture", "mixture.json")
        if storage.exists(out_path):
            run.mixture_result = json.loads(storage.read_text(out_path))
            run.say(f"mixture: complete, skipped; weights {fmt_weights(run.mixture_result['weights'])}")
            return []
        from operators.mixture import final_result
        m = self.config.mixture
        data = executor.run_stage("mixture/data", [DataItem("data", tuple(p["name"] for p in run.parts))],
                                  mixture_data, Resources())[0].data
        state = self._load_state(run.layout, data)
        resources = Resources(num_cpus=m.num_cpus, num_gpus=run.default_gpus(m.num_gpus))
        for r in range(state.num_rounds):
            trials = state.ensure_planned(r)
            self._save_state(run.layout, state)  # the plan is persisted before any proxy of the round runs
            # One seed for every proxy (initialisation and row draws): scores then differ by mixture only.
            items = [Trial(f"t{t.index:04d}", r, t.index, m.seed, data["vocab_size"],
                           {str(d): w for d, w in zip(state.domain_ids, t.weights)}) for t in trials]
            run.say(f"mixture round {r + 1}/{state.num_rounds}: {len(items)} proxies")
            for res in executor.run_stage(f"mixture/round-{r}", items, proxy_trial, resources):
                d = res.data
                if state._trial(r, d["index"]).status == "planned":
                    state.record(r, d["index"], d["score"], {"seed": d["seed"], "seconds": d["seconds"]})
            self._save_state(run.layout, state)
        result = final_result(state)
        storage.write_text_atomic(out_path, json.dumps(result, indent=1) + "\n")
        rc = result["rank_correlation"].get("spearman")
        run.say(f"mixture: weights {fmt_weights(result['weights'])} (prior {fmt_weights(result['prior'])}); "
                f"predictor rank correlation {'n/a' if rc is None else f'{rc:.3f}'}")
        run.mixture_result = result
        return []

    def _load_state(self, layout: RunLayout, data: dict):
        from operators.mixture import SearchConfig, SearchState
        path = layout.path("mixture", "state.json")
        if storage.exists(path):
            return SearchState.from_dict(json.loads(storage.read_text(path)))
        m = self.config.mixture
        corpus_tokens = float(sum(load_domains(layout)[1]))
        # RegMix caps w_d <= max_epochs * prior_d * corpus / budget. When the budget is more than
        # max_epochs times the corpus no mixture satisfies that: search with the reference code's
        # caps (ratio 1) and let the mix stage lower the budget to what the weights allow.
        ratio = corpus_tokens / m.budget_tokens if corpus_tokens * m.max_epochs >= m.budget_tokens else 1.0
        search = SearchConfig(rounds=tuple(m.rounds), seed=m.seed, num_draws=m.num_draws, max_epochs=m.max_epochs,
                              metric="target_loss" if m.target is not None else "task_accuracy",
                              epoch_budget_ratio=ratio)
        return SearchState.create(prior=data["prior"], domain_ids=data["domain_ids"], config=search)

    @staticmethod
    def _save_state(layout: RunLayout, state) -> None:
        storage.write_text_atomic(layout.path("mixture", "state.json"), json.dumps(state.to_dict(), indent=1))


def fmt_weights(weights: dict) -> str:
    return ", ".join(f"{d}: {w:.3f}" for d, w in sorted(weights.items(), key=lambda kv: -kv[1]))
