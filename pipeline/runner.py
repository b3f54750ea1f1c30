"""Run a config: the ordered list of stages, the column-chain check, and the run loop.

Each stage is a module under `pipeline/stages/` (protocol: `pipeline/stages/base.py`); adding a
stage is one module plus one line in STAGES. The executor (`pipeline/executor.py`) runs each
stage's items on Ray, writes the markers and balances the counts; a re-run with the same config
skips what is done, so a killed run resumes to byte-identical shards (layout: pipeline/layout.py),
after verifying what it skips (pipeline/integrity.py: a damaged item is recomputed).

Intermediate parts are removed once no later stage reads them, unless `keep_intermediate: true`.
Which stage's parts are live comes from the run state: the document parts (`run.doc_stage`)
until every tokenizer's documents are held by a token stage (`run.documents`), then each
tokenizer's current stage; a stage's parts die when a later stage takes over from it, and the
last ones when the shards are written. Embeddings (`embed/parts`) are not document parts and
are kept (re-clustering reuses them), as are `cluster/assignments`.
"""
from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable

import yaml

from pipeline import storage
from pipeline.config import Config, ConfigError
from pipeline.inputs import check_inputs
from pipeline.duplicate_ids import report_duplicate_ids
from pipeline.integrity import remove_intermediates, verify_run_dir
from pipeline.layout import RunLayout, acquire_lock, release_lock
from pipeline.manifest import write_shard_manifest
from pipeline.stages.base import Run, Stage
from pipeline.stages.cluster_assign import ClusterAssign
from pipeline.stages.cluster_fit import ClusterFit
from pipeline.stages.decontaminate import Decontaminate
from pipeline.stages.dedup import Dedup
from pipeline.stages.embed import Embed
from pipeline.stages.filter import Filter
from pipeline.stages.mix import Mix
from pipeline.stages.mixture import Mixture
from pipeline.stages.pack import Pack
from pipeline.stages.plain import Plain
from pipeline.stages.read import Read
from pipeline.stages.select import Select
from pipeline.stages.tokenize import TokenizeStage
from pipeline.tokenizer_cache import check_tokenizers, verified_cores

STAGES: list[type[Stage]] = [
    Plain,          # the fused fast path: read+tokenize+pack per input range, when nothing sits between
    Read,           # sources -> validated document parts (quarantine)
    Filter,         # user filters from the config
    Decontaminate,  # documents sharing an n-gram with an eval set (before dedup: a kept copy is never removed later)
    Dedup,          # exact and MinHash near duplicates: hash, buckets, components, apply
    Embed,          # CLIMB: document embeddings (actor pool)
    ClusterFit,     # CLIMB: k-means, prune, merge into domains (one task)
    ClusterAssign,  # CLIMB: every document -> cluster, domain; clusters.json
    TokenizeStage,  # every tokenizer in one pass (packs the tokenizers no later stage needs)
    Mixture,        # CLIMB: mixture search with proxy models
    Mix,            # sample the corpus to the mixture
    Select,         # ssToken / Rho-1 token selection (actor pool)
    Pack,           # the remaining tokenizers' documents -> shards
]


def say(message: str) -> None:
    print(f"[tokenmill] {message}", file=sys.stderr, flush=True)


def staged_for_registered_stages(config: Config, registry: list[type[Stage]]) -> Config:
    """A stage registered beside the built-in ones needs the documents between reading and
    packing, so the fused plain path is off for that run (the saved config says `fused: false`)."""
    if config.plain_path and any(cls not in STAGES and cls.instances(config) for cls in registry):
        return config.model_copy(update={"fused": False})
    return config


def plan_stages(config: Config, registry: list[type[Stage]] = STAGES) -> list[Stage]:
    """The stages this config runs, in order, after checking each one's input columns exist upstream."""
    stages = [s for cls in registry for s in cls.instances(config)]
    have: set[str] = set()
    for stage in stages:
        missing = [c for c in stage.reads if c not in have]
        if missing:
            raise ConfigError(f"stage {stage.name} needs columns {missing} that no earlier stage produces")
        have |= set(stage.adds)
    return stages


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


def run(config: Config, address: str | None = None, verbose: bool = False,
        registry: list[type[Stage]] = STAGES, release_ray: bool = False) -> dict:
    """Run every configured stage; returns {tokenizer name: manifest path}. `release_ray` (the
    CLI): a Ray this run started is shut down as soon as its stages are done."""
    check_inputs(config)
    config = staged_for_registered_stages(config, registry)
    if config.ray.backend == "processes":  # start it now: its processes load while the driver checks
        if address:
            raise ConfigError(f"--address {address}: ray.backend: processes runs on this machine only")
        from pipeline.processes import LocalPool
        backend = LocalPool(config)
    else:  # likewise, Ray starts in a thread while the driver checks
        from pipeline.executor import RayStart
        backend = RayStart(config.ray, address, verbose, release=release_ray)
    try:
        return _run(config, verbose, registry, backend)
    finally:
        backend.close()


def _run(config: Config, verbose: bool, registry: list[type[Stage]], backend) -> dict:
    stages = plan_stages(config, registry)
    for stage in stages:
        stage.check()
    pool = backend if config.ray.backend == "processes" else None
    tokenizers = pool.check_tokenizers() if pool is not None else check_tokenizers(config)
    layout = RunLayout(config.run_dir)
    storage.makedirs(layout.run_dir)
    acquire_lock(layout)
    try:
        prepare_run_dir(config, layout)
        say(f"run_dir {config.run_dir}; stages: {', '.join(s.name for s in stages)}")
        executor_cls, cluster = start_executor(backend, pool)
        verification = verify_run_dir(layout)
        if verification.items:
            say(verification.line())
        # Ray's workers skip the fast-core verifications the driver did (the pool's verified their own)
        verified = verified_cores(config) if pool is None else ()
        run_state = Run(config, layout, say, cluster=cluster, tokenizers=tokenizers, verified=verified)
        executor = executor_cls(layout, run_state.context, say)
        threading.Thread(target=_import_report, daemon=True).start()
        for i, stage in enumerate(stages):
            live = live_parts(run_state)
            results = stage.execute(run_state, executor)
            if i == 0:  # the reading stage (read, or the fused plain path)
                report_duplicate_ids(run_state, stage.name, results or [], say)
            _remove_intermediates(config, layout, live - live_parts(run_state))
        if pool is None:
            backend.release()   # nothing below runs on Ray
        outputs = _write_manifests(config, layout, run_state)
        if config.export:
            from pipeline.export import run_exports
            run_exports(config, config.run_dir)
        if config.pack is not None:  # the shards are the product; without them the parts are
            _remove_intermediates(config, layout, live_parts(run_state))
        from pipeline.report import write_report
        say(f"report: {write_report(config.run_dir)}")
    finally:
        release_lock(layout)
    say("done")
    return outputs


def _import_report() -> None:
    """The report's imports, in a thread while the stages run: matplotlib (~0.7 s) and
    pyarrow.dataset, which the shard statistics read with (~0.45 s: it imports pandas)."""
    try:
        import pyarrow.dataset  # noqa: F401

        import pipeline.report.html  # noqa: F401
    except Exception:  # noqa: BLE001 - write_report imports them again and raises there
        pass


def start_executor(backend, pool=None) -> tuple[Callable, dict[str, float]]:
    """The executor for this run and the CPUs/GPUs it has: Ray (a fresh local cluster, or the one
    asked for: `RayStart`), or with `ray.backend: processes` the run's local process pool
    (pipeline/processes.py)."""
    if pool is not None:
        from pipeline.processes import ProcessExecutor
        return functools.partial(ProcessExecutor, pool=pool), {"CPU": float(pool.cpus)}
    from pipeline.executor import Executor, cluster_resources
    backend.wait()
    return Executor, cluster_resources()


def live_parts(run_state: Run) -> set[str]:
    """Stages whose parts a later stage may still read (see the module docstring)."""
    return set(run_state.documents.values()) if run_state.documents else {run_state.doc_stage}


def _remove_intermediates(config: Config, layout: RunLayout, stages: set[str]) -> None:
    if not config.keep_intermediate and stages:
        removed = remove_intermediates(layout, stages)
        if removed:
            say(f"removed intermediate parts no later stage reads: {', '.join(removed)} (keep_intermediate: true keeps them)")


def _write_manifests(config: Config, layout: RunLayout, run_state: Run) -> dict:
    """shards/<tok>/manifest.json for every tokenizer that was packed; {name: manifest path}."""
    outputs = {}
    for name, block in run_state.tokenizers.items():
        if name in run_state.shards:
            outputs[name], m = write_shard_manifest(config, layout.shard_dir(name), block, run_state.shards[name],
                                                    run_state.mixture)
            c, p = m["counts"], m["packing"]
            say(f"shards/{name}: {c['rows']} rows of {m['seq_len']}, {c['docs']} docs, "
                f"padding {p['padding_fraction']:.2%}, {p['split_docs']} split docs")
            if not c["docs"]:
                say(f"warning: shards/{name} holds no document: every row was filtered or quarantined, "
                    "or the inputs hold none (the counts above say which)")
    return outputs
