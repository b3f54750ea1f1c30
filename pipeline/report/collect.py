"""Read a run directory into one plain dict: the single source of the report's page.

Stages are discovered by walking `run_dir` for `_SUCCESS.json` (a stage may be nested:
`tokenize/<tok>`, `cluster/fit`, `mixture/round-0`), so a new stage shows up without a change
here; every other file is optional and a section whose files are absent is left out. Each
number is a `refs.ref` (value + file + key path) so the page can say where it came from.
Reads only small JSON files and `.npy` centroids; shard statistics are in `shard_stats.py`.
"""
from __future__ import annotations

import json

import numpy as np

from pipeline import storage
from pipeline.layout import reason_key
from pipeline.report.refs import ref, value
from pipeline.report.shard_stats import collect_shards

# Pipeline order of the top-level stage directories; unknown stages follow, by commit time.
STAGE_ORDER = ("read", "plain", "filter", "decontaminate", "dedup", "embed", "cluster", "tokenize", "mixture", "mix",
               "score", "select", "pack", "export")
_NOT_STAGES = {"parts", "done", "assignments", "shards", "quarantine", "demo_input", "tmp", "exports"}
_FILE_SUFFIXES = (".json", ".jsonl", ".npy", ".npz", ".arrow", ".parquet", ".yaml", ".sha256", ".html", ".model",
                  ".txt", ".lock", ".safetensors", ".bin")
_MAX_DEPTH = 3
QUARANTINE_EXAMPLES = 3      # per reason
RAW_CHARS = 240              # of a quarantined row shown on the page
DOMAIN_EXAMPLES = 3          # example documents per domain: id and the start of the text
SNIPPET_CHARS = 90

# (tokens in, tokens out) key paths a stage marker may carry, most specific first.
TOKEN_KEYS = (
    ("tokens_in", "tokens_out"),
    ("sum:items.*.tokens_in", "sum:items.*.tokens_out"),
    ("sum:items.*.data.tokens_in", "sum:items.*.data.tokens_out"),
    ("sum:items.*.target_tokens", "sum:items.*.loss_tokens"),            # select: scored -> kept
    ("sum:items.*.data.target_tokens", "sum:items.*.data.loss_tokens"),
    (None, "sum:items.*.tokens"),                                         # tokenize
    (None, "sum:items.*.stats.tokens"),                                   # pack
    (None, "sum:items.*.data.tokens"),
    (None, "sum:items.*.data.shard.stats.tokens"),
    (None, "sum:items.*.data.stats.tokens"),
)
# Stages that tokenize for several tokenizers at once count tokens per tokenizer.
PER_TOKENIZER_KEYS = ("sum:items.*.data.tokenizers.{tok}.tokens", "sum:items.*.data.shards.{tok}.*.stats.tokens")


def read_json(run_dir: str, rel: str):
    path = storage.join(run_dir, *rel.split("/"))
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def _mtime(path: str) -> float:
    fs, p = storage.resolve(path)
    t = fs.get_file_info(p).mtime
    return t.timestamp() if t is not None else 0.0


def find_stages(run_dir: str) -> list[str]:
    """Stage names (`read`, `tokenize/gpt2`, ...) of every `_SUCCESS.json` under run_dir, in
    pipeline order (STAGE_ORDER, then commit time inside a group)."""
    found = []

    def walk(rel: list[str]):
        names = storage.listdir(storage.join(run_dir, *rel)) if rel else storage.listdir(run_dir)
        if rel and "_SUCCESS.json" in names:
            path = storage.join(run_dir, *rel, "_SUCCESS.json")
            found.append(("/".join(rel), _mtime(path)))
        if len(rel) < _MAX_DEPTH:
            for n in names:
                if n not in _NOT_STAGES and not n.endswith(_FILE_SUFFIXES):
                    walk(rel + [n])

    walk([])
    rank = {g: i for i, g in enumerate(STAGE_ORDER)}
    found.sort(key=lambda s: (rank.get(s[0].split("/")[0], len(rank)), s[1], s[0]))
    return [s for s, _ in found]


def collect_stage(run_dir: str, stage: str) -> dict:
    src = f"{stage}/_SUCCESS.json"
    m = read_json(run_dir, src)
    out = {"stage": stage, "src": src, "items": ref(m, src, "count:items.*")}
    for k in ("rows_in", "rows_out", "rows_filtered", "rows_quarantined", "seconds"):
        out[k] = ref(m, src, k)
    seconds = value(out["seconds"], 0)
    out["rows_per_s"] = ref(m, src, "rows_in / seconds") if seconds else None
    out["tokens"] = []   # [{"tokenizer": name | None, "tokens_in", "tokens_out", "tokens_per_s"}]
    if value(out["items"], 0) > 0:
        for k_in, k_out in TOKEN_KEYS:
            if ref(m, src, k_out) is not None:
                out["tokens"] = [_token_row(m, src, None, k_in, k_out, seconds)]
                break
        else:
            for tok in _tokenizers_of(m):
                for pattern in PER_TOKENIZER_KEYS:
                    if ref(m, src, pattern.format(tok=tok)) is not None:
                        out["tokens"].append(_token_row(m, src, tok, None, pattern.format(tok=tok), seconds))
                        break
    return out


def _token_row(m, src: str, tokenizer: str | None, k_in: str | None, k_out: str, seconds: float) -> dict:
    return {"tokenizer": tokenizer, "tokens_in": ref(m, src, k_in) if k_in else None,
            "tokens_out": ref(m, src, k_out), "tokens_per_s": ref(m, src, f"{k_out} / seconds") if seconds else None}


def _tokenizers_of(m: dict) -> list[str]:
    """Tokenizer names under the items' data.tokenizers / data.shards (names usable in a key path)."""
    names = []
    for it in m.get("items", []):
        data = it.get("data") if isinstance(it.get("data"), dict) else {}
        for block in ("tokenizers", "shards"):
            for n in (data.get(block) or {}) if isinstance(data.get(block), dict) else {}:
                if n not in names and not any(c in n for c in ".[]:*/ "):
                    names.append(n)
    return names


def collect_quarantine(run_dir: str) -> dict | None:
    qdir = storage.join(run_dir, "quarantine")
    files = [n for n in storage.listdir(qdir) if n.endswith(".jsonl")]
    if not storage.exists(qdir):
        return None
    reasons: dict[str, dict] = {}
    total = 0
    for name in files:
        for i, line in enumerate(storage.read_text(storage.join(qdir, name)).splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            total += 1
            key = reason_key(str(row.get("reason", "")))
            r = reasons.setdefault(key, {"reason": key, "count": 0, "examples": []})
            r["count"] += 1
            if len(r["examples"]) < QUARANTINE_EXAMPLES:
                where = "line" if "line" in row else "row" if "row" in row else None
                raw = row.get("raw")
                r["examples"].append({
                    "source": row.get("source", ""), "where": where, "reason": row.get("reason", ""),
                    "location": {"v": row[where], "src": f"quarantine/{name}", "key": f"@{i}.{where}"} if where else None,
                    "raw": None if raw is None else str(raw)[:RAW_CHARS], "truncated": raw is not None and len(str(raw)) > RAW_CHARS})
    src = "quarantine/*.jsonl"
    out = sorted(reasons.values(), key=lambda r: (-r["count"], r["reason"]))
    for r in out:
        r["count"] = {"v": r["count"], "src": src, "key": f"count:reason={r['reason']}"}
    return {"total": {"v": total, "src": src, "key": "count:*"}, "files": files, "reasons": out}


def _pca_2d(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def collect_domains(run_dir: str) -> dict | None:
    src = "cluster/clusters.json"
    c = read_json(run_dir, src)
    if c is None:
        return None
    head = {k: ref(c, src, k) for k in ("num_docs", "num_tokens", "num_clusters", "num_domains",
                                         "num_docs_pruned", "num_tokens_pruned", "min_quality")}
    clusters = c.get("clusters", [])
    domains = []
    for i, d in enumerate(c.get("domains", [])):
        members = set(d.get("cluster_ids", []))
        titles = [{"id": e.get("id", ""), "snippet": " ".join(str(e.get("snippet", "")).split())[:SNIPPET_CHARS]}
                  for cl in clusters if cl.get("cluster_id") in members for e in cl.get("examples", [])]
        domains.append({"domain_id": d.get("domain_id", i),
                        "num_docs": ref(c, src, f"domains.{i}.num_docs"),
                        "num_tokens": ref(c, src, f"domains.{i}.num_tokens"),
                        "num_clusters": ref(c, src, f"count:domains.{i}.cluster_ids.*"),
                        "top_terms": d.get("top_terms", [])[:8], "examples": titles[:DOMAIN_EXAMPLES]})
    pruned = [{"cluster_id": cl.get("cluster_id", i),
               "num_docs": ref(c, src, f"clusters.{i}.num_docs"),
               "quality_mean": ref(c, src, f"clusters.{i}.quality_mean"),
               "top_terms": cl.get("top_terms", [])[:6]}
              for i, cl in enumerate(clusters) if cl.get("domain_id") is None]
    out = {"head": head, "domains": domains, "pruned": pruned, "map": None, "token_unit": c.get("token_unit")}
    cpath = storage.join(run_dir, "cluster", "fit", "centroids.npy")
    if storage.exists(cpath) and clusters:
        import io
        cent = np.load(io.BytesIO(storage.read_bytes(cpath)))
        dpath = storage.join(run_dir, "cluster", "fit", "domain_centroids.npy")
        dom = np.load(io.BytesIO(storage.read_bytes(dpath))) if storage.exists(dpath) else np.zeros((0, cent.shape[1]))
        if len(cent) == len(clusters) and len(cent) >= 2:
            xy = _pca_2d(np.concatenate([cent, dom]).astype(np.float64))
            out["map"] = {"clusters_xy": xy[:len(cent)].tolist(), "domains_xy": xy[len(cent):].tolist(),
                          "cluster_domain": [cl.get("domain_id") for cl in clusters],
                          "cluster_docs": [cl.get("num_docs", 0) for cl in clusters],
                          "domain_ids": [d["domain_id"] for d in domains][:len(dom)]}
    return out


def collect_mixture(run_dir: str) -> dict | None:
    src = "mixture/mixture.json"
    m = read_json(run_dir, src)
    if m is None:
        return None
    metric = m.get("metric", "target_loss")
    history = m.get("history", [])
    rounds = sorted({h.get("round", 0) for h in history})
    per_round = []
    for r in rounds:
        rsrc = f"mixture/round-{r}/_SUCCESS.json"
        rm = read_json(run_dir, rsrc)
        best = "min" if m.get("minimize", True) else "max"
        per_round.append({"round": r, "proxies": ref(m, src, f"count:history[round={r}]"),
                          "best": ref(m, src, f"{best}:history[round={r}].{metric}"),
                          "mean": ref(m, src, f"mean:history[round={r}].{metric}"),
                          "seconds": ref(rm, rsrc, "seconds")})
    # Predicted scores are shown when the search recorded them (`predicted`: the predictor's
    # score for a proxy when it was chosen; `predicted_heldout`: its out-of-fold prediction).
    points = [{"round": h.get("round", 0), "observed": h.get(metric),
               "predicted": h.get("predicted_heldout", h.get("predicted"))}
              for h in history if h.get("status", "done") == "done" and h.get(metric) is not None]
    plan_src = "mix/plan.json"
    plan = read_json(run_dir, plan_src)
    domain_keys = sorted(set(m.get("weights", {})) | set(m.get("prior", {})), key=lambda k: (len(k), k))
    weights = [{"domain": k, "weight": ref(m, src, f"weights.{k}"), "prior": ref(m, src, f"prior.{k}"),
                "realised": ref(plan, plan_src, f"realised_weights.{k}")} for k in domain_keys]
    return {"metric": metric, "minimize": m.get("minimize", True),
            "spearman": ref(m, src, "rank_correlation.spearman"),
            "num_pairs": ref(m, src, "rank_correlation.num_pairs"),
            "rank_method": (m.get("rank_correlation") or {}).get("method"),
            "rank_reason": (m.get("rank_correlation") or {}).get("reason"),
            "predicted_score": ref(m, src, "predicted_score"),
            "best_trial": ref(m, src, f"best_trial.{metric}"),
            "rounds": per_round, "points": points, "weights": weights,
            "budget_tokens": ref(plan, plan_src, "budget_tokens"),
            "effective_budget_tokens": ref(plan, plan_src, "effective_budget_tokens"),
            "documents": ref(plan, plan_src, "documents")}


def collect_run(run_dir: str) -> dict:
    """Everything the report shows, as plain JSON-serialisable data (numbers as refs)."""
    if not storage.exists(run_dir):
        raise FileNotFoundError(f"no run directory at {run_dir}")
    sha = storage.join(run_dir, "config.sha256")
    stages = [collect_stage(run_dir, s) for s in find_stages(run_dir)]
    ran = {s["stage"].split("/")[0] for s in stages}
    return {
        "run_dir": run_dir,
        "config_sha256": storage.read_text(sha).strip() if storage.exists(sha) else None,
        "stages": stages,
        "quarantine": collect_quarantine(run_dir) if "read" in ran or storage.exists(storage.join(run_dir, "quarantine")) else None,
        "domains": collect_domains(run_dir),
        "mixture": collect_mixture(run_dir),
        **collect_shards(run_dir),
    }
