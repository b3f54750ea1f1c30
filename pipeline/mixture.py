"""CLIMB mixture search on Ray, and the mix stage that samples the corpus to its result.

    mixture/data/         domains.npz (domain id and tokens per document, corpus order),
                          domain-<d>.npy (proxy training streams), target.npy (target rows)
    mixture/state.json    the search: prior, schedule, every planned mixture (operators/mixture.py)
    mixture/round-<r>/    done/t<i>.json: one proxy run each, persisted as it finishes
    mixture/mixture.json  weights, prior, history, predictor rank correlation
    mix/plan.npz          which documents (and how many copies) realise the weights and budget
    mix/<tok>/parts/      the mixed documents per part, for every tokenizer

Rounds run one after another; the proxies of a round run in parallel as Ray
tasks (`num_gpus` each when GPUs exist). A killed search resumes: planned
rounds are in state.json, finished proxies in their markers, and a round's plan
is a pure function of the trials before it.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa

from operators import schema as S
from pipeline import sink, storage
from pipeline.config import Config
from pipeline.stages import INTERMEDIATE_COMPRESSION, RunLayout, get_tokenizer, read_marker, write_marker


def search_tokenizer(config: Config) -> tuple[int, str]:
    names = [t.name for t in config.tokenize.tokenizers]
    name = config.mixture.tokenizer or names[0]
    return names.index(name), name


def _save_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    storage.write_atomic(path, buf.getvalue())


def _load_npy(path: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(path)))


# --- data for the proxies ------------------------------------------------------------------

def mixture_data_item(config: Config, run_dir: str, item: dict) -> dict:
    """Per-document domains and token counts, per-domain token streams, and the target rows."""
    from operators.mixture import token_prior
    layout, m = RunLayout(run_dir), config.mixture
    t, name = search_tokenizer(config)
    domains, tokens, streams, kept = [], [], {}, {}
    for part in item["parts"]:
        docs = sink.read_table(layout.part(f"tokenize/{name}", part))
        dom = docs.column(S.DOMAIN_ID).to_numpy(zero_copy_only=False).astype(np.int64)
        domains.append(dom)
        tokens.append(docs.column(S.NUM_TOKENS).to_numpy())
        flat = docs.column(S.INPUT_IDS).combine_chunks()
        offsets = flat.offsets.to_numpy()
        values = flat.values.to_numpy()
        for i, d in enumerate(dom.tolist()):  # documents in corpus order until a domain has enough
            if kept.get(d, 0) < m.domain_tokens:
                streams.setdefault(d, []).append(values[offsets[i]:offsets[i + 1]].copy())  # no view: parts are freed
                kept[d] = kept.get(d, 0) + int(offsets[i + 1] - offsets[i])
    domains_N, tokens_N = np.concatenate(domains), np.concatenate(tokens)
    streams = {d: np.concatenate(chunks)[:m.domain_tokens] for d, chunks in streams.items()}
    target = _target_rows(config, t) if m.target is not None else None
    # Proxies see only these ids: a compact vocabulary (plus one id for anything else) keeps a
    # 100k-vocab tokenizer from making the embedding and logits of a tiny proxy its whole cost.
    vocab = np.unique(np.concatenate(list(streams.values()) + ([target.ravel()] if target is not None else [])))
    _save_npy(layout.path("mixture", "data", "vocab.npy"), vocab)
    buf = io.BytesIO()
    np.savez(buf, domain_ids=domains_N, num_tokens=tokens_N)
    storage.write_atomic(layout.path("mixture", "data", "domains.npz"), buf.getvalue())
    for d, stream in streams.items():
        _save_npy(layout.path("mixture", "data", f"domain-{d}.npy"), compact_ids(stream, vocab))
    if target is not None:
        _save_npy(layout.path("mixture", "data", "target.npy"), compact_ids(target, vocab))
    ids_D, prior_D = token_prior(domains_N, tokens_N)
    result = {"item": item["name"], "rows_in": len(domains_N), "rows_out": len(domains_N), "rows_filtered": 0,
              "rows_quarantined": 0, "domain_ids": ids_D.tolist(), "prior": prior_D.tolist(),
              "vocab_size": int(len(vocab)) + 1}
    write_marker(layout.done_marker("mixture/data", item["name"]), result)
    return result


def compact_ids(ids: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Token ids -> positions in the sorted `vocab`; ids not in it -> len(vocab)."""
    pos = np.searchsorted(vocab, ids)
    found = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == ids)
    return np.where(found, pos, len(vocab)).astype(np.int32)


def _target_rows(config: Config, t: int) -> np.ndarray:
    """The target corpus, tokenized by the search tokenizer, cut into proxy rows [n, seq_len]."""
    from pipeline.readers import expand_source, read_file
    m = config.mixture
    op = get_tokenizer(config, t)
    stream = []
    for path in expand_source(m.target):
        for chunk in read_file(m.target, path, config.read):
            stream += op.tokenize(chunk.docs)[0].column(S.INPUT_IDS).to_pylist()
    flat = np.concatenate([np.asarray(x, np.int32) for x in stream]) if stream else np.zeros(0, np.int32)
    n = min(m.target_rows, len(flat) // m.proxy.seq_len)
    if n < 1:
        raise ValueError(f"mixture.target: {len(flat)} tokens, fewer than one proxy row of {m.proxy.seq_len}")
    return flat[: n * m.proxy.seq_len].reshape(n, -1)


# --- one proxy run --------------------------------------------------------------------------

def proxy_config(config: Config, seed: int):
    from operators.proxy import ProxyConfig
    return ProxyConfig(seed=seed, **config.mixture.proxy.model_dump())


def _proxy_score(config: Config, layout: RunLayout, weights: dict, seed: int, vocab_size: int, threads: int,
                 device: str) -> float:
    from operators.proxy import eval_loss, eval_multiple_choice, rows_for_mixture, train_proxy
    m = config.mixture
    streams = {int(d): _load_npy(layout.path("mixture", "data", f"domain-{d}.npy")) for d, w in weights.items() if w > 0}
    rng = np.random.default_rng(seed)
    rows = rows_for_mixture(streams, {int(d): w for d, w in weights.items()}, m.proxy.steps * m.proxy.batch_size,
                            m.proxy.seq_len, rng)
    model = train_proxy(rows, vocab_size, proxy_config(config, seed), device, num_threads=threads)
    if m.target is not None:
        return eval_loss(model, _load_npy(layout.path("mixture", "data", "target.npy")))
    t, _ = search_tokenizer(config)
    op = get_tokenizer(config, t)
    items = [json.loads(line) for line in storage.read_text(m.task).splitlines() if line.strip()]
    vocab = _load_npy(layout.path("mixture", "data", "vocab.npy"))
    return eval_multiple_choice(model, lambda s: compact_ids(np.asarray(op.tok.encode_texts([s])[0]), vocab).tolist(), items)


def proxy_trial_item(config: Config, run_dir: str, item: dict) -> dict:
    """Train and evaluate one proxy on one candidate mixture."""
    import os
    import time

    import torch
    layout = RunLayout(run_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    score = _proxy_score(config, layout, item["weights"], item["seed"], item["vocab_size"],
                         max(1, int(config.mixture.num_cpus)), device)
    result = {"item": item["name"], "rows_in": 1, "rows_out": 1, "rows_filtered": 0, "rows_quarantined": 0,
              "round": item["round"], "index": item["index"], "score": score, "seed": item["seed"],
              "seconds": round(time.time() - t0, 2), "pid": os.getpid()}
    write_marker(layout.done_marker(f"mixture/round-{item['round']}", item["name"]), result)
    return result


# --- the search ----------------------------------------------------------------------------

def _load_state(layout: RunLayout, config: Config, data: dict):
    from operators.mixture import SearchConfig, SearchState
    path = layout.path("mixture", "state.json")
    if storage.exists(path):
        return SearchState.from_dict(json.loads(storage.read_text(path)))
    m = config.mixture
    corpus_tokens = float(sum(_load_domains(layout)[1]))
    # RegMix caps w_d <= max_epochs * prior_d * corpus / budget. When the budget is more than
    # max_epochs times the corpus no mixture satisfies that: search with the reference code's
    # caps (ratio 1) and let the mix stage lower the budget to what the weights allow.
    ratio = corpus_tokens / m.budget_tokens if corpus_tokens * m.max_epochs >= m.budget_tokens else 1.0
    search = SearchConfig(rounds=tuple(m.rounds), seed=m.seed, num_draws=m.num_draws, max_epochs=m.max_epochs,
                          metric="target_loss" if m.target is not None else "task_accuracy",
                          epoch_budget_ratio=ratio)
    return SearchState.create(prior=data["prior"], domain_ids=data["domain_ids"], config=search)


def _save_state(layout: RunLayout, state) -> None:
    storage.write_text_atomic(layout.path("mixture", "state.json"), json.dumps(state.to_dict(), indent=1))


def _load_domains(layout: RunLayout) -> tuple[np.ndarray, np.ndarray]:
    z = np.load(io.BytesIO(storage.read_bytes(layout.path("mixture", "data", "domains.npz"))))
    return z["domain_ids"], z["num_tokens"]


def run_search(config: Config, layout: RunLayout, parts: list[dict], run_stage, say) -> dict:
    """All rounds, then mixture.json; returns its content."""
    import ray
    out_path = layout.path("mixture", "mixture.json")
    if storage.exists(out_path):
        result = json.loads(storage.read_text(out_path))
        say(f"mixture: complete, skipped; weights {_fmt(result['weights'])}")
        return result
    from operators.mixture import final_result
    data = run_stage("mixture/data", [{"name": "data", "parts": [p["name"] for p in parts]}], mixture_data_item)[0]
    state = _load_state(layout, config, data)
    m = config.mixture
    num_gpus = m.num_gpus if m.num_gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    for r in range(state.num_rounds):
        trials = state.ensure_planned(r)
        _save_state(layout, state)  # the plan is persisted before any proxy of the round runs
        # One seed for every proxy (initialisation and row draws): scores then differ by mixture only.
        items = [{"name": f"t{t.index:04d}", "round": r, "index": t.index, "seed": m.seed,
                  "vocab_size": data["vocab_size"],
                  "weights": {str(d): w for d, w in zip(state.domain_ids, t.weights)}} for t in trials]
        say(f"mixture round {r + 1}/{state.num_rounds}: {len(items)} proxies")
        for res in run_stage(f"mixture/round-{r}", items, proxy_trial_item, num_cpus=m.num_cpus, num_gpus=num_gpus):
            if state._trial(r, res["index"]).status == "planned":
                state.record(r, res["index"], res["score"], {"seed": res["seed"], "seconds": res["seconds"]})
        _save_state(layout, state)
    result = final_result(state)
    storage.write_text_atomic(out_path, json.dumps(result, indent=1) + "\n")
    rc = result["rank_correlation"]
    say(f"mixture: weights {_fmt(result['weights'])} (prior {_fmt(result['prior'])}); "
        f"predictor rank correlation {rc.get('spearman')}")
    return result


def _fmt(weights: dict) -> str:
    return ", ".join(f"{d}: {w:.3f}" for d, w in sorted(weights.items(), key=lambda kv: -kv[1]))


# --- the mix stage ---------------------------------------------------------------------------

def write_mix_plan(config: Config, layout: RunLayout, result: dict) -> dict:
    """Choose documents (with copies) for the weights and the token budget; saved once."""
    from operators.mixture import realised_weights, sample_to_mixture
    path = layout.path("mix", "plan.json")
    if storage.exists(path):
        return json.loads(storage.read_text(path))
    domains_N, tokens_N = _load_domains(layout)
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


def mix_item(config: Config, run_dir: str, item: dict) -> dict:
    """One part's chosen documents, repeated as the plan says, for every tokenizer.

    A document chosen once keeps its id; a document chosen k > 1 times appears as
    `<id>#0` ... `<id>#<k-1>`, adjacent in the part.
    """
    layout = RunLayout(run_dir)
    z = np.load(io.BytesIO(storage.read_bytes(layout.path("mix", "plan.npz"))))
    lo, hi = item["first_doc"], item["first_doc"] + item["rows"]
    sel = (z["doc_indices"] >= lo) & (z["doc_indices"] < hi)
    rows, copies = z["doc_indices"][sel] - lo, z["copy_numbers"][sel]
    order = np.lexsort((copies, rows))
    rows, copies = rows[order], copies[order]
    repeated = np.isin(rows, rows[copies > 0])
    result = {"item": item["name"], "rows_in": item["rows"], "rows_out": int(len(np.unique(rows))),
              "rows_filtered": item["rows"] - int(len(np.unique(rows))), "rows_quarantined": 0, "copies": int(len(rows))}
    for tok in config.tokenize.tokenizers:
        docs = sink.read_table(layout.part(f"tokenize/{tok.name}", item["name"]))
        taken = docs.take(pa.array(rows, pa.int64()))
        ids = [f"{i}#{c}" if rep else i for i, c, rep in zip(taken.column(S.ID).to_pylist(), copies.tolist(), repeated.tolist())]
        taken = taken.set_column(taken.column_names.index(S.ID), S.ID, pa.array(ids, pa.string()))
        sink.write_table(layout.part(f"mix/{tok.name}", item["name"]), taken, compression=INTERMEDIATE_COMPRESSION,
                         rows_per_batch=1 << 16)
    write_marker(layout.done_marker("mix", item["name"]), result)
    return result


def mix_items(parts: list[dict]) -> list[dict]:
    items, first = [], 0
    for p in parts:
        items.append({"name": p["name"], "first_doc": first, "rows": p["tokenized_rows"]})
        first += p["tokenized_rows"]
    return items


def tokenized_rows(layout: RunLayout, name: str, parts: list[dict]) -> list[dict]:
    """Parts with the number of documents tokenize kept (pruned clusters are left out there)."""
    out = []
    for p in parts:
        marker = read_marker(layout.done_marker(f"tokenize/{name}", p["name"]))
        out.append({**p, "tokenized_rows": marker["rows_out"]})
    return out
