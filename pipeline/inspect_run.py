"""`tokenmill inspect RUN_DIR`: stage status, counts, quarantine and shard statistics.

`verify_shards` re-reads a shard set and recomputes what the manifest claims
(counts, sha256 of every file) and the format's invariants; it is what
`inspect --verify` and the tests use.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa

from operators import schema as S
from pipeline import sink, storage
from pipeline.layout import reason_key


def _fixed(table: pa.Table, col: str) -> np.ndarray:
    arr = table.column(col).combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, arr.type.list_size)


def verify_shards(shard_dir: str) -> dict:
    """Recompute counts and check invariants; raises AssertionError naming the shard at fault."""
    manifest = sink.read_manifest(shard_dir)
    seq_len, pad_id = manifest["seq_len"], manifest["tokenizer"]["pad_id"]
    counts = Counter()
    for entry in manifest["shards"]:
        path = storage.join(shard_dir, entry["file"])
        assert storage.sha256_file(path) == entry["sha256"], f"{entry['file']}: sha256 does not match the manifest"
        t = sink.read_table(path)
        ids, tgt, loss, pos = (_fixed(t, c) for c in (S.INPUT_IDS, S.TARGET_MASK, S.LOSS_MASK, S.POSITION_IDS))
        ntok = t.column(S.NUM_TOKENS).to_numpy()
        real = np.arange(seq_len)[None, :] < ntok[:, None]
        assert ids.shape[1] == seq_len, f"{entry['file']}: rows are not {seq_len} long"
        assert (loss <= tgt).all(), f"{entry['file']}: loss_mask is not a subset of target_mask"
        assert (ids[~real] == pad_id).all() and not tgt[~real].any() and not loss[~real].any(), \
            f"{entry['file']}: padding is not pad_id with masks 0"
        assert t.num_rows == entry["rows"], f"{entry['file']}: {t.num_rows} rows, manifest says {entry['rows']}"
        starts = t.column(S.DOC_TOKEN_STARTS).combine_chunks().flatten().to_numpy()
        counts.update(rows=t.num_rows, docs=int((starts == 0).sum()), tokens=int(ntok.sum()),
                      target_tokens=int(tgt.sum()), loss_tokens=int(loss.sum()), pad_tokens=int((~real).sum()))
    for k, v in manifest["counts"].items():
        assert counts[k] == v, f"manifest counts.{k}={v} but the shards hold {counts[k]}"
    return dict(counts)


def reassemble(shard_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each document's (input_ids, target_mask, loss_mask), joined from its pieces in start order
    (the exporters' document stream, pipeline/export/documents.py; raises on lost or repeated tokens)."""
    from pipeline.export.documents import iter_documents
    return {doc_id: (ids, tgt, loss) for doc_id, ids, tgt, loss in iter_documents(shard_dir)}


def _stage_names(run_dir: str) -> list[str]:
    """The run's stages in run order (from its saved config), with the mixture search's steps."""
    from pipeline.config import ConfigError, parse_config
    from pipeline.runner import plan_stages
    import yaml
    try:
        config = parse_config(yaml.safe_load(storage.read_text(storage.join(run_dir, "config.yaml"))))
        stages = [s.name for s in plan_stages(config)]
    except (FileNotFoundError, ConfigError):
        return []
    if "mixture" in stages:
        steps = sorted((n for n in storage.listdir(storage.join(run_dir, "mixture")) if n.startswith("round-")),
                       key=lambda n: int(n.split("-")[1]))
        i = stages.index("mixture")
        stages[i:i + 1] = ["mixture/data"] + [f"mixture/{n}" for n in steps]
    for stage, steps in (("decontaminate", ["decontaminate/fit", "decontaminate", "decontaminate/log"]),
                         ("dedup", ["dedup/hash", "dedup/buckets", "dedup/components", "dedup"])):
        if stage in stages:
            i = stages.index(stage)
            stages[i:i + 1] = steps
    return stages


def _stage_lines(run_dir: str) -> list[str]:
    lines = []
    for stage in _stage_names(run_dir):
        where = storage.join(run_dir, *stage.split("/"))
        marker = storage.join(where, "_SUCCESS.json")
        if storage.exists(marker):
            m = json.loads(storage.read_text(marker))
            reasons = Counter()
            for item in m.get("items", []):
                reasons.update(item.get("reasons", {}))
            why = f" ({', '.join(f'{k}: {v}' for k, v in reasons.most_common())})" if reasons else ""
            state = "complete, empty" if not m.get("items") or m.get("rows_in") == 0 else "complete"
            lines.append(f"  {stage:<24} {state:<9} rows_in={m.get('rows_in')} rows_out={m.get('rows_out')} "
                         f"filtered={m.get('rows_filtered')} quarantined={m.get('rows_quarantined')}{why}")
        elif storage.exists(where):
            done = len(storage.listdir(storage.join(where, "done")))
            lines.append(f"  {stage:<24} incomplete ({done} items done)")
        else:
            lines.append(f"  {stage:<24} not started")
    return lines


REMOVAL_LOGS = ("decontaminate/removed.jsonl", "dedup/removed.jsonl")


def _removal_lines(run_dir: str) -> list[str]:
    """Counts per method, similarity quartiles, largest duplicate groups and most-matched eval
    rows, from the removal logs of decontaminate and dedup (empty when neither ran)."""
    from operators.dedup_graph import removal_summary
    logs = [rel for rel in REMOVAL_LOGS if storage.exists(storage.join(run_dir, *rel.split("/")))]
    if not logs:
        return []
    rows = [json.loads(line) for rel in logs
            for line in storage.read_text(storage.join(run_dir, *rel.split("/"))).splitlines() if line.strip()]
    s = removal_summary(rows)
    counts = ", ".join(f"{m} {n}" for m, n in s["removed"].items()) or "none"
    out = [f"removed documents ({', '.join(logs)}): {counts}"]
    for m, (q1, q2, q3) in s["similarity_quartiles"].items():
        out.append(f"  {m:<14} similarity quartiles {q1:.3f} / {q2:.3f} / {q3:.3f}")
    if s["largest_duplicate_groups"]:
        out.append("  largest duplicate groups (kept id: removed copies): "
                   + ", ".join(f"{k}: {n}" for k, n in s["largest_duplicate_groups"]))
    if s["most_matched_eval_rows"]:
        out.append("  most-matched eval rows (source:id: removed documents): "
                   + ", ".join(f"{k}: {n}" for k, n in s["most_matched_eval_rows"]))
    return out


def inspect_run(run_dir: str, verify: bool = False) -> str:
    if not storage.exists(run_dir):
        raise SystemExit(f"tokenmill inspect: no run directory at {run_dir}")
    out = [f"run {run_dir}"]
    if storage.exists(storage.join(run_dir, "config.sha256")):
        out.append(f"config sha256 {storage.read_text(storage.join(run_dir, 'config.sha256')).strip()}")
    out.append("stages:")
    out += _stage_lines(run_dir) or ["  (none started)"]
    clusters = storage.join(run_dir, "cluster", "clusters.json")
    if storage.exists(clusters):
        from pipeline.stages.cluster_assign import describe_domains
        out.append(describe_domains(json.loads(storage.read_text(clusters)), limit=12))
    out += _removal_lines(run_dir)
    reasons = Counter()
    for name in storage.listdir(storage.join(run_dir, "quarantine")):
        for line in storage.read_text(storage.join(run_dir, "quarantine", name)).splitlines():
            reasons[reason_key(json.loads(line)["reason"])] += 1
    if reasons:
        out.append(f"quarantine: {sum(reasons.values())} rows")
        out += [f"  {n:>8}  {r}" for r, n in reasons.most_common()]
    for tok in storage.listdir(storage.join(run_dir, "shards")):
        shard_dir = storage.join(run_dir, "shards", tok)
        if not storage.exists(storage.join(shard_dir, "manifest.json")):
            out.append(f"shards/{tok}: no manifest yet (incomplete)")
            continue
        m = sink.read_manifest(shard_dir)
        c = m["counts"]
        out.append(f"shards/{tok}: {len(m['shards'])} files, {c['rows']} rows x {m['seq_len']}, {c['docs']} docs, "
                   f"{c['tokens']} tokens, {c['target_tokens']} targets, {c['loss_tokens']} in loss, "
                   f"padding {m.get('packing', {}).get('padding_fraction', 0):.2%}, "
                   f"{sum(s['bytes'] for s in m['shards']) / 1e6:.1f} MB ({m['tokenizer']['spec']})")
        if verify:
            verify_shards(shard_dir)
            out.append(f"  verified: sha256, counts and invariants hold")
    return "\n".join(out)
