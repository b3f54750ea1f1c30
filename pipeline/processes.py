"""A single-node executor without Ray: `ray.backend: processes` (or `tokenmill run --processes`).

Starting a local Ray cluster and shutting it down costs 4–10 s on 2 cores (benchmarks/bench_peers.py
prints both), which is most of a small run's wall time and of a dry run's. This executor runs the
same stages with the same items, markers, retries and counts on a `ProcessPoolExecutor` of this
machine's CPUs, so a resume, a rerun and the shards are the same as under Ray (the byte identity
is tested: the fused path in tests/integration/test_plain.py, a CLIMB run in test_climb_run.py).

* Task stages: one pool process per `num_cpus` of a task; each item is one call.
* Actor stages (a `Worker` class): one pool process per actor; each process builds the Worker
  once (the model loads once per process) and keeps it for the stage's later items.
* A worker process that dies (SIGKILL, out of memory) breaks the pool: the items without a
  marker are run again on a new pool, up to TASK_RETRIES times, as Ray retries a lost task. An
  exception raised by the work fails the stage with that error.
* Processes start from a forkserver: no thread state of the driver is forked, and the pool's
  processes import the stage modules once.

CPU only (`ray.num_gpus` must be 0), this machine only (`--address` is refused).
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from pipeline.config import Config
from pipeline.executor import TASK_RETRIES, WORKER_ENV, Executor, Progress, _run_item, _run_worker_item
from pipeline.layout import StageError
from pipeline.stages.base import Context, Item, Resources
from pipeline.tokenizer_cache import check_tokenizers, get_tokenizer

_WORKERS: dict[str, object] = {}  # in a pool process: stage -> its Worker, built on the first item
# What the pool's processes get, as Ray's workers get WORKER_ENV from the runtime_env; and one math
# thread per process, as Ray gives its workers (no oversubscribed cores).
POOL_ENV = {**WORKER_ENV, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def _pool_environment():
    """POOL_ENV's unset keys in the driver's environment while the pool's processes start, then
    removed again: a forkserver started now copies them (libraries that read them on import see
    them), and a run in a user's process leaves that process's environment as it found it."""
    added = {k: v for k, v in POOL_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _warm(config: Config) -> None:
    """Pool process initializer: load the run's tokenizers now, while the driver checks them.
    Best effort: an item that needs a tokenizer that failed here loads it again and reports why."""
    for key, value in POOL_ENV.items():   # a forkserver started before this pool lacks them
        os.environ.setdefault(key, value)
    try:
        for i in range(len(config.tokenize.tokenizers) if config.tokenize else 0):
            get_tokenizer(config, i)
    except Exception:  # noqa: BLE001 (reported by the item, with its name)
        pass


class LocalPool:
    """The run's process pool: started as the run begins, so its processes start up and load the
    tokenizers while the driver checks the config; restarted when a process dies."""

    def __init__(self, config: Config):
        self.config, self.cpus = config, config.ray.num_cpus or len(os.sched_getaffinity(0))
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        with _pool_environment():
            pool = ProcessPoolExecutor(self.cpus, mp_context=multiprocessing.get_context("forkserver"),
                                       initializer=_warm, initargs=(self.config,))
            for _ in range(self.cpus):   # a process starts per submitted call: start them all now
                pool.submit(os.getpid)
        return pool

    def check_tokenizers(self) -> dict[str, dict]:
        """`tokenizer_cache.check_tokenizers` in a pool process, which has loaded them already:
        the driver need not load them too (the same ConfigError when one cannot load)."""
        return self.pool.submit(check_tokenizers, self.config).result()

    def restart(self) -> None:
        self.terminate()
        self.pool = self._start()

    def terminate(self) -> None:
        """Stop every process now, running items included (a re-run removes their temporaries)."""
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            proc.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _call_worker(ctx: Context, stage: str, worker_cls: type, res: Resources, item: Item) -> dict:
    impl = _WORKERS.get(stage)
    if impl is None:
        _WORKERS.clear()  # one stage at a time: drop an earlier stage's model
        impl = _WORKERS[stage] = worker_cls(ctx, res)
    return _run_worker_item(ctx, stage, impl, item)


class ProcessExecutor(Executor):
    def __init__(self, layout, context: Context, say: Callable[[str], None], pool: LocalPool):
        super().__init__(layout, context, say)
        self.pool = pool

    def _run_tasks(self, stage: str, items: list[Item], work: Callable, res: Resources) -> None:
        slots = int(self.pool.cpus // max(res.num_cpus, 1.0)) if res.num_cpus else self.pool.cpus
        self._run(stage, items, functools.partial(_run_item, self.context, stage, work), slots)

    def _run_actors(self, stage: str, items: list[Item], worker: type, res: Resources) -> None:
        self._run(stage, items, functools.partial(_call_worker, self.context, stage, worker, res),
                  min(res.actors, self.pool.cpus))

    def _run(self, stage: str, items: list[Item], call: Callable[[Item], dict], slots: int) -> None:
        progress = Progress(stage, len(items))
        todo = list(items)
        for attempt in range(TASK_RETRIES + 1):
            try:
                self._drain(todo, call, max(1, slots), progress)
                return
            except BrokenProcessPool:
                # A pool process died (killed, out of memory): every item it had not committed
                # has no marker; run those again on a new pool, as Ray retries a lost task.
                self.pool.restart()
                done = self.layout.done_items(stage)
                todo = [it for it in todo if it.name not in done]
                self.say(f"{stage}: a worker process died; retrying {len(todo)} items "
                         f"({attempt + 1} of {TASK_RETRIES})" if attempt < TASK_RETRIES else
                         f"{stage}: a worker process died again")
            except BaseException:
                self.pool.terminate()   # the stage failed: stop its other items now
                raise
        raise StageError(f"stage {stage}: worker processes died {TASK_RETRIES + 1} times; "
                         f"{len(todo)} items unfinished (first: {todo[0].name if todo else '-'})")

    def _drain(self, items: list[Item], call: Callable[[Item], dict], slots: int, progress: Progress) -> None:
        """At most `slots` items in flight (a task's num_cpus, an actor stage's actors)."""
        queue, running = list(items), set()
        while queue or running:
            while queue and len(running) < slots:
                running.add(self.pool.pool.submit(call, queue.pop(0)))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                progress.update(f.result())
