"""The shard manifest (shard-format.md): counts, packing, selection and mixture blocks, and every
shard's size and sha256. Written once per tokenizer after all its shards are committed."""
from __future__ import annotations

from pipeline import sink, storage
from pipeline.config import Config

COUNT_KEYS = ("rows", "docs", "tokens", "target_tokens", "loss_tokens", "pad_tokens")


def selection_block(config: Config, tokenizer: str, counts: dict) -> dict:
    if tokenizer != config.selected_tokenizer:
        return {"method": "none"}
    kept = round(counts["loss_tokens"] / counts["target_tokens"], 6) if counts["target_tokens"] else 0.0
    return {**config.select.manifest_block(window_len=config.pack.seq_len),
            "target_tokens": counts["target_tokens"], "loss_tokens": counts["loss_tokens"], "kept_fraction": kept}


def build_manifest(config: Config, tokenizer: dict, shards: list[dict], mixture: dict | None = None) -> dict:
    """The manifest body for one tokenizer; `shards`: the records `sink.write_shard` returned."""
    counts = {k: sum(s["stats"][k] for s in shards) for k in COUNT_KEYS}
    pieces = sum(s["stats"]["pieces"] for s in shards)
    split_docs = sum(s["stats"]["split_docs"] for s in shards)
    total = counts["tokens"] + counts["pad_tokens"]
    return {
        "tokenizer": tokenizer,
        "seq_len": config.pack.seq_len,
        "counts": counts,
        "packing": {"method": config.pack.method, "pieces": pieces, "split_docs": split_docs,
                    "padding_fraction": round(counts["pad_tokens"] / total, 6) if total else 0.0},
        "selection": selection_block(config, tokenizer["name"], counts),
        "mixture": mixture or {},
        "shards": [{"file": s["file"], "rows": s["stats"]["rows"], "bytes": s["bytes"], "sha256": s["sha256"]}
                   for s in shards],
        "compression": config.output.compression,
        "config_sha256": config.content_sha256(),
    }


def write_shard_manifest(config: Config, shard_dir: str, tokenizer: dict, shards: list[dict],
                         mixture: dict | None = None) -> tuple[str, dict]:
    manifest = build_manifest(config, tokenizer, shards, mixture)
    sink.write_manifest(shard_dir, manifest)
    return storage.join(shard_dir, "manifest.json"), manifest
