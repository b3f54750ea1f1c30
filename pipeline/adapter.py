"""The one place where stage work meets Ray.

A stage is a list of items (an input file, a part, a shard) and a function or
class that processes one item and returns its counts. `run_items` runs them as
a Ray Data `map_batches` over the item list:

* a function runs as plain Ray tasks, one per item, all submitted at once
  (CPU stages; per-process caches keep a tokenizer loaded across the tasks of
  one worker);
* a class (constructor once per actor, then called per item) runs as an actor
  pool, with `num_gpus` per actor when the stage asks for GPUs.

Model actors reserve a fraction of a CPU by default: on a small machine, actors
that each reserve a whole CPU can take every CPU and starve the tasks that feed
them (design.md, "Ray facts").
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import numpy as np
import ray

from pipeline.config import Config, RayConfig

log = logging.getLogger("tokenmill")


def init_ray(ray_cfg: RayConfig, address: str | None = None) -> None:
    """Join a cluster (`address`, RAY_ADDRESS) or start a local single-node Ray."""
    if ray.is_initialized():
        return
    address = address or ray_cfg.address
    kwargs = {"log_to_driver": True, "include_dashboard": False} if address is None else {}
    if address is None:
        if ray_cfg.num_cpus:
            kwargs["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.num_gpus is not None:
            kwargs["num_gpus"] = ray_cfg.num_gpus
    ray.init(address=address, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}} if address is None else None,
             logging_level=logging.WARNING, **kwargs)
    # Ray Data logs every scheduling step at INFO; keep its progress bars and warnings only.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.execution_options.preserve_order = False  # results carry their own keys


def _run_tasks(stage: str, items: list[dict], fn, *, config: Config, run_dir: str, num_cpus: float,
               num_gpus: float) -> list[dict]:
    """One Ray task per item, all submitted at once: Ray queues them by resources, so every
    CPU stays busy. (Ray Data's map_batches held these stages to one task at a time on a
    2-CPU node: its per-operator resource budget backpressured the second task.)"""
    from tqdm import tqdm
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2)(fn).options(name=stage)
    config_ref = ray.put(config)
    pending = {remote.remote(config_ref, run_dir, it): it["name"] for it in items}
    by_item = {}
    with tqdm(total=len(items), desc=stage, unit="item", file=sys.stderr, disable=None) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                result = ray.get(ref)
                by_item[result["item"]] = result
                bar.update(1)
    return [by_item[it["name"]] for it in items]


def _encode(items: list[dict]) -> list[dict]:
    return [{"item": json.dumps(it)} for it in items]


def run_items(stage: str, items: list[dict], work: Callable[[Config, str, dict], dict] | type, *,
              config: Config, run_dir: str, num_cpus: float = 1.0, num_gpus: float = 0.0,
              actors: int | None = None, actor_kwargs: dict | None = None) -> list[dict]:
    """Process every item on Ray; returns the items' results in input order."""
    if not items:
        return []
    ds = ray.data.from_items(_encode(items), override_num_blocks=len(items))
    if isinstance(work, type):
        cls = work

        class _Actor:
            def __init__(self):
                self.impl = cls(config=config, run_dir=run_dir, **(actor_kwargs or {}))

            def __call__(self, batch):
                out = [json.dumps(self.impl(json.loads(s))) for s in batch["item"]]
                return {"result": np.array(out, dtype=object)}

        _Actor.__name__ = f"{cls.__name__}Actor"
        ds = ds.map_batches(_Actor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors or 1),
                            num_cpus=num_cpus, num_gpus=num_gpus)
    else:
        return _run_tasks(stage, items, work, config=config, run_dir=run_dir, num_cpus=num_cpus, num_gpus=num_gpus)
    results = [json.loads(r["result"]) for r in ds.take_all()]
    by_item = {r["item"]: r for r in results}
    missing = [it["name"] for it in items if it["name"] not in by_item]
    if missing:
        raise RuntimeError(f"stage {stage}: no result for items {missing[:5]}")
    return [by_item[it["name"]] for it in items]
