"""The dedup benchmark's corpus: real originals from ../shared/data with near-duplicates
injected at known edit rates, and the ground truth to score a removed set against.

Originals: a fixed mix of files (news, encyclopedia, books, code, web, SFT, math, Chinese
news titles and SFT), natural near-duplicates dropped first (any original whose estimated
5-word-shingle Jaccard with an earlier one is >= 0.3, found with a loose 25 x 3 LSH over
225-permutation signatures), so that what remains are singletons by construction.
Then `copy_fraction` of the originals get one edited copy each, the edits cycling through
EDITS; copies and originals are shuffled together (the keeper may be either).

Edits ("words" are whitespace tokens; for Chinese text, characters):
  exact         verbatim copy
  case_space    upper/lower-cased words and doubled/changed whitespace (exact after normalising)
  char r        r of the characters substituted, inserted or deleted (random letters)
  word r        r of the words replaced, deleted or a random word inserted
  shuffle       paragraphs (blank-line or line blocks; sentences when fewer than 3) shuffled
  boilerplate   a header and footer of 25-45 words from 6 real-looking site templates
"""
from __future__ import annotations

import io
import json
import pathlib
import random
import re

import zstandard

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
EDITS = [("exact", 0.0), ("case_space", 0.0), ("char", 0.01), ("char", 0.03), ("char", 0.05),
         ("word", 0.05), ("word", 0.10), ("word", 0.20), ("shuffle", 0.0), ("boilerplate", 0.0)]
# (file, share of the originals); the SFT file fills what a small file cannot give
MIX = [("news_20newsgroups_train.jsonl.zst", 0.22), ("news_agnews_5k.jsonl.zst", 0.12),
       ("encyclopedia_dbpedia14_9800.jsonl.zst", 0.12), ("sft_alpaca_00000_42147.jsonl.zst", 0.16),
       ("books_gutenberg_chunks.jsonl.zst", 0.03), ("code_python_thealgorithms.jsonl.zst", 0.03),
       ("web_c4_wiki_demo.jsonl.zst", 0.01), ("math_gsm8k_train.jsonl.zst", 0.07),
       ("news_zh_toutiao_titles_train.jsonl.zst", 0.08), ("sft_alpaca_zh_translated.jsonl.zst", 0.08),
       ("math_latex_hott_book.jsonl.zst", 0.01), ("sft_llamafactory_alpaca_demo_en_zh.jsonl.zst", 0.07)]
BOILERPLATE = [
    ("Skip to main content. Home | News | Sport | Business | Contact us. Sign in to your account.",
     "Copyright 2024 Example Media Group. All rights reserved. Privacy policy | Terms of use | Cookie settings."),
    ("This article was originally published on our partner site and is reproduced with permission.",
     "Subscribe to our newsletter to receive the latest updates directly in your inbox every morning."),
    ("We use cookies to improve your experience on our website. By continuing you accept our cookie policy.",
     "Share this: Facebook Twitter Email Print. Related posts: more from this category you may like."),
    ("Advertisement. Continue reading the main story below. Updated 5 minutes ago by the editorial team.",
     "Comments are closed. Please read our community guidelines before posting. Report an error here."),
    ("Posted in Uncategorized. Tags: news, update, daily. Leave a reply. Your email will not be published.",
     "Back to top. Follow us on social media for more stories like this one. Download our mobile app."),
    ("Menu Search Log in Register. Breaking: the latest headlines and analysis from around the world today.",
     "Disclaimer: the views expressed are those of the author and do not reflect the position of the site."),
]
_CJK = re.compile(r"[\u3400-\u9fff]")


def read_raw(name: str, limit: int) -> list[dict]:
    """The first `limit` rows of a shared data file, as stored."""
    rows = []
    with open(DATA / name, "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    return rows


def read_rows(name: str, limit: int) -> list[dict]:
    """{id, text}: `text`, or `prompt + "\\n\\n" + response` for SFT rows."""
    return [{"id": r["id"], "text": r.get("text") or (r["prompt"] + "\n\n" + r["response"])}
            for r in read_raw(name, limit)]


def _tokens(text: str) -> tuple[list[str], str]:
    if len(_CJK.findall(text)) > len(text) / 4:
        return list(text), ""
    return text.split(), " "


def edit(text: str, kind: str, rate: float, rng: random.Random) -> str:
    if kind == "exact":
        return text
    if kind == "case_space":
        words = text.split(" ")
        return "  ".join(w.upper() if rng.random() < 0.3 else w.lower() for w in words).replace("\n", " \n\t")
    if kind == "char":
        chars = list(text)
        for i in sorted(rng.sample(range(len(chars)), max(1, round(rate * len(chars)))), reverse=True):
            op = rng.randrange(3)
            if op == 0:
                chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
            elif op == 1:
                chars.insert(i, rng.choice("abcdefghijklmnopqrstuvwxyz"))
            else:
                del chars[i]
        return "".join(chars)
    if kind == "word":
        words, sep = _tokens(text)
        vocab = words[:]
        for i in sorted(rng.sample(range(len(words)), max(1, round(rate * len(words)))), reverse=True):
            op = rng.randrange(3)
            if op == 0:
                words[i] = rng.choice(vocab) if rng.random() < 0.5 else "".join(rng.choices("etaoinshrdlu", k=5))
            elif op == 1:
                del words[i]
            else:
                words.insert(i, rng.choice(vocab))
        return sep.join(words)
    if kind == "shuffle":
        blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
        joiner = "\n\n"
        if len(blocks) < 3:
            blocks, joiner = [b for b in text.split("\n") if b.strip()], "\n"
        if len(blocks) < 3:
            blocks, joiner = re.split(r"(?<=[.!?。！？])\s*", text), " "
            blocks = [b for b in blocks if b]
        original = blocks[:]
        for _ in range(10):
            rng.shuffle(blocks)
            if blocks != original or len(blocks) < 2:
                break
        return joiner.join(blocks)
    if kind == "boilerplate":
        header, footer = rng.choice(BOILERPLATE)
        return header + "\n\n" + text + "\n\n" + footer
    raise ValueError(kind)


def drop_natural_duplicates(rows: list[dict]) -> list[dict]:
    """Drop each row whose estimated Jaccard with an earlier row is >= 0.3."""
    import numpy as np
    import pyarrow as pa

    from operators import schema as S
    from operators.dedup_config import NearDedupConfig
    from operators.minhash import band_rows, candidate_pairs, estimate_jaccard, minhash_signatures

    config = NearDedupConfig(bands=25, rows=3, num_perm=225)
    sig, ok = minhash_signatures(pa.array([r["text"] for r in rows]), config)
    keys = np.arange(len(rows), dtype=np.int64)
    pairs = candidate_pairs(band_rows(keys, sig, ok, config))
    a, b = pairs[S.KEY_A].to_numpy(), pairs[S.KEY_B].to_numpy()
    close = estimate_jaccard(sig[a], sig[b]) >= 0.3
    drop = set(b[close].tolist()) | set(np.flatnonzero(~ok).tolist())
    return [r for i, r in enumerate(rows) if i not in drop]


def build_corpus(num_originals: int, copy_fraction: float, seed: int) -> tuple[list[dict], dict]:
    """Rows {id, text} in shuffled order, and truth: {copy id: (original id, edit, rate, lang)}."""
    rng = random.Random(seed)
    pool = []
    for name, share in MIX:
        want = int(round(share * num_originals * 1.15))      # spare for the natural-duplicate drop
        pool += [r for r in read_rows(name, want) if len(r["text"].strip()) >= 20]
    if len(pool) < num_originals * 1.15:
        pool += read_rows("sft_alpaca_00000_42147.jsonl.zst", 60000)[int(0.16 * num_originals * 1.15):][
            : int(num_originals * 1.15) - len(pool)]
    originals = drop_natural_duplicates(pool)
    rng.shuffle(originals)
    originals = originals[:num_originals]
    truth, copies = {}, []
    for k, i in enumerate(rng.sample(range(len(originals)), int(copy_fraction * len(originals)))):
        kind, rate = EDITS[k % len(EDITS)]
        src = originals[i]
        copy_id = f"copy-{k}"
        lang = "zh" if len(_CJK.findall(src["text"])) > len(src["text"]) / 4 else "en"
        copies.append({"id": copy_id, "text": edit(src["text"], kind, rate, rng)})
        truth[copy_id] = (src["id"], kind, rate, lang)
    rows = originals + copies
    rng.shuffle(rows)
    return rows, truth


def score(removed: set[str], truth: dict) -> dict:
    """Precision/recall of a removed set: a true pair (original, copy) is found when at least
    one of the two is removed; every other removal is a false positive."""
    found = {c for c, (o, *_ ) in truth.items() if c in removed or o in removed}
    both = {c for c, (o, *_ ) in truth.items() if c in removed and o in removed}
    tp = len(found)
    fp = len(removed) - tp
    per_edit: dict[str, list[int]] = {}
    per_lang: dict[str, list[int]] = {}
    for c, (_, kind, rate, lang) in truth.items():
        for table, key in ((per_edit, f"{kind} {rate:g}" if rate else kind), (per_lang, lang)):
            table.setdefault(key, [0, 0])
            table[key][0] += c in found
            table[key][1] += 1
    return {"precision": tp / max(len(removed), 1), "recall": tp / max(len(truth), 1), "removed": len(removed),
            "false_positives": fp, "both_removed": len(both), "per_edit": per_edit, "per_lang": per_lang}
