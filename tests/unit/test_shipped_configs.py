"""Every shipped config validates."""
from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path):
    assert load_config(str(path)).sources
