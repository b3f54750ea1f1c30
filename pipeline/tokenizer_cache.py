"""Tokenizers for the stages: loaded once in the driver (bad specs fail before Ray starts) and
once per worker process (a cache keyed by what decides the ids)."""
from __future__ import annotations

from operators.tokenize import Tokenize
from pipeline import storage
from pipeline.config import Config, ConfigError

_TOKENIZERS: dict[tuple, Tokenize] = {}


def _build(config: Config, index: int, trusted: tuple[str, ...]) -> Tokenize:
    t = config.tokenize.tokenizers[index]
    op = Tokenize(spec=t.spec, add_bos=t.add_bos, add_eos=t.add_eos, chat_template=t.chat_template,
                  read_bytes=storage.read_bytes, exists=storage.exists, encoder=t.encoder, trusted=trusted)
    op.setup()
    return op


def get_tokenizer(config: Config, index: int, trusted: tuple[str, ...] = ()) -> Tokenize:
    """The loaded tokenizer `tokenize.tokenizers[index]`, one load per process. `trusted`: the
    fast cores the driver verified (`Context.verified`), which a worker need not verify again."""
    t = config.tokenize.tokenizers[index]
    key = (t.spec, t.add_bos, t.add_eos, t.chat_template, t.encoder)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _build(config, index, trusted)
    return _TOKENIZERS[key]


def verified_cores(config: Config) -> tuple[str, ...]:
    """The fast cores this process verified for the run's tokenizers (after check_tokenizers)."""
    ops = [get_tokenizer(config, i) for i in range(len(config.tokenize.tokenizers) if config.tokenize else 0)]
    return tuple(sorted({op.tok.core_key for op in ops if op.tok.core_key}))


def check_tokenizers(config: Config) -> dict[str, dict]:
    """Load every tokenizer in the driver; returns {name: the manifest's tokenizer block}."""
    blocks = {}
    for i, t in enumerate(config.tokenize.tokenizers if config.tokenize else []):
        try:
            op = get_tokenizer(config, i)
        except (ValueError, OSError) as e:
            raise ConfigError(f"tokenize.tokenizers.{i} ({t.name}): {e}") from None
        blocks[t.name] = {"name": t.name, **op.describe()}
    return blocks
