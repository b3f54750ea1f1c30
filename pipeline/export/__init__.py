"""Export a run's shards to the formats trainers read: `export_run(run_dir, fmt, ...)`.

    tokenmill export RUN_DIR --format megatron|megatron-blend|datatrove|olmo|hf
                     [--tokenizer NAME] [--out DIR] [--allow-drop-masks]

or an `export:` section in the run config (`run_exports(config, run_dir)` at the end of a run).
Each tokenizer's shards (`run_dir/shards/<tok>/`) go to `OUT/<tok>/` (default OUT:
`run_dir/exports/<format>`), local or object storage. Every export ends with `export.json`
(format, the source manifest's sha256, counts, files); an export whose `export.json` names
the same format and source sha256 is skipped, anything else there is redone. Files are
committed one by one through temp + rename and `export.json` is written last, so a killed
export leaves no file a reader could take for finished.

A format that cannot hold the per-token loss mask (Megatron) is refused when the shards'
masks carry more than "every token but each document's first" (a selection ran, or SFT
prompts are masked), unless `allow_drop_masks`.
"""
from __future__ import annotations

import json
import sys

from pipeline import storage
from pipeline.export.base import ExportError, ExportFormat, ExportJob
from pipeline.export.datatrove import DATATROVE
from pipeline.export.documents import ShardSet
from pipeline.export.files import OutputDir
from pipeline.export.hf import HF
from pipeline.export.megatron import MEGATRON, MEGATRON_BLEND
from pipeline.export.olmo import OLMO

FORMATS: dict[str, ExportFormat] = {f.name: f for f in (MEGATRON, MEGATRON_BLEND, DATATROVE, OLMO, HF)}
EXPORT_MANIFEST = "export.json"
EXPORT_VERSION = 1

__all__ = ["FORMATS", "ExportError", "export_run", "run_exports", "dropped_masks"]


def dropped_masks(manifest: dict) -> list[str]:
    """What a format without per-token loss masks would lose on these shards ([] when nothing)."""
    c, lost = manifest["counts"], []
    method = manifest.get("selection", {}).get("method", "none")
    if method != "none":
        lost.append(f"the {method} selection's loss_mask "
                    f"({c['loss_tokens']} of {c['target_tokens']} target tokens kept)")
    pieces = manifest.get("packing", {}).get("pieces")
    if pieces is not None and c["target_tokens"] < c["tokens"] - pieces:
        lost.append(f"the target_mask of {c['tokens'] - pieces - c['target_tokens']} tokens that are not targets "
                    f"(SFT prompts)")
    elif method == "none" and c["loss_tokens"] < c["target_tokens"]:
        lost.append(f"a loss_mask narrower than the target_mask ({c['loss_tokens']} of {c['target_tokens']})")
    return lost


def _tokenizers(run_dir: str, tokenizer: str | None) -> list[str]:
    shards = storage.join(run_dir, "shards")
    names = [n for n in storage.listdir(shards) if storage.exists(storage.join(shards, n, "manifest.json"))]
    if tokenizer is not None:
        if tokenizer not in names:
            raise ExportError(f"{run_dir}: no finished shards for tokenizer {tokenizer!r} (found: {names or 'none'})")
        return [tokenizer]
    if not names:
        raise ExportError(f"{run_dir}: no finished shards under {shards} (run the pack stage first)")
    return names


def _previous(out: OutputDir) -> dict | None:
    path = out.path(EXPORT_MANIFEST)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except ValueError:
        return None


def export_shards(shard_dir: str, fmt: str, out: str, *, tokenizer: str, run_dir: str,
                  allow_drop_masks: bool = False) -> dict:
    """Export one shard directory to `out`; returns the export's manifest (export.json)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    shards = ShardSet(shard_dir)
    lost = [] if spec.keeps_masks else dropped_masks(shards.manifest)
    if lost and not allow_drop_masks:
        raise ExportError(f"{shard_dir}: format {fmt} keeps no per-token loss mask and would silently drop "
                          f"{' and '.join(lost)}; pass --allow-drop-masks (export: allow_drop_masks: true) to "
                          f"export anyway, or choose a format that keeps masks (datatrove, olmo, hf)")
    with OutputDir(out) as target:
        before = _previous(target)
        if before and before.get("format") == fmt and before.get("version") == EXPORT_VERSION \
                and before.get("source", {}).get("manifest_sha256") == shards.manifest_sha256:
            print(f"[tokenmill] export {fmt}/{tokenizer}: complete, skipped ({out})", file=sys.stderr)
            return {**before, "skipped": True}
        target.remove(EXPORT_MANIFEST)  # from here on the directory holds no finished export
        storage.remove_stale_temporaries(out)
        result = spec.write(ExportJob(shards=shards, out=target, tokenizer=tokenizer, run_dir=run_dir))
        manifest = {
            "format": fmt, "version": EXPORT_VERSION, "tokenizer": shards.manifest["tokenizer"],
            "source": {"shard_dir": shard_dir, "manifest_sha256": shards.manifest_sha256,
                       "seq_len": shards.seq_len, "selection": shards.manifest.get("selection", {"method": "none"})},
            "dropped_masks": lost,
            **result,
            "files": list(target.files),
        }
        target.write_small(EXPORT_MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    counts = " ".join(f"{k}={v}" for k, v in manifest["counts"].items())
    print(f"[tokenmill] export {fmt}/{tokenizer}: {counts} -> {out}", file=sys.stderr)
    return manifest


def export_run(run_dir: str, fmt: str, tokenizer: str | None = None, out: str | None = None,
               allow_drop_masks: bool = False) -> list[dict]:
    """Export every tokenizer's shards of a run (or only `tokenizer`'s) to OUT/<tokenizer>/."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    root = out or storage.join(run_dir, "exports", fmt)
    return [export_shards(storage.join(run_dir, "shards", name), fmt, storage.join(root, name), tokenizer=name,
                          run_dir=run_dir, allow_drop_masks=allow_drop_masks)
            for name in _tokenizers(run_dir, tokenizer)]


def run_exports(config, run_dir: str | None = None) -> list[dict]:
    """The config's `export:` entries, in order (the end of a run); [] when there are none."""
    results = []
    for entry in getattr(config, "export", None) or []:
        results += export_run(run_dir or config.run_dir, entry.format, tokenizer=entry.tokenizer, out=entry.out,
                              allow_drop_masks=entry.allow_drop_masks)
    return results
