"""The report's figures: matplotlib (Agg), returned as inline SVG strings.

Text stays text in the SVG (`svg.fonttype: none`) and ids are salted deterministically, so a
figure is a few tens of kB and the same run gives the same page. Every figure is drawn from the
collected dict (`collect.py`), never from the files directly. Measured on the demo run (2 busy
cores): the five figures take 2.0 s to draw and are 196 kB of the 244 kB page, which Chromium
loads in 0.2-0.3 s.
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.report.refs import value  # noqa: E402

STYLE = {"svg.fonttype": "none", "svg.hashsalt": "tokenmill-report", "font.size": 8,
         "axes.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False,
         "axes.grid": True, "grid.alpha": 0.25, "figure.dpi": 100, "legend.frameon": False}
KEPT, DROPPED, PROMPT, PRUNED = "#2e7d32", "#c62828", "#9e9e9e", "#757575"
WIDE = (11.0, 3.0)


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _legend(ax, **kw) -> None:
    """A legend when the axes hold a labelled artist (an empty run's figure holds none: matplotlib
    would warn on the console)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _figure(ncols: int = 2, size=WIDE, **kw):
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, ncols, figsize=size, **kw)
    return fig, np.atleast_1d(axes)


def _domain_colour(domain_id, domain_ids: list) -> str:
    cmap = plt.get_cmap("tab10" if len(domain_ids) <= 10 else "tab20")
    return matplotlib.colors.to_hex(cmap(domain_ids.index(domain_id) % cmap.N))


def funnel(stages: list[dict]) -> str:
    with plt.rc_context(STYLE):
        fig, (a, b) = _figure(2, (11.0, 0.8 + 0.22 * len(stages)), sharey=True)
        names = [s["stage"] for s in stages][::-1]
        y = np.arange(len(names))
        out = np.array([value(s["rows_out"], 0) for s in stages][::-1], dtype=float)
        filt = np.array([value(s["rows_filtered"], 0) for s in stages][::-1], dtype=float)
        quar = np.array([value(s["rows_quarantined"], 0) for s in stages][::-1], dtype=float)
        a.barh(y, out, color=KEPT, label="out")
        a.barh(y, filt, left=out, color="#f9a825", label="filtered")
        a.barh(y, quar, left=out + filt, color=DROPPED, label="quarantined")
        a.set_yticks(y, names)
        a.set_xlabel("rows (documents; proxies for mixture rounds)")
        _legend(a, loc="lower right", fontsize=7)
        b.barh(y, [value(s["seconds"], 0) for s in stages][::-1], color="#546e7a")
        b.set_xlabel("seconds")
        a.set_title("rows per stage")
        b.set_title("time per stage")
        return _svg(fig)


def domain_map(domains: dict) -> str:
    m = domains["map"]
    ids = [d["domain_id"] for d in domains["domains"]]
    with plt.rc_context(STYLE):
        fig, (a, b) = _figure(2, (11.0, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
        xy = np.asarray(m["clusters_xy"])
        size = 12 + 60 * np.sqrt(np.asarray(m["cluster_docs"], float) / max(1, max(m["cluster_docs"])))
        kept = np.array([d is not None for d in m["cluster_domain"]])
        for d in ids:
            sel = np.array([c == d for c in m["cluster_domain"]])
            if sel.any():
                a.scatter(xy[sel, 0], xy[sel, 1], s=size[sel], color=_domain_colour(d, ids), alpha=0.75,
                          label=f"domain {d}", edgecolors="white", linewidths=0.5)
        if (~kept).any():
            a.scatter(xy[~kept, 0], xy[~kept, 1], s=size[~kept], marker="x", color=PRUNED, label="pruned cluster")
        for (x, y_), d in zip(m["domains_xy"], m["domain_ids"]):
            a.scatter([x], [y_], s=110, marker="*", color=_domain_colour(d, ids), edgecolors="black", linewidths=0.6)
            a.annotate(str(d), (x, y_), xytext=(4, 4), textcoords="offset points", fontsize=8, weight="bold")
        a.set_title("k-means centroids (PCA of the embeddings); stars: domain centroids")
        a.set_xticks([]), a.set_yticks([])
        _legend(a, fontsize=6.5, loc="best", markerscale=0.6)
        y = np.arange(len(ids))
        b.barh(y, [value(d["num_docs"], 0) for d in domains["domains"]], color=[_domain_colour(d, ids) for d in ids])
        b.set_yticks(y, [f"domain {d}" for d in ids])
        b.invert_yaxis()
        b.set_xlabel("documents")
        b.set_title("domain sizes")
        return _svg(fig)


def mixture(mix: dict) -> str:
    with plt.rc_context(STYLE):
        fig, (a, b) = _figure(2, (11.0, 3.2))
        rounds = sorted({p["round"] for p in mix["points"]})
        cmap = plt.get_cmap("viridis")
        colour = {r: cmap(i / max(1, len(rounds) - 1) * 0.85) for i, r in enumerate(rounds)}
        predicted = [p for p in mix["points"] if p["predicted"] is not None]
        if predicted:
            for r in rounds:
                pts = [p for p in predicted if p["round"] == r]
                a.scatter([p["predicted"] for p in pts], [p["observed"] for p in pts], color=colour[r], s=18,
                          label=f"round {r + 1}")
            lo = min(min(p["predicted"], p["observed"]) for p in predicted)
            hi = max(max(p["predicted"], p["observed"]) for p in predicted)
            a.plot([lo, hi], [lo, hi], color="black", lw=0.6, ls="--")
            a.set_xlabel(f"predicted {mix['metric']}")
            a.set_title("proxies: predicted vs observed")
        else:
            rng = np.random.default_rng(0)
            for r in rounds:
                obs = [p["observed"] for p in mix["points"] if p["round"] == r]
                a.scatter(r + 1 + rng.uniform(-0.15, 0.15, len(obs)), obs, color=colour[r], s=18)
            a.set_xticks([r + 1 for r in rounds])
            a.set_xlabel("round")
            a.set_title("proxies: observed score by round (no predictions recorded)")
        a.set_ylabel(f"observed {mix['metric']}")
        if predicted:
            _legend(a, fontsize=7)
        doms = [w["domain"] for w in mix["weights"]]
        x = np.arange(len(doms))
        series = [("prior", "prior", "#b0bec5"), ("weight", "found weights", "#1565c0"),
                  ("realised", "realised after mixing", "#ef6c00")]
        series = [s for s in series if any(w[s[0]] is not None for w in mix["weights"])]
        width = 0.8 / max(1, len(series))
        for i, (key, label, c) in enumerate(series):
            b.bar(x + (i - (len(series) - 1) / 2) * width, [value(w[key], 0) for w in mix["weights"]], width,
                  color=c, label=label)
        b.set_xticks(x, [f"D{d}" for d in doms])
        b.set_ylabel("share of tokens")
        b.set_title("domain weights")
        _legend(b, fontsize=7)
        return _svg(fig)


def selection(sel: dict) -> str:
    with plt.rc_context(STYLE):
        fig, (a, b) = _figure(2, (11.0, 2.8))
        if sel["scores_kept"]:
            edges = np.asarray(sel["scores_kept"]["edges"])
            for h, label, c in ((sel["scores_kept"], "kept", KEPT), (sel["scores_dropped"], "dropped", DROPPED)):
                a.stairs(h["counts"], edges, color=c, fill=True, alpha=0.55, label=label)
            a.set_xlabel("token score")
            a.set_ylabel("target tokens")
            _legend(a, fontsize=7)
        else:
            a.text(0.5, 0.5, "no token_scores column", ha="center", va="center", transform=a.transAxes)
        a.set_title("score distribution")
        pos = sel["position"]
        if pos:
            total = np.asarray(pos["total"])
            frac = np.divide(pos["kept"], total, out=np.zeros_like(total), where=total > 0)
            centres = (np.arange(pos["bins"]) + 0.5) / pos["bins"]
            b.bar(centres, frac, width=0.9 / pos["bins"], color=KEPT)
            ratio = sel.get("numbers", {}).get("ratio")
            if ratio is not None:
                b.axhline(ratio["v"], color="black", lw=0.7, ls="--", label="ratio")
                _legend(b, fontsize=7)
            b.set_ylim(0, 1)
            b.set_xlabel("relative position among the document's target tokens")
            b.set_ylabel("kept fraction")
        b.set_title("kept fraction by position")
        return _svg(fig)


def shards(entries: dict) -> str:
    with plt.rc_context(STYLE):
        fig, (a, b) = _figure(2, (11.0, 2.8), gridspec_kw={"width_ratios": [1, 1.6]})
        names = list(entries)
        cmap = plt.get_cmap("tab10")
        x = np.arange(len(names))
        a.bar(x - 0.2, [value(entries[n]["tokens"], 0) for n in names], 0.4, color="#1565c0", label="tokens")
        a.bar(x + 0.2, [value(entries[n]["loss_tokens"], 0) for n in names], 0.4, color=KEPT, label="in loss")
        a.set_xticks(x, names)
        a.set_title("tokens per tokenizer")
        _legend(a, fontsize=7)
        lengths = [np.asarray(entries[n]["doc_lengths"]) for n in names]
        top = max([int(v.max()) for v in lengths if v.size] + [2])
        edges = np.unique(np.logspace(0, np.log10(top + 1), 40).astype(int))
        for i, (n, v) in enumerate(zip(names, lengths)):
            if v.size:
                counts, _ = np.histogram(v, bins=edges)
                b.stairs(counts, edges, color=cmap(i), label=n, lw=1.2)
                seq = value(entries[n]["seq_len"])
                if seq and i == 0:
                    b.axvline(seq, color="black", lw=0.7, ls="--", label="seq_len")
        b.set_xscale("log")
        b.set_xlabel("document length (tokens)")
        b.set_ylabel("documents")
        b.set_title("document lengths (documents longer than seq_len are split)")
        _legend(b, fontsize=7)
        return _svg(fig)
