"""The executor: the one place where stage work meets Ray (with `submit.py`, the only ray import).

Ray is imported where it is used, not with this module: the process pool (`--processes`,
pipeline/processes.py) runs stages through the same item functions with no Ray, and importing it
costs its driver and each of its workers ~0.4 s on 2 cores.

`Executor.run_stage(stage, items, work, resources)`:

* skips a stage whose `_SUCCESS.json` exists, and the items whose `done/<item>.json` exists;
* runs a function as plain Ray tasks, all submitted at once (Ray queues them by resources, so
  every CPU stays busy; Ray Data's per-operator budget ran these one at a time on 2 CPUs), and
  a class as an actor pool (one construction per actor, `num_gpus` per actor), each item sent to
  the next free actor;
* retries: a task or actor call lost to a dead worker process is retried (`max_retries`,
  `max_task_retries`), a dead actor restarted (`max_restarts`); an exception raised by the work
  itself fails the stage with that error;
* writes each item's marker from its `Result` inside the worker, after the item's outputs, with
  `data.commit`: every file the item committed under run_dir (bytes, sha256) and every run_dir
  file it read (`storage.recording`), which a re-run verifies before skipping it
  (pipeline/integrity.py); then checks the counts balance and writes the stage marker last;
* a full disk or a refusing object store fails the stage with a `StageError` naming the stage,
  the item and the path (the item's temporaries are removed and it has no marker: a re-run
  after the cause is fixed redoes it);
* prints one progress line per stage: items done, rows/s and MB/s, ETA.

Model actors reserve a fraction of a CPU by default (design.md, "Ray facts"): actors that each
reserve a whole CPU can take every CPU and starve the tasks that feed them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from unittest import mock

from pipeline import storage
from pipeline.config import RayConfig
from pipeline.layout import RunLayout, StageError, read_marker, write_marker
from pipeline.stages.base import Context, Item, Resources, Result

TASK_RETRIES = 2   # re-runs of a task whose worker process died (not of a raised exception)

# One encoding thread per worker: Ray gives each task one CPU, and the tokenizers' own pools
# (HF tokenizers' rayon, fastokens' BPE threads) would otherwise each take every core.
# Arrow buffers from the system allocator, which returns them when freed: with Arrow's default
# (mimalloc) a fused-path worker's peak RSS grew from 1x to 8x the input (`--processes`, GPT-2
# file: 1.11-1.17x for the process tree; 1.08x with this), and runs were no faster.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "FASTOKENS_BPE_THREADS": "1", "ARROW_DEFAULT_MEMORY_POOL": "system"}


def _init_args(ray_cfg: RayConfig, address: str | None, verbose: bool) -> tuple[dict, dict[str, str]]:
    """ray.init's keyword arguments, and the environment a fresh local cluster's workers need."""
    address = address or os.environ.get("RAY_ADDRESS") or ray_cfg.address
    if address is not None:
        return {"address": address}, {}
    # Workers import user code (config filters) the way the driver does: from its working directory.
    pythonpath = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    worker_env = {**WORKER_ENV, "PYTHONPATH": pythonpath, **({} if verbose else {"HF_HUB_DISABLE_PROGRESS_BARS": "1"})}
    kwargs: dict = {"address": "local", "include_dashboard": False}
    if ray_cfg.num_cpus:
        kwargs["num_cpus"] = ray_cfg.num_cpus
    if ray_cfg.num_gpus is not None:
        kwargs["num_gpus"] = ray_cfg.num_gpus
    return kwargs, worker_env


def _ray_init(kwargs: dict, verbose: bool) -> None:
    import ray
    with _lean_local_node(kwargs.get("address") == "local"):
        ray.init(logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=True, **kwargs)


# A fresh local cluster (one node, dashboard off) has no use for two of the Python processes
# ray.init starts on its head: the autoscaler's monitor (nothing to scale) and the API server
# (with include_dashboard=False it serves only usage stats, and ray.init polls until it has
# registered). On 2 cores, start + first tasks + shutdown: 6.5-8.2 s with them, 4.2-4.6 s without
# (ray.init 4.1-5.7 -> 3.0-3.2 s, ray.shutdown 1.2-1.4 -> 0.4 s). Ray is pinned (pyproject.toml);
# a Ray whose Node lacks these methods starts in full, as before. Joining a cluster is untouched.
_LEAN_SKIPS = ("start_monitor", "start_api_server")


@contextlib.contextmanager
def _lean_local_node(local: bool):
    from ray._private import node
    if not local or not all(callable(getattr(node.Node, name, None)) for name in _LEAN_SKIPS):
        yield
        return
    with contextlib.ExitStack() as stack:
        for name in _LEAN_SKIPS:
            stack.enter_context(mock.patch.object(node.Node, name, lambda self, *a, **kw: None))
        yield


def init_ray(ray_cfg: RayConfig, address: str | None = None, verbose: bool = False) -> None:
    """Join a cluster only when asked (`--address`, RAY_ADDRESS, `ray.address`); otherwise start
    a fresh local Ray, even when an earlier `ray start` left a cluster file on this machine."""
    import ray
    if ray.is_initialized():
        return
    kwargs, worker_env = _init_args(ray_cfg, address, verbose)
    # A local cluster's raylet takes this process's environment when it starts, and its workers
    # take the raylet's: that carries worker_env at no cost, where a runtime_env made each first
    # task wait ~1.2 s longer (measured on 2 cores). The driver's own environment is put back.
    with mock.patch.dict(os.environ, worker_env):   # set for ray.init only, then restored
        _ray_init(kwargs, verbose)


class RayStart:
    """A run's Ray, started in a thread: a local cluster takes ~5 s to start on 2 cores, and the
    driver's own checks (inputs, tokenizers: ~2 s) run meanwhile; `wait()` before the first task.

    The thread lives as long as the cluster: Ray ties the processes it starts to the thread that
    starts them (PR_SET_PDEATHSIG is per thread), so they would die with a thread that returned.
    With `release=True` (the CLI, whose process ends with the run), `release()` has that thread
    shut Ray down once the stages are done, so its ~1.4 s overlaps the manifests and the report;
    `close()` waits for it. A Ray already initialized (a caller's, a test's) is used as it is."""

    def __init__(self, ray_cfg: RayConfig, address: str | None, verbose: bool, release: bool = False):
        import ray
        self.owned = not ray.is_initialized()
        self._release = release and self.owned
        self._error: BaseException | None = None
        self._ready, self._done = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._env = None
        if not self.owned:
            self._ready.set()
            return
        kwargs, worker_env = _init_args(ray_cfg, address, verbose)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _exit_on_sigterm)   # what ray.init sets on the main thread
        # Set here, in the main thread, and put back in wait(): the raylet takes it (see init_ray).
        self._env = mock.patch.dict(os.environ, worker_env)
        self._env.start()
        self._thread = threading.Thread(target=self._own, args=(kwargs, verbose), name="ray", daemon=True)
        self._thread.start()

    def _own(self, kwargs: dict, verbose: bool) -> None:
        try:
            with _quiet_thread_warning():
                _ray_init(kwargs, verbose)
        except BaseException as e:  # raised in the driver's thread by wait()
            self._error = e
            return
        finally:
            self._ready.set()
        self._done.wait()
        import ray
        ray.shutdown()

    def _started(self) -> None:
        """Wait until ray.init has returned or failed, then give the driver its own environment back."""
        self._ready.wait()
        if self._env is not None:
            self._env.stop()
            self._env = None

    def wait(self) -> None:
        self._started()
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        """Begin shutting down a Ray this run started (release=True): nothing after runs on it."""
        if self._release:
            self._done.set()

    def close(self) -> None:
        self._started()
        if self._release and self._thread is not None:
            self._done.set()
            self._thread.join()
            self._thread = None


class _SigtermWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _exit_on_sigterm(signum, frame):
    sys.exit(signum)


@contextlib.contextmanager
def _quiet_thread_warning():
    """ray.init sets no SIGTERM handler off the main thread, and says so: RayStart sets the same
    one (exit, so that atexit shuts Ray down) from the main thread, so the line is noise."""
    log, flt = logging.getLogger("ray._private.worker"), _SigtermWarningFilter()
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


def cluster_resources() -> dict[str, float]:
    import ray
    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def _worker_identity() -> dict:
    """Which process and which (logical) GPUs ran an item: recorded in its marker."""
    ray = sys.modules.get("ray")   # a process that never imported Ray is no Ray worker
    gpus = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else []
    return {"pid": os.getpid(), "gpu_ids": [str(g) for g in gpus]}


def _commit_item(layout: RunLayout, stage: str, result: Result, record: storage.CommitRecord) -> dict:
    if not isinstance(result, Result):
        raise TypeError(f"stage {stage}: work returned {type(result).__name__}, expected a Result")
    result.data["commit"] = record.to_json()
    body = result.to_json()
    try:
        write_marker(layout.done_marker(stage, result.item), body)
    except storage.StorageError as e:
        raise StageError(f"stage {stage}, item {result.item}: {e}") from None
    return body


def _recorded(layout: RunLayout, stage: str, item: Item, call: Callable[[], Result]) -> tuple[Result, storage.CommitRecord]:
    """Run one item with its commits recorded; storage failures become a StageError naming it."""
    with storage.recording(layout.run_dir) as record:
        try:
            return call(), record
        except storage.StorageError as e:
            raise StageError(f"stage {stage}, item {item.name}: {e}") from None


def _run_item(ctx: Context, stage: str, work: Callable, item: Item) -> dict:
    result, record = _recorded(ctx.layout, stage, item, lambda: work(ctx, item))
    return _commit_item(ctx.layout, stage, result, record)


class _StageActor:
    """Hosts one Worker of a model stage: constructed once, then called per item."""

    def __init__(self, ctx: Context, worker_cls: type, resources: Resources):
        self.ctx, self.impl = ctx, worker_cls(ctx, resources)

    def __call__(self, stage: str, item: Item) -> dict:
        return _run_worker_item(self.ctx, stage, self.impl, item)


def _run_worker_item(ctx: Context, stage: str, impl, item: Item) -> dict:
    result, record = _recorded(ctx.layout, stage, item, lambda: impl(item))
    result.data.setdefault("worker", _worker_identity())
    return _commit_item(ctx.layout, stage, result, record)


def _get(ref):
    """ray.get, re-raising a StageError from a worker as itself (its message is the whole story)."""
    import ray
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, StageError):
            raise e.cause from None
        raise


class Progress:
    """One line per stage: items done, rows/s, MB/s, ETA; redrawn in place on a terminal,
    printed at most every `every` seconds otherwise (job logs)."""

    def __init__(self, stage: str, total: int, every: float = 10.0):
        self.stage, self.total, self.every = stage, total, every
        self.done = self.rows = self.bytes = 0
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, result: dict) -> None:
        self.done += 1
        self.rows += result.get("rows_in", 0)
        self.bytes += result.get("data", {}).get("bytes_in", 0)
        now = time.time()
        if self.tty or now - self.last >= self.every or self.done == self.total:
            self.last = now
            end = "\n" if self.done == self.total or not self.tty else ""
            print(("\r" if self.tty else "") + self.line(now), end=end, file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        dt = max(now - self.t0, 1e-9)
        rate = f"{self.rows / dt:,.0f} rows/s" + (f", {self.bytes / dt / 1e6:.1f} MB/s" if self.bytes else "")
        eta = (self.total - self.done) * dt / self.done if self.done else 0.0
        tail = f"ETA {eta:.0f}s" if self.done < self.total else f"{dt:.1f}s"
        return f"[tokenmill] {self.stage}: {self.done}/{self.total} items, {rate}, {tail}"


class Executor:
    def __init__(self, layout: RunLayout, context: Context, say: Callable[[str], None]):
        self.layout, self.context, self.say = layout, context, say
        self._context_ref = None

    def run_stage(self, stage: str, items: list[Item], work: Callable | type, resources: Resources) -> list[Result]:
        """Run the pending items of a stage, then commit it; returns every item's Result in order."""
        names = [it.name for it in items]
        if len(set(names)) != len(names):
            raise RuntimeError(f"stage {stage}: item names are not unique")
        summary = self.layout.stage_summary(stage)
        if summary is not None:
            self.say(f"{stage}: complete, skipped ({counts_line(summary)})")
            return [Result.from_json(r) for r in summary["items"]]
        done = self.layout.done_items(stage)
        pending = [it for it in items if it.name not in done]
        if len(pending) < len(items):
            self.say(f"{stage}: resuming, {len(items) - len(pending)} of {len(items)} items already done")
        t0 = time.time()
        if pending:
            if isinstance(work, type):
                self._run_actors(stage, pending, work, resources)
            else:
                self._run_tasks(stage, pending, work, resources)
        try:
            return self._commit_stage(stage, items, time.time() - t0)
        except storage.StorageError as e:
            raise StageError(f"stage {stage}: {e}") from None

    def _context(self):
        if self._context_ref is None:
            import ray
            self._context_ref = ray.put(self.context)
        return self._context_ref

    def _run_tasks(self, stage: str, items: list[Item], work: Callable, res: Resources) -> None:
        import ray
        remote = ray.remote(_run_item).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                               max_retries=TASK_RETRIES, name=stage)
        pending = [remote.remote(self._context(), stage, work, it) for it in items]
        progress = Progress(stage, len(items))
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                progress.update(_get(ready[0]))
        except BaseException:
            # The stage failed: stop its other tasks (an interrupted write removes its temporary)
            # rather than let them run on after the driver has given up.
            for ref in pending:
                ray.cancel(ref)
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=10)
            raise

    def _run_actors(self, stage: str, items: list[Item], worker: type, res: Resources) -> None:
        import ray
        actor_cls = ray.remote(_StageActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                                   max_restarts=TASK_RETRIES, max_task_retries=TASK_RETRIES)
        # The context by value, not as an object-store ref: a restarted actor must be able to
        # rebuild itself (Ray warns that a ref argument may be gone by then).
        actors = [actor_cls.remote(self.context, worker, res) for _ in range(max(1, min(res.actors, len(items))))]
        queue, running = list(items), {}
        progress = Progress(stage, len(items))
        try:
            while queue or running:
                for actor in actors:
                    if queue and actor not in running.values():
                        running[actor.__call__.remote(stage, queue.pop(0))] = actor
                ready, _ = ray.wait(list(running), num_returns=1)
                running.pop(ready[0])
                progress.update(_get(ready[0]))
        finally:
            for actor in actors:
                ray.kill(actor)

    def _commit_stage(self, stage: str, items: list[Item], seconds: float) -> list[Result]:
        results = [Result.from_json(read_marker(self.layout.done_marker(stage, it.name))) for it in items]
        unbalanced = [r.item for r in results if not r.balanced]
        if unbalanced:
            raise RuntimeError(f"stage {stage}: counts do not balance for items {unbalanced[:5]}")
        summary = {"stage": stage, **totals(results), "items": [r.to_json() for r in results],
                   "seconds": round(seconds, 3)}
        write_marker(self.layout.stage_marker(stage), summary)
        self.say(f"{stage}: {counts_line(summary)} in {seconds:.1f}s")
        return results


def totals(results: list[Result]) -> dict[str, int]:
    return {k: sum(getattr(r, k) for r in results) for k in ("rows_in", "rows_out", "rows_filtered", "rows_quarantined")}


def counts_line(summary: dict) -> str:
    return (f"rows_in={summary['rows_in']} rows_out={summary['rows_out']} "
            f"filtered={summary['rows_filtered']} quarantined={summary['rows_quarantined']}")
