"""One module per stage; the protocol is in `base.py`, the order in `pipeline/runner.py`."""
