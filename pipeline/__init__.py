"""tokenmill pipeline: config, storage, readers, sinks, the Ray adapter and the CLI.

This is the only package that imports ray (in `adapter.py`, `submit.py`).
"""
