"""`python -m jobs.run CONFIG [--set key=value ...]`: the entry point a Ray job runs.

Inside a Ray job (RAY_ADDRESS set by the Jobs API) it joins that cluster;
elsewhere it starts a local Ray, exactly like `tokenmill run`.
"""
import os
import sys

from pipeline.cli import main

if __name__ == "__main__":
    argv = ["run", *sys.argv[1:]]
    if os.environ.get("RAY_ADDRESS") and "--address" not in argv:
        argv += ["--address", "auto"]
    sys.exit(main(argv))
