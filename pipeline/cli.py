"""`tokenmill` command line: run, demo, inspect, submit."""
from __future__ import annotations

import argparse
import os
import sys


def _run(args) -> int:
    from pipeline.config import load_config
    from pipeline.runner import run
    config = load_config(args.config, args.set)
    outputs = run(config, address=args.address)
    for name, manifest in outputs.items():
        print(f"{name}: {manifest}")
    return 0


def _demo(args) -> int:
    from pipeline.demo import run_demo
    return run_demo(args.run_dir, overrides=args.set, address=args.address)


def _inspect(args) -> int:
    from pipeline.inspect import inspect_run
    print(inspect_run(args.run_dir, verify=args.verify))
    return 0


def _submit(args) -> int:
    from pipeline.submit import main as submit_main
    return submit_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenmill", description="Raw text corpora -> training-ready token shards, on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a config on a local Ray (or join one with --address)")
    r.add_argument("config", help="YAML config file")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    r.set_defaults(func=_run)

    d = sub.add_parser("demo", help="run the main job offline on an embedded default corpus")
    d.add_argument("--run-dir", default="runs/demo", help="where the demo writes (default: runs/demo)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--address", default=None)
    d.set_defaults(func=_demo)

    i = sub.add_parser("inspect", help="print stage status, counts and shard statistics of a run")
    i.add_argument("run_dir")
    i.add_argument("--verify", action="store_true", help="re-read every shard: sha256, counts and invariants")
    i.set_defaults(func=_inspect)

    s = sub.add_parser("submit", help="submit a config as a Ray job to a cluster (Jobs API)")
    try:
        from pipeline.submit import add_submit_arguments
        add_submit_arguments(s)
    except ImportError:  # submission needs ray[default]
        s.add_argument("config")
    s.set_defaults(func=_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from pipeline.config import ConfigError
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
