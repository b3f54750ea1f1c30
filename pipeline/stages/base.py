"""The stage protocol: what a stage declares, and what the executor does with it.

A stage is one module under `pipeline/stages/` with one `Stage` subclass that answers:

* **whether it runs**: `enabled(config)` (a section of the config is present);
* **which columns** it reads and adds (`reads`, `adds`): the runner checks the chain of
  every enabled stage before Ray starts;
* **what its items are**: `plan(run)` returns `Item`s (an input file, a part, a shard),
  each with a unique `name`;
* **what one item does**: `work(ctx, item) -> Result` for a function stage (Ray tasks), or a
  `Worker` class (`__init__(ctx, resources)` once per actor, then `__call__(item) -> Result`) for a model
  stage (an actor pool with `num_gpus` per actor);
* **what it needs**: `resources(run)` (CPUs and GPU fraction per task or actor, actors);
* **what it leaves for later stages**: `finish(run, results)` runs in the driver after the
  stage is committed (a report, which stage holds each tokenizer's documents now, ...).

The executor — not the stage — runs items, writes `done/<item>.json` from each `Result`,
checks `rows_in = rows_out + rows_filtered + rows_quarantined`, and writes `_SUCCESS.json`.
A stage with several steps (the mixture search's rounds) overrides `execute`.
Stage modules never import ray and never import another stage module for plumbing: shared
run-directory code is in `pipeline/layout.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pipeline.config import Config
from pipeline.layout import RunLayout


@dataclasses.dataclass(frozen=True)
class Item:
    """One unit of work of a stage; subclasses add what the work needs. `name` is unique in
    the stage and names its marker, so it must be stable across runs of the same config."""
    name: str


@dataclasses.dataclass
class Result:
    """What one item did. The counts balance: rows_in = rows_out + rows_filtered + rows_quarantined.
    `reasons` counts rows filtered or quarantined by reason; `data` is the stage's own output
    description (parts written, shard records, statistics), JSON-serialisable."""
    item: str
    rows_in: int = 0
    rows_out: int = 0
    rows_filtered: int = 0
    rows_quarantined: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, body: dict) -> Result:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_out + self.rows_filtered + self.rows_quarantined


@dataclasses.dataclass(frozen=True)
class Resources:
    """Per task (function stages) or per actor (Worker stages)."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: int = 1


@dataclasses.dataclass(frozen=True)
class Context:
    """What a worker process gets: the config and the run directory (picklable, small)."""
    config: Config
    layout: RunLayout
    verified: tuple[str, ...] = ()   # fast tokenizer cores the driver verified (tokenizer_cache.verified_cores)


@dataclasses.dataclass
class Run:
    """Driver-side state shared by the stages of one run (never sent to workers)."""
    config: Config
    layout: RunLayout
    say: Any                                  # say(message): one line on the console
    cluster: dict[str, float] = dataclasses.field(default_factory=dict)  # total CPU/GPU of the cluster
    parts: list[dict] = dataclasses.field(default_factory=list)          # document parts: name, rows, bytes
    doc_stage: str = "read"                   # the stage whose parts hold the current documents
    tokenizers: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> manifest block
    documents: dict[str, str] = dataclasses.field(default_factory=dict)  # tokenizer -> stage holding its docs
    shards: dict[str, list[Result]] = dataclasses.field(default_factory=dict)  # tokenizer -> pack results
    mixture_result: dict = dataclasses.field(default_factory=dict)       # mixture.json
    mixture: dict = dataclasses.field(default_factory=dict)              # the manifest's mixture block
    verified: tuple[str, ...] = ()            # fast tokenizer cores the driver verified, for the workers

    @property
    def context(self) -> Context:
        return Context(self.config, self.layout, self.verified)

    def documents_now_in(self, stage: str, rows: dict[str, int]) -> None:
        """After a stage that removes documents: its parts hold them now, with these row counts;
        parts left empty drop out of the run."""
        self.parts = [{**p, "rows": rows[p["name"]]} for p in self.parts if rows[p["name"]]]
        self.doc_stage = stage

    def default_gpus(self, requested: float | None) -> float:
        """GPUs per actor: as configured, else one when the cluster has GPUs."""
        if requested is not None:
            return requested
        return 1.0 if self.cluster.get("GPU", 0) else 0.0


class Stage:
    name: ClassVar[str]                      # its directory under run_dir, and its label
    reads: ClassVar[tuple[str, ...]] = ()    # columns it needs from earlier stages
    adds: ClassVar[tuple[str, ...]] = ()     # columns it adds for later stages
    Worker: ClassVar[type | None] = None     # set for actor-pool stages; else `work` runs as tasks

    def __init__(self, config: Config):
        self.config = config

    @classmethod
    def enabled(cls, config: Config) -> bool:
        raise NotImplementedError

    @classmethod
    def instances(cls, config: Config) -> list[Stage]:
        """The stages this module contributes to a run: one, or one per tokenizer (pack), or none."""
        return [cls(config)] if cls.enabled(config) else []

    def check(self) -> None:
        """Driver-side checks before Ray starts (raise ConfigError naming the key)."""

    def plan(self, run: Run) -> list[Item]:
        raise NotImplementedError

    @staticmethod
    def work(ctx: Context, item: Item) -> Result:
        raise NotImplementedError

    def resources(self, run: Run) -> Resources:
        return Resources()

    def finish(self, run: Run, results: list[Result]) -> None:
        """Driver-side follow-up once the stage is committed (or found complete)."""

    def execute(self, run: Run, executor) -> list[Result]:
        results = executor.run_stage(self.name, self.plan(run), self.Worker or self.work, self.resources(run))
        self.finish(run, results)
        return results


def packed_in_tokenize(config: Config, tokenizer: str) -> bool:
    """Whether a tokenizer's shards are packed in the tokenize pass (no model or mixture stage
    between tokenize and pack for it) rather than by a pack stage over intermediate parts."""
    return config.pack is not None and config.mixture is None and tokenizer != config.selected_tokenizer


def report_quarantine(run: Run, results: list[Result]) -> None:
    """One console line: the quarantined rows of a reading stage, by reason."""
    from collections import Counter
    reasons: Counter = Counter()
    for r in results:
        reasons.update({k: v for k, v in r.reasons.items()})
    if reasons:
        detail = ", ".join(f"{k}: {v}" for k, v in reasons.most_common())
        run.say(f"quarantined rows by reason ({sum(reasons.values())} in quarantine/): {detail}")
