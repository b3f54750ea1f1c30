"""Real stages with a pause a test can kill into (tests/integration/test_faults.py).

`KillableTokenize` and `KillableEmbed` do exactly what `tokenize` and `embed` do (same outputs),
then, after the item's files are written and before its marker, pause as `faults/plan.json`
(next to run_dir) says, writing `faults/started-<stage>-<item>-<attempt>` with the worker's pid
first, so the test knows which process to kill and when:

    {"tokenize": {"pause_s": 60, "once": true}}   # the first item to get there pauses, once
    {"tokenize": {"pause_s": 1.5}}                # every item pauses (a stage long enough to lose a node in)

The first attempt of an item is the one that pauses (`once`: only the first item's); a retry
after its worker was killed runs straight through. Run with a custom registry
(`registry()`); `python -m tests.integration.fault_stages CONFIG --address ADDR` runs a config
with it on a cluster (this module is pickled by value, so nodes need not import it).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cloudpickle

from pipeline.stages.base import Result
from pipeline.stages.embed import Embed, EmbedWorker
from pipeline.stages.tokenize import TokenizeStage

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def faults_dir(run_dir: str) -> Path:
    return Path(run_dir).parent / "faults"


def pause_point(run_dir: str, stage: str, item: str) -> None:
    d = faults_dir(run_dir)
    plan_path = d / "plan.json"
    if not plan_path.exists():
        return
    plan = json.loads(plan_path.read_text()).get(stage)
    if not plan:
        return
    attempt = len(list(d.glob(f"started-{stage}-{item}-*"))) + 1
    if plan.get("once"):
        try:
            fd = os.open(d / f"claimed-{stage}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return  # another item, or this one's retry
    elif attempt > 1:
        return
    (d / f"started-{stage}-{item}-{attempt}").write_text(str(os.getpid()))
    time.sleep(plan["pause_s"])


class KillableTokenize(TokenizeStage):
    @staticmethod
    def work(ctx, item) -> Result:
        result = TokenizeStage.work(ctx, item)
        pause_point(ctx.layout.run_dir, "tokenize", item.name)
        return result


class KillableEmbedWorker(EmbedWorker):
    def __call__(self, item) -> Result:
        result = super().__call__(item)
        pause_point(self.layout.run_dir, "embed", item.name)
        return result


class KillableEmbed(Embed):
    Worker = KillableEmbedWorker


def registry():
    from pipeline.runner import STAGES
    swap = {TokenizeStage: KillableTokenize, Embed: KillableEmbed}
    return [swap.get(s, s) for s in STAGES]


if __name__ == "__main__":
    import argparse

    from pipeline.config import load_config
    from pipeline.runner import run
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--address", default=None)
    args = p.parse_args()
    run(load_config(args.config), address=args.address, registry=registry())
