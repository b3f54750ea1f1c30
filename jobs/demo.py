"""`python -m jobs.demo [--run-dir DIR]`: the demo as a Ray job entry point (run_dir may be s3://...)."""
import os
import sys

from pipeline.cli import main

if __name__ == "__main__":
    argv = ["demo", *sys.argv[1:]]
    if os.environ.get("RAY_ADDRESS") and "--address" not in argv:
        argv += ["--address", "auto"]
    sys.exit(main(argv))
