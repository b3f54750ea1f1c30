"""Inputs a config names (sources, tokenizer files, models, eval sets) checked before anything
runs: every missing one listed in one error, by key path."""
from __future__ import annotations

from pipeline import storage
from pipeline.config import Config, ConfigError


def check_inputs(config: Config) -> None:
    """Fail before anything runs when an input file or tokenizer is missing."""
    problems = []
    for i, src in enumerate(config.sources):
        fmt = src.resolved_format
        if fmt == "hf":
            continue  # a datasets spec is resolved by datasets itself
        matches = storage.glob(src.path)
        if not matches:
            problems.append(f"  sources.{i}.path: no file matches {src.path!r}")
        elif src.is_glob and src.format == "auto":
            unknown = [m for m in matches if src.format_of(m) == "hf_disk"]
            if unknown:
                problems.append(f"  sources.{i}.path: cannot tell the format of {unknown[0]!r} "
                                f"(+{len(unknown) - 1} more) by its extension: set sources.{i}.format")
    if config.tokenize:
        for i, tok in enumerate(config.tokenize.tokenizers):
            kind, _, where = tok.spec.partition(":")
            if kind in ("hf", "sentencepiece") and not storage.exists(where):
                problems.append(f"  tokenize.tokenizers.{i}.spec: file not found: {where}")
    if config.decontaminate is not None:
        for i, src in enumerate(config.decontaminate.sources):
            if src.resolved_format != "hf" and not storage.glob(src.path):
                problems.append(f"  decontaminate.sources.{i}.path: no file matches {src.path!r}")
    if config.embed is not None and config.embed.model is not None and not storage.exists(config.embed.model):
        problems.append(f"  embed.model: model directory not found: {config.embed.model}")
    if config.cluster is not None and config.cluster.prune and config.cluster.prune.classifier \
            and not storage.exists(config.cluster.prune.classifier):
        problems.append(f"  cluster.prune.classifier: file not found: {config.cluster.prune.classifier}")
    if config.mixture is not None:
        m = config.mixture
        if m.target is not None and m.target.resolved_format != "hf" and not storage.glob(m.target.path):
            problems.append(f"  mixture.target.path: no file matches {m.target.path!r}")
        if m.task is not None and not storage.exists(m.task):
            problems.append(f"  mixture.task: file not found: {m.task}")
        if m.proxy.init_from is not None and not storage.exists(m.proxy.init_from):
            problems.append(f"  mixture.proxy.init_from: checkpoint not found: {m.proxy.init_from}")
    if config.select is not None:
        for key in ("current_model", "history_model", "reference_model"):
            where = getattr(config.select, key)
            if where is not None and not storage.exists(where):
                problems.append(f"  select.{key}: model directory not found: {where}")
    if problems:
        raise ConfigError("missing inputs:\n" + "\n".join(problems))
