"""Run a config: plan the stages, check them, run each on Ray, commit markers.

Stages and their directories under run_dir:

    read/                 parts/<input>-<chunk>.arrow, done/<input>.json
    tokenize/<tok>/       parts/<part>.arrow, done/<part>.json
    pack/<tok>/           done/<part>.json      (shards go to shards/<tok>/)
    shards/<tok>/         shard-NNNNN.arrow, manifest.json
    quarantine/           <stage>-<item>.jsonl  (rejected rows with reasons)

A stage is complete when `<stage>/_SUCCESS.json` exists; it is written last,
after every item's outputs and markers. A re-run with the same config skips
completed stages and completed items, so a killed run resumes and produces
byte-identical shards.
"""
from __future__ import annotations

import json
import logging
import sys
import time

import yaml

from operators import schema as S
from operators.tokenize import Tokenize
from pipeline import storage
from pipeline.config import Config, ConfigError, check_inputs
from pipeline.readers import expand_source
from pipeline.sink import write_manifest
from pipeline.stages import RunLayout, read_item, read_marker, tokenize_item, write_marker

log = logging.getLogger("tokenmill")


def say(message: str) -> None:
    print(f"[tokenmill] {message}", file=sys.stderr, flush=True)


# --- run directory ------------------------------------------------------------------

def prepare_run_dir(config: Config, layout: RunLayout) -> None:
    """Save the resolved config and its hash; refuse a run_dir that holds another config."""
    digest = config.content_sha256()
    hash_path = layout.path("config.sha256")
    if storage.exists(hash_path):
        previous = storage.read_text(hash_path).strip()
        if previous != digest:
            raise ConfigError(f"run_dir {layout.run_dir} holds a run of a different config (sha256 {previous[:12]}…, "
                              f"this one {digest[:12]}…): use a new run_dir, or delete the old one to start over")
    storage.makedirs(layout.run_dir)
    stale = storage.remove_stale_temporaries(layout.run_dir)  # only one run owns a run_dir at a time
    if stale:
        say(f"removed {stale} partial files left by an interrupted run")
    storage.write_text_atomic(layout.path("config.yaml"),
                              yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    storage.write_text_atomic(hash_path, digest + "\n")


def _stage_done(layout: RunLayout, stage: str) -> dict | None:
    marker = layout.stage_marker(stage)
    return read_marker(marker) if storage.exists(marker) else None


def _pending(layout: RunLayout, stage: str, items: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    done_names = {n[:-5] for n in storage.listdir(storage.join(layout.stage_dir(stage), "done")) if n.endswith(".json")}
    finished = {it["name"]: read_marker(layout.done_marker(stage, it["name"])) for it in items if it["name"] in done_names}
    return [it for it in items if it["name"] not in finished], finished


def _commit_stage(layout: RunLayout, stage: str, items: list[dict], seconds: float) -> list[dict]:
    """Check that every item of a stage is done and balances, then write the stage marker."""
    results = [read_marker(layout.done_marker(stage, it["name"])) for it in items]
    totals = {k: sum(r[k] for r in results) for k in ("rows_in", "rows_out", "rows_filtered", "rows_quarantined")}
    assert totals["rows_in"] == totals["rows_out"] + totals["rows_filtered"] + totals["rows_quarantined"], totals
    summary = {"stage": stage, **totals, "items": results, "seconds": round(seconds, 3)}
    write_marker(layout.stage_marker(stage), summary)
    say(f"{stage}: {_counts_line(summary)} in {seconds:.1f}s")
    return results


def _run_stage(stage: str, items: list[dict], work, config: Config, layout: RunLayout, **ray_kwargs) -> list[dict]:
    """Run the pending items of a stage, then commit the stage marker with totals."""
    from pipeline.adapter import run_items
    done = _stage_done(layout, stage)
    if done is not None:
        say(f"{stage}: complete, skipped ({_counts_line(done)})")
        return done["items"]
    pending, finished = _pending(layout, stage, items)
    if finished:
        say(f"{stage}: resuming, {len(finished)} of {len(items)} items already done")
    t0 = time.time()
    run_items(stage, pending, work, config=config, run_dir=layout.run_dir, **ray_kwargs)
    return _commit_stage(layout, stage, items, time.time() - t0)


def _run_tokenize_pack(config: Config, layout: RunLayout, parts: list[dict]) -> None:
    """Tokenize every part for every tokenizer in one pass over the parts; pack in the same
    pass each tokenizer whose shards need no model stage in between."""
    from pipeline.adapter import run_items
    names = [t.name for t in config.tokenize.tokenizers]
    inline = [t for t, n in enumerate(names)
              if config.pack and n != config.selected_tokenizer and config.mixture is None]
    stages = [f"tokenize/{n}" for n in names] + [f"pack/{names[t]}" for t in inline]
    if all(_stage_done(layout, s) for s in stages):
        say(f"tokenize{'+pack' if config.pack else ''}: complete, skipped")
        return
    done = {s: {n[:-5] for n in storage.listdir(storage.join(layout.stage_dir(s), "done"))} for s in stages}
    items = []
    for i, p in enumerate(parts):
        todo = [t for t, n in enumerate(names)
                if p["name"] not in done[f"tokenize/{n}"] or (t in inline and p["name"] not in done[f"pack/{n}"])]
        if todo:
            items.append({"name": p["name"], "tokenizers": todo, "pack": inline, "shard": i})
    if len(items) < len(parts):
        say(f"tokenize: resuming, {len(parts) - len(items)} of {len(parts)} parts already done")
    t0 = time.time()
    # Largest parts first: the last tasks are then small, and no core idles long at the end.
    size = {p["name"]: p.get("bytes", p["rows"]) for p in parts}
    items.sort(key=lambda it: -size[it["name"]])
    run_items("tokenize", items, tokenize_item, config=config, run_dir=layout.run_dir)
    for s in stages:
        if not _stage_done(layout, s):
            _commit_stage(layout, s, parts, time.time() - t0)


def _counts_line(summary: dict) -> str:
    return (f"rows_in={summary['rows_in']} rows_out={summary['rows_out']} "
            f"filtered={summary['rows_filtered']} quarantined={summary['rows_quarantined']}")


# --- planning ---------------------------------------------------------------------------

def check_chain(config: Config) -> list[str]:
    """Stages that will run, after checking each one's input columns exist upstream."""
    have = set(S.DOC_SCHEMA.names)
    chain = [("read", (), tuple(S.DOC_SCHEMA.names))]
    if config.embed:
        chain.append(("embed", (S.TEXT, S.PROMPT, S.RESPONSE), (S.EMBEDDING,)))
    if config.cluster:
        chain.append(("cluster", (S.EMBEDDING,), (S.CLUSTER_ID, S.DOMAIN_ID)))
    if config.tokenize:
        chain.append(("tokenize", Tokenize.reads, Tokenize.adds))
    if config.mixture:
        chain.append(("mixture", (S.DOMAIN_ID, S.INPUT_IDS, S.NUM_TOKENS), ()))
        chain.append(("mix", (S.ID, S.DOMAIN_ID), ()))
    if config.selected_tokenizer:
        from operators.score import TokenScorer
        chain.append(("select", TokenScorer.reads, TokenScorer.adds))
    if config.pack:
        chain.append(("pack", (S.ID, S.INPUT_IDS, S.TARGET_MASK), ()))
    for name, reads, adds in chain:
        missing = [c for c in reads if c not in have]
        if missing:
            raise ConfigError(f"stage {name} needs columns {missing} that no earlier stage produces")
        have |= set(adds)
    return [name for name, _, _ in chain]


def load_tokenizers(config: Config) -> list[Tokenize]:
    """Load each tokenizer once in the driver: bad specs fail before Ray starts."""
    ops = []
    for i, t in enumerate(config.tokenize.tokenizers if config.tokenize else []):
        op = Tokenize(spec=t.spec, add_bos=t.add_bos, add_eos=t.add_eos, chat_template=t.chat_template,
                      read_bytes=storage.read_bytes, exists=storage.exists)
        try:
            op.setup()
        except (ValueError, OSError) as e:
            raise ConfigError(f"tokenize.tokenizers.{i} ({t.name}): {e}") from None
        ops.append(op)
    return ops


# --- the run ------------------------------------------------------------------------------

def run(config: Config, address: str | None = None) -> dict:
    """Run every configured stage; returns {tokenizer name: manifest path}."""
    check_inputs(config)
    stages = check_chain(config)
    tokenizers = load_tokenizers(config)
    layout = RunLayout(config.run_dir)
    prepare_run_dir(config, layout)
    say(f"run_dir {config.run_dir}; stages: {', '.join(stages)}")

    from pipeline.adapter import init_ray
    init_ray(config.ray, address)

    inputs = []
    for s, src in enumerate(config.sources):
        paths = expand_source(src)
        if not paths:  # checked before Ray started; a file can still vanish in between
            raise ConfigError(f"sources.{s}.path: no input matches {src.path!r}")
        for f, path in enumerate(paths):
            inputs.append({"name": f"s{s:03d}-f{f:05d}", "source": s, "path": path})
    read_results = _run_stage("read", inputs, read_item, config, layout)
    parts = [p for r in read_results for p in r["parts"]]
    _report_quarantine(read_results)
    if config.embed:
        _run_climb_preprocessing(config, layout, parts)

    outputs = {}
    if not config.tokenize:
        say("done")
        return outputs
    names = [t.name for t in config.tokenize.tokenizers]
    for name, op in zip(names, tokenizers):
        storage.write_text_atomic(storage.join(layout.stage_dir(f"tokenize/{name}"), "tokenizer.json"),
                                  json.dumps({"name": name, **op.describe()}, indent=2, sort_keys=True))
    _run_tokenize_pack(config, layout, parts)
    source = {n: f"tokenize/{n}" for n in names}  # the stage each tokenizer's documents come from
    mixture_block: dict = {}
    if config.mixture:
        mixture_block = _run_mixture(config, layout, parts)
        source = {n: f"mix/{n}" for n in names}
    selected = config.selected_tokenizer
    if selected:
        _run_select(config, layout, parts, selected, source[selected])
        source[selected] = f"select/{selected}"
    if config.pack:
        for name, op in zip(names, tokenizers):
            stage = f"pack/{name}"
            if source[name] != f"tokenize/{name}":  # packed in the tokenize pass otherwise
                from pipeline.stages import pack_item
                _run_stage(stage, [{"name": p["name"], "shard": i, "tokenizer_name": name, "pad_id": op.tok.pad_id,
                                    "input_stage": source[name]} for i, p in enumerate(parts)], pack_item, config, layout)
            results = read_marker(layout.stage_marker(stage))["items"]
            outputs[name] = _write_manifest(config, layout, name, op, results, mixture_block)
    say("done")
    return outputs


def _run_climb_preprocessing(config: Config, layout: RunLayout, parts: list[dict]) -> None:
    """Embed every document on an actor pool; then fit clusters on a sample and assign all."""
    import ray
    from pipeline import climb
    e = config.embed
    gpus = ray.cluster_resources().get("GPU", 0)
    num_gpus = e.num_gpus if e.num_gpus is not None else (1.0 if gpus else 0.0)
    actors = min(e.actors, max(1, len(parts)))
    num_cpus = e.num_cpus or (1.0 if num_gpus else max(1.0, ray.cluster_resources().get("CPU", 1) // actors))
    items = [{"name": p["name"]} for p in parts]
    _run_stage("embed", items, climb.EmbedWorker, config, layout, num_cpus=num_cpus, num_gpus=num_gpus,
               actors=actors, actor_kwargs={"threads": int(num_cpus)})
    if config.cluster is None:
        return
    _run_stage("cluster/fit", [{"name": "fit", "parts": parts}], climb.cluster_fit_item, config, layout)
    assigned = _run_stage("cluster/assign", items, climb.cluster_assign_item, config, layout)
    report_path = layout.path("cluster", "clusters.json")
    report = (json.loads(storage.read_text(report_path)) if storage.exists(report_path)
              else climb.write_cluster_report(config, layout, parts, assigned))
    say(climb.describe_domains(report))


def _part_rows(layout: RunLayout, stage: str, parts: list[dict]) -> list[int]:
    """Documents in each part of a stage's output (from its item markers)."""
    key = "copies" if stage.startswith("mix/") else "rows_out"
    marker_stage = "mix" if stage.startswith("mix/") else stage
    return [read_marker(layout.done_marker(marker_stage, p["name"]))[key] for p in parts]


def _run_select(config: Config, layout: RunLayout, parts: list[dict], name: str, input_stage: str) -> None:
    """Score and select tokens for one tokenizer on an actor pool."""
    import ray
    from pipeline.stages import SelectWorker
    c = config.select
    num_gpus = c.num_gpus if c.num_gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    first_doc, items = 0, []
    for p, rows in zip(parts, _part_rows(layout, input_stage, parts)):
        items.append({"name": p["name"], "tokenizer_name": name, "first_doc": first_doc, "input_stage": input_stage})
        first_doc += rows
    _run_stage(f"select/{name}", items, SelectWorker, config, layout, num_cpus=c.num_cpus, num_gpus=num_gpus,
               actors=min(c.actors, max(1, len(items))))


def _run_mixture(config: Config, layout: RunLayout, parts: list[dict]) -> dict:
    """Search the domain weights, sample the corpus to them; returns the manifest's mixture block."""
    from pipeline import mixture as mx

    def run_stage(stage, items, work, **kw):
        return _run_stage(stage, items, work, config, layout, **kw)

    result = mx.run_search(config, layout, parts, run_stage, say)
    plan = mx.write_mix_plan(config, layout, result)
    _, search_name = mx.search_tokenizer(config)
    run_stage("mix", mx.mix_items(mx.tokenized_rows(layout, search_name, parts)), mx.mix_item)
    if plan["effective_budget_tokens"] < plan["budget_tokens"]:
        say(f"mix: budget_tokens={plan['budget_tokens']} needs more than mixture.max_epochs repeats of some domain "
            f"at these weights; sampled {plan['effective_budget_tokens']} tokens instead, keeping the weights")
    say(f"mix: {plan['documents']} documents (copies counted) for {plan['effective_budget_tokens']} tokens; "
        f"realised weights {plan['realised_weights']}")
    return {"weights": result["weights"], "prior": result["prior"], "realised_weights": plan["realised_weights"],
            "budget_tokens": plan["budget_tokens"], "effective_budget_tokens": plan["effective_budget_tokens"],
            "search": "mixture/mixture.json"}


def _report_quarantine(results: list[dict]) -> None:
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r.get("quarantine_reasons", {}).items():
            reasons[k] = reasons.get(k, 0) + v
    if reasons:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        say(f"quarantined rows by reason ({sum(reasons.values())} in quarantine/): {detail}")


def _selection_block(config: Config, layout: RunLayout, name: str, counts: dict) -> dict:
    if name != config.selected_tokenizer:
        return {"method": "none"}
    c = config.select
    block = {"method": c.method, "current_model": c.current_model, "ratio": c.ratio,
             "target_tokens": counts["target_tokens"], "loss_tokens": counts["loss_tokens"],
             "kept_fraction": round(counts["loss_tokens"] / counts["target_tokens"], 6) if counts["target_tokens"] else 0.0}
    if c.method == "sstoken":
        block.update(history_model=c.history_model, gamma=c.gamma, warmup_docs=c.warmup_docs)
    else:
        block.update(reference_model=c.reference_model, batch_docs=c.docs_per_batch)
    return block


def _write_manifest(config: Config, layout: RunLayout, name: str, op: Tokenize, results: list[dict],
                    mixture: dict | None = None) -> str:
    counts = {k: 0 for k in ("rows", "docs", "tokens", "target_tokens", "loss_tokens", "pad_tokens")}
    pieces = split_docs = 0
    for r in results:
        for k in counts:
            counts[k] += r["stats"][k]
        pieces += r["stats"]["pieces"]
        split_docs += r["stats"]["split_docs"]
    total = counts["tokens"] + counts["pad_tokens"]
    manifest = {
        "tokenizer": {"name": name, **op.describe()},
        "seq_len": config.pack.seq_len,
        "counts": counts,
        "packing": {"method": config.pack.method, "pieces": pieces, "split_docs": split_docs,
                    "padding_fraction": round(counts["pad_tokens"] / total, 6) if total else 0.0},
        "selection": _selection_block(config, layout, name, counts),
        "mixture": mixture or {},
        "shards": [{"file": r["file"], "rows": r["stats"]["rows"], "bytes": r["bytes"], "sha256": r["sha256"]}
                   for r in results],
        "compression": config.output.compression,
        "config_sha256": config.content_sha256(),
    }
    shard_dir = layout.shard_dir(name)
    write_manifest(shard_dir, manifest)
    say(f"shards/{name}: {counts['rows']} rows of {config.pack.seq_len}, {counts['docs']} docs, "
        f"padding {manifest['packing']['padding_fraction']:.2%}, {split_docs} split docs")
    return storage.join(shard_dir, "manifest.json")
