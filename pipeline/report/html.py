"""The report page: plain HTML + CSS, no JavaScript, no external resources (opens offline).

Every number is written by `num()`: a `<span class="n" data-src=FILE data-key=PATH
data-value=VALUE>` inside a `.num` cell, so each can be traced to (and checked against) the
marker or manifest it came from (`refs.py` explains the key paths). Sections appear only when
their stage ran; each is a `<section data-section=NAME>`.
"""
from __future__ import annotations

from html import escape

import pipeline.report.plots as plots

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
margin:0;background:#f6f8fa}
main{max-width:1180px;margin:0 auto;padding:12px 20px 40px}
header{background:#24292f;color:#fff;padding:12px 20px}header h1{margin:0;font-size:20px}
header .meta{font-size:12px;color:#c9d1d9;word-break:break-all}
nav{font-size:13px;margin:8px 0 4px}nav a{margin-right:14px;color:#0969da;text-decoration:none}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:10px 16px;margin:12px 0}
h2{font-size:17px;margin:4px 0 8px}h3{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0 8px}
th,td{padding:2px 8px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
td:first-child{white-space:nowrap}th{background:#f6f8fa;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.plot svg{max-width:100%;height:auto;display:block}
.note{color:#57606a;font-size:12px;margin:2px 0 6px}
.stats{display:flex;flex-wrap:wrap;gap:8px;margin:4px 0 8px}
.stat{border:1px solid #d0d7de;border-radius:6px;padding:4px 10px;min-width:110px}
.stat .num{font-size:17px;font-weight:600}.stat .label{font-size:11.5px;color:#57606a}
code,.raw{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px}
.raw{white-space:pre-wrap;word-break:break-all;background:#f6f8fa;padding:1px 4px;display:block}
.terms{color:#57606a;font-size:12px}
.tokens{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11.5px;
border:1px solid #eaeef2;padding:6px;margin:4px 0 10px;max-height:190px;overflow:auto}
.kept{background:#d7f0d9}.dropped{background:#f9d4d4;color:#8a1c1c}
.prompt{color:#8c959f}
"""


def num(r: dict | None, fmt: str = "int") -> str:
    """A number with its provenance; fmt: int | f1..f4 | pct1 | pct2 | rate."""
    if r is None or r["v"] is None:
        return "–"
    v = r["v"]
    if fmt == "int":
        text = f"{int(round(v)):,}"
    elif fmt == "rate":
        text = f"{v:,.0f}"
    elif fmt.startswith("pct"):
        text = f"{v * 100:.{int(fmt[3:])}f}%"
    else:
        text = f"{v:,.{int(fmt[1:])}f}"
    return (f'<span class="n" data-src="{escape(r["src"])}" data-key="{escape(r["key"])}" '
            f'data-value="{escape(repr(v))}">{text}</span>')


def _table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f'<th class="num">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _stat(label: str, cell: str) -> str:
    return f'<div class="stat"><div class="num">{cell}</div><div class="label">{escape(label)}</div></div>'


def _section(name: str, title: str, body: str) -> str:
    return f'<section id="{name}" data-section="{name}"><h2>{escape(title)}</h2>{body}</section>'


def funnel_section(stages: list[dict]) -> str:
    rows = []
    for s in stages:
        single = s["tokens"][0] if len(s["tokens"]) == 1 and s["tokens"][0]["tokenizer"] is None else None
        t = single or {"tokens_in": None, "tokens_out": None, "tokens_per_s": None}
        rows.append([f"<code>{escape(s['stage'])}</code>", num(s["items"]), num(s["rows_in"]), num(s["rows_out"]),
                     num(s["rows_filtered"]), num(s["rows_quarantined"]), num(t["tokens_in"]), num(t["tokens_out"]),
                     num(s["seconds"], "f2"), num(s["rows_per_s"], "rate"), num(t["tokens_per_s"], "rate")])
        for t in ([] if single else s["tokens"]):  # a stage that tokenizes for several tokenizers at once
            rows.append([f"&nbsp;&nbsp;↳ <code>{escape(t['tokenizer'])}</code>", "", "", "", "", "",
                         num(t["tokens_in"]), num(t["tokens_out"]), "", "", num(t["tokens_per_s"], "rate")])
    table = _table(["stage", "items", "rows in", "rows out", "filtered", "quarantined", "tokens in", "tokens out",
                    "seconds", "rows/s", "tokens/s"], rows, set(range(1, 11)))
    note = ('<p class="note">From each stage\'s <code>_SUCCESS.json</code>. Rows are documents (proxies in the '
            'mixture rounds); rows in = out + filtered + quarantined. Tokens in/out where the stage counts them '
            '(select: target tokens scored, tokens kept in the loss). Stages that tokenize and pack in one pass '
            'share its time.</p>')
    return _section("funnel", "Funnel", note + table + f'<div class="plot">{plots.funnel(stages)}</div>')


def quarantine_section(q: dict) -> str:
    if not q["reasons"]:
        return _section("quarantine", "Quarantine", '<p class="note">No rows were quarantined.</p>')
    parts = [f'<div class="stats">{_stat("rows quarantined", num(q["total"]))}</div>']
    rows = []
    for r in q["reasons"]:
        examples = "".join(
            f'<div><code>{escape(e["source"])}</code>'
            + (f' {e["where"]} <span class="num">{num(e["location"])}</span>' if e["location"] else "")
            + f'<span class="raw">{escape(e["raw"] if e["raw"] is not None else "(unreadable)")}'
            + ("…" if e["truncated"] else "") + "</span></div>" for e in r["examples"])
        rows.append([escape(r["reason"]), num(r["count"]), examples])
    parts.append(_table(["reason", "rows", "examples (source, location, raw content)"], rows, {1}))
    return _section("quarantine", "Quarantine", "".join(parts))


def domains_section(d: dict) -> str:
    h = d["head"]
    stats = "".join(_stat(label, num(h[k], "f1" if k == "min_quality" else "int")) for k, label in (
        ("num_docs", "documents"), ("num_clusters", "k-means clusters"), ("num_domains", "domains"),
        ("num_docs_pruned", "documents pruned"), ("num_tokens_pruned", "words pruned"),
        ("min_quality", "min quality")) if h.get(k) is not None)
    rows = [[f"domain {escape(str(x['domain_id']))}", num(x["num_docs"]), num(x["num_tokens"]), num(x["num_clusters"]),
             f'<span class="terms">{escape(", ".join(x["top_terms"]))}</span>',
             "".join(f'<div><code>{escape(t["id"])}</code> <span class="terms">{escape(t["snippet"])}…</span></div>'
                     for t in x["examples"])] for x in d["domains"]]
    unit = "words" if d.get("token_unit") == "whitespace_words" else "tokens"
    body = f'<div class="stats">{stats}</div>' + _table(
        ["domain", "documents", unit, "clusters", "top terms", "example documents"], rows, {1, 2, 3})
    if d["pruned"]:
        prows = [[f"cluster {escape(str(c['cluster_id']))}", num(c["num_docs"]), num(c["quality_mean"], "f2"),
                  f'<span class="terms">{escape(", ".join(c["top_terms"]))}</span>'] for c in d["pruned"]]
        body += "<h3>Pruned clusters</h3>" + _table(["cluster", "documents", "mean quality", "top terms"], prows, {1, 2})
    if d["map"]:
        body += f'<div class="plot">{plots.domain_map(d)}</div>'
    return _section("domains", "Domains", body)


def mixture_section(m: dict) -> str:
    stats = "".join(_stat(label, num(r, fmt)) for label, r, fmt in (
        ("predictor rank correlation (Spearman)", m["spearman"], "f3"), ("held-out pairs", m["num_pairs"], "int"),
        (f"predicted {m['metric']} of the weights", m["predicted_score"], "f4"),
        (f"best proxy {m['metric']}", m["best_trial"], "f4"), ("token budget", m["effective_budget_tokens"], "int"),
        ("documents mixed", m["documents"], "int")) if r is not None)
    note = ""
    if m["rank_method"]:
        note = f'Predictor rank correlation: {escape(m["rank_method"])}.'
    if m["rank_reason"]:
        note += f' Not measured: {escape(m["rank_reason"])}.'
    note = f'<p class="note">{note}</p>' if note else ""
    rounds = _table(["round", "proxies", f"best {m['metric']}", f"mean {m['metric']}", "seconds"],
                    [[f"round {r['round'] + 1}", num(r["proxies"]), num(r["best"], "f4"), num(r["mean"], "f4"),
                      num(r["seconds"], "f2")] for r in m["rounds"]], {1, 2, 3, 4})
    weights = _table(["domain", "prior", "weight found", "realised after mixing"],
                     [[f"domain {escape(w['domain'])}", num(w["prior"], "f4"), num(w["weight"], "f4"),
                       num(w["realised"], "f4")] for w in m["weights"]], {1, 2, 3})
    body = (f'<div class="stats">{stats}</div>{note}<h3>Rounds</h3>{rounds}'
            f'<h3>Weights (share of tokens)</h3>{weights}<div class="plot">{plots.mixture(m)}</div>')
    return _section("mixture", "Mixture search", body)


def _sample_note(sample: dict, files_total: dict | None) -> str:
    return (f'<p class="note">Statistics from the first <span class="num">{num(sample["files"])}</span> of '
            f'<span class="num">{num(files_total)}</span> shard files '
            f'(<span class="num">{num(sample["rows"])}</span> rows).</p>')


def selection_section(s: dict, files_total: dict | None) -> str:
    fmts = {"gamma": "f2", "ratio": "f2", "kept_fraction": "pct2"}
    labels = {"kept_fraction": "kept fraction", "target_tokens": "target tokens", "loss_tokens": "tokens in the loss",
              "warmup_docs": "warm-up documents"}
    stats = "".join(_stat(labels.get(k, k), num(r, fmts.get(k, "int"))) for k, r in s["numbers"].items())
    params = "".join(f"<div><b>{escape(k)}</b> <code>{escape(str(v))}</code></div>" for k, v in s["params"].items())
    body = (f'<p class="note">Method <b>{escape(str(s["method"]))}</b> on tokenizer '
            f'<code>{escape(s["tokenizer"])}</code>.</p><div class="stats">{stats}</div>{params}'
            + _sample_note(s["sample"], files_total) + f'<div class="plot">{plots.selection(s)}</div>')
    if s["examples"]:
        body += ('<h3>Kept and dropped tokens</h3><p class="note"><span class="kept">kept (in the loss)</span> '
                 '<span class="dropped">dropped by the selection</span> <span class="prompt">not a target '
                 '(prompt, first token)</span></p>')
        for e in s["examples"]:
            runs = "".join(f'<span class="{state}">{escape(text)}</span>' for text, state in e["runs"])
            lead = "… " if e["skipped"] else ""
            body += (f'<div><code>{escape(e["doc_id"])}</code></div><div class="tokens">{lead}{runs}'
                     f'{" …" if e["truncated"] else ""}</div>')
    return _section("selection", "Token selection", body)


def shards_section(entries: dict) -> str:
    rows = [[f"<code>{escape(n)}</code>", num(e["files"]), num(e["rows"]), num(e["seq_len"]), num(e["docs"]),
             num(e["tokens"]), num(e["target_tokens"]), num(e["loss_tokens"]), num(e["pad_tokens"]),
             num(e["padding_fraction"], "pct2"), num(e["split_docs"]), num(e["pieces"]), num(e["bytes"]),
             escape(e["selection_method"])] for n, e in entries.items()]
    table = _table(["tokenizer", "files", "rows", "seq_len", "docs", "tokens", "targets", "in loss", "padding",
                    "padding %", "split docs", "pieces", "bytes", "selection"], rows, set(range(1, 13)))
    specs = "".join(f"<div><code>{escape(n)}</code>: <code>{escape(e['spec'])}</code></div>" for n, e in entries.items())
    first = next(iter(entries.values()))
    body = table + f'<div class="note">{specs}</div>' + _sample_note(first["sample"], first["files"])
    return _section("shards", "Shards", body + f'<div class="plot">{plots.shards(entries)}</div>')


SECTIONS = (("funnel", "Funnel"), ("quarantine", "Quarantine"), ("domains", "Domains"),
            ("mixture", "Mixture search"), ("selection", "Token selection"), ("shards", "Shards"))


def render(report: dict) -> str:
    """The whole page from `collect.collect_run`'s dict."""
    parts = {}
    if report["stages"]:
        parts["funnel"] = funnel_section(report["stages"])
    if report["quarantine"] is not None:
        parts["quarantine"] = quarantine_section(report["quarantine"])
    if report["domains"]:
        parts["domains"] = domains_section(report["domains"])
    if report["mixture"]:
        parts["mixture"] = mixture_section(report["mixture"])
    if report["selection"]:
        tok = report["selection"]["tokenizer"]
        parts["selection"] = selection_section(report["selection"], report["shards"][tok]["files"])
    if report["shards"]:
        parts["shards"] = shards_section(report["shards"])
    nav = "".join(f'<a href="#{k}">{escape(t)}</a>' for k, t in SECTIONS if k in parts)
    sha = report.get("config_sha256")
    meta = f"{escape(report['run_dir'])}" + (f" · config sha256 {escape(sha[:16])}…" if sha else "")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>tokenmill run report</title><style>{CSS}</style></head><body>'
            f'<header><h1>tokenmill run report</h1><div class="meta">{meta}</div></header>'
            f'<main><nav>{nav}</nav>{"".join(parts[k] for k, _ in SECTIONS if k in parts)}</main></body></html>')


__all__ = ["render", "num"]
