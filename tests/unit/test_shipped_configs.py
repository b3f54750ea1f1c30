"""Every shipped config validates."""
from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path):
    assert load_config(str(path)).sources


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_header_names_exactly_the_tokenizers_listed(path):
    """The comment header says what the config tokenizes (it once announced two and listed one)."""
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    config = load_config(str(path))
    for tok in config.tokenize.tokenizers:
        assert tok.spec.split(":", 1)[1].split("/")[-1].removesuffix("_offline") in header
    assert "two tokenizers" not in header or len(config.tokenize.tokenizers) == 2
