"""`tokenmill report RUN_DIR`: one self-contained HTML page telling a run's story.

    collect.py      the run directory -> one plain dict (every number with its file and key)
    shard_stats.py  the shard sections: manifests, plus lengths and selection read from the shards
    plots.py        matplotlib figures as inline SVG
    html.py         the page (HTML + CSS, no JavaScript, nothing fetched: it opens offline)
    refs.py         the key paths that tie each number on the page to its marker or manifest

Sections, each present when its stage ran: funnel (rows and tokens per stage, time,
throughput), quarantine, domains, mixture search, token selection, shards. Reads only the
run directory (local or object store); never imports the runner or Ray.
"""
from __future__ import annotations

from pipeline import storage


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write the report of `run_dir` to `out` (default `run_dir/report.html`); returns the path."""
    from pipeline.report.collect import collect_run
    from pipeline.report.html import render
    page = render(collect_run(run_dir))
    out = out or storage.join(run_dir, "report.html")
    storage.write_text_atomic(out, page)
    return out
