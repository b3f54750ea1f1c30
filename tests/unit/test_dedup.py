"""Exact and near dedup operators, run through the four steps a Ray stage runs (A per part,
B per bucket, C once, D per part) on real text from ../shared/data."""
from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from pydantic import ValidationError

from operators import schema as S
from operators.dedup_config import DedupConfig, NearDedupConfig, collision_probability, lsh_threshold
from operators.dedup_exact import exact_duplicates, exact_rows, order_keys
from operators.dedup_graph import (connected_components, near_duplicates, pair_members, removal_log,
                                   removal_mask, select_rows)
from operators.minhash import (band_rows, candidate_pairs, estimate_jaccard, minhash_signatures,
                               partition_by_bucket, signature_table)
from operators.text_norm import document_texts, normalize_words, split_words
from tests.conftest import shared_rows


def _parts(texts: list[str], ids: list[str], part_size: int) -> list[pa.Table]:
    return [pa.table({S.ID: ids[i:i + part_size], S.TEXT: texts[i:i + part_size]})
            for i in range(0, len(texts), part_size)]


def run_dedup(parts: list[pa.Table], config: DedupConfig) -> tuple[pa.Table, list[np.ndarray], pa.Table]:
    """Steps A-D as the stage runs them; returns (removals, keep mask per part, all pairs)."""
    near = config.near
    buckets = config.buckets
    exact_buckets = [[] for _ in range(buckets)]
    band_buckets = [[] for _ in range(buckets)]
    sig_files = []
    for p, docs in enumerate(parts):                                    # A
        keys = order_keys(p, docs.num_rows)
        texts = document_texts(docs)
        if config.exact:
            for b, t in enumerate(partition_by_bucket(exact_rows(keys, docs[S.ID], texts), S.HASH_LO, buckets)):
                exact_buckets[b].append(pa.Table.from_batches([t]))
        if near:
            sig, ok = minhash_signatures(texts, near)
            for b, t in enumerate(partition_by_bucket(band_rows(keys, sig, ok, near), S.BAND_HASH, buckets)):
                band_buckets[b].append(pa.Table.from_batches([t]))
            sig_files.append(signature_table(keys, docs[S.ID], sig, ok))
    removals = []
    if config.exact:                                                    # B (exact)
        removals += [exact_duplicates(pa.concat_tables(b)) for b in exact_buckets]
    exact_removed = pa.concat_tables(removals)[S.ORDER_KEY].to_numpy() if removals else np.zeros(0, np.int64)
    pairs = pa.table({S.KEY_A: pa.array([], pa.int64()), S.KEY_B: pa.array([], pa.int64())})
    if near:
        pairs = pa.concat_tables([candidate_pairs(pa.concat_tables(b)) for b in band_buckets])   # B
        members = pair_members(pairs)                                   # C
        sigs = pa.concat_tables([select_rows(t, members) for t in sig_files])
        removals.append(near_duplicates(pairs, sigs, exclude=exact_removed, min_similarity=near.min_similarity))
    all_removed = pa.concat_tables(removals).sort_by(S.ORDER_KEY)
    keeps = [~removal_mask(order_keys(p, d.num_rows), all_removed[S.ORDER_KEY].to_numpy())
             for p, d in enumerate(parts)]                              # D
    return all_removed, keeps, pairs


def _word_edit(text: str, rate: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(rate * len(words)))):
        words[i] = rng.choice(["alpha", "omega", "zeta", "kappa"]) + str(rng.randint(0, 999))
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus():
    """400 real originals (AG News, 20 Newsgroups) + 40 copies with 1% of words replaced."""
    news = [r["text"] for r in shared_rows("news_20newsgroups_train.jsonl.zst", 600)]
    originals = [t for t in news if 200 <= len(t.split()) <= 2000][:150]
    originals += [r["text"] for r in shared_rows("news_agnews_5k.jsonl.zst", 250)]
    rng = random.Random(0)
    sources = rng.sample(range(150), 40)
    copies = [_word_edit(originals[i], 0.01, rng) for i in sources]
    texts = originals + copies
    ids = [f"orig-{i}" for i in range(len(originals))] + [f"copy-{i}" for i in sources]
    return texts, ids, len(originals)


def test_exact_normalisation_and_keeper():
    texts = ["Hello  World\n", "hello world", "ＨＥＬＬＯ world", "Hello, World", "a = b + c", "a = b - c", None]
    docs = pa.table({S.ID: [f"d{i}" for i in range(7)], S.TEXT: texts,
                     S.PROMPT: [None] * 6 + ["HELLO"], S.RESPONSE: [None] * 6 + ["world"]})
    removals, keeps, _ = run_dedup([docs.slice(0, 3), docs.slice(3)], DedupConfig(exact=True))
    # case, whitespace, NFKC (fullwidth) and the SFT join are normalised; punctuation is not
    assert removals[S.ID].to_pylist() == ["d1", "d2", "d6"]
    assert set(removals[S.DUPLICATE_OF].to_pylist()) == {"d0"}
    assert removals[S.SIMILARITY].to_pylist() == [1.0, 1.0, 1.0]
    assert [k.tolist() for k in keeps] == [[True, False, False], [True, True, True, False]]


def test_keeper_is_lowest_order_key_whatever_the_buckets(corpus):
    texts, ids, _ = corpus
    results = []
    for buckets in (1, 7, 64):
        config = DedupConfig(exact=True, near=NearDedupConfig(), buckets=buckets)
        removals, _, _ = run_dedup(_parts(texts, ids, 100), config)  # same parts: same keys
        results.append(removals.to_pylist())
        assert (removals[S.DUPLICATE_OF_KEY].to_numpy() < removals[S.ORDER_KEY].to_numpy()).all()
    assert results[0] == results[1] == results[2]


def test_near_duplicates_found_and_unrelated_kept(corpus):
    texts, ids, num_originals = corpus
    removals, keeps, pairs = run_dedup(_parts(texts, ids, 128), DedupConfig(exact=True, near=NearDedupConfig()))
    removed = set(removals[S.ID].to_pylist())
    copies = set(ids[num_originals:])
    assert copies <= removed                     # 1% word edits: J ~ 0.9, P(found) > 0.999
    assert removed - copies == set()             # no original is taken for another's duplicate
    near = removals.filter(pa.compute.equal(removals[S.METHOD], "near"))
    for row in near.to_pylist():                 # each copy points at its own original
        assert row[S.DUPLICATE_OF] == "orig-" + row[S.ID].split("-")[1]
        assert row[S.SIMILARITY] > 0.7
    # kept and removed partition the corpus; every duplicate_of is kept
    kept = {i for k, part in zip(keeps, _parts(texts, ids, 128)) for i, keep in zip(part[S.ID].to_pylist(), k) if keep}
    assert kept | removed == set(ids) and not kept & removed
    assert set(removals[S.DUPLICATE_OF].to_pylist()) <= kept


def test_removed_points_to_kept_member_of_its_component(corpus):
    texts, ids, _ = corpus
    # a loose threshold makes bigger, chained components: the property must still hold
    config = DedupConfig(exact=False, near=NearDedupConfig(bands=20, rows=2), buckets=5)
    removals, keeps, pairs = run_dedup(_parts(texts, ids, 90), config)
    nodes, keepers = connected_components(pairs[S.KEY_A].to_numpy(), pairs[S.KEY_B].to_numpy())
    component_of = dict(zip(nodes.tolist(), keepers.tolist()))
    removed_keys = removals[S.ORDER_KEY].to_numpy()
    assert len(removed_keys) > 50
    assert sum(int((~k).sum()) for k in keeps) == len(removed_keys) == len(set(removed_keys.tolist()))
    for key, dup in zip(removed_keys.tolist(), removals[S.DUPLICATE_OF_KEY].to_numpy().tolist()):
        assert component_of[key] == dup == component_of[dup] and dup not in set(removed_keys.tolist())
    assert len(set(keepers.tolist())) + len(removed_keys) == len(nodes)


def test_components_are_transitive_and_order_free():
    a = np.array([5, 2, 10, 3, 40], np.int64)
    b = np.array([3, 3, 11, 7, 41], np.int64)
    nodes, keepers = connected_components(a, b)
    assert dict(zip(nodes.tolist(), keepers.tolist())) == {2: 2, 3: 2, 5: 2, 7: 2, 10: 10, 11: 10, 40: 40, 41: 40}
    perm = np.random.default_rng(0).permutation(len(a))
    nodes2, keepers2 = connected_components(b[perm], a[perm])
    assert nodes2.tolist() == nodes.tolist() and keepers2.tolist() == keepers.tolist()
    empty = connected_components(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert len(empty[0]) == len(empty[1]) == 0


def test_signatures_are_deterministic_and_batch_independent(corpus):
    texts, _, _ = corpus
    config = NearDedupConfig()
    whole, ok = minhash_signatures(pa.array(texts[:60]), config)
    halves = np.concatenate([minhash_signatures(pa.array(texts[:25]), config)[0],
                             minhash_signatures(pa.array(texts[25:60]), config)[0]])
    assert whole.dtype == np.uint32 and whole.shape == (60, 112) and ok.all()
    assert np.array_equal(whole, halves)
    other_seed = minhash_signatures(pa.array(texts[:60]), NearDedupConfig(seed=2))[0]
    assert (other_seed != whole).mean() > 0.9


def _shingles(text: str, n: int = 5) -> set:
    words, _ = split_words(normalize_words(pa.array([text])))
    w = words.to_pylist()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_jaccard_estimate_matches_true_jaccard(corpus):
    texts, _, _ = corpus
    rng = random.Random(1)
    config = NearDedupConfig(num_perm=256, bands=16, rows=16)
    base = [t for t in texts[:150] if len(t.split()) > 300][:20]
    for rate in (0.02, 0.05, 0.1):
        edited = [_word_edit(t, rate, rng) for t in base]
        sig_a = minhash_signatures(pa.array(base), config)[0]
        sig_b = minhash_signatures(pa.array(edited), config)[0]
        est = estimate_jaccard(sig_a, sig_b)
        true = np.array([len(_shingles(x) & _shingles(y)) / len(_shingles(x) | _shingles(y))
                         for x, y in zip(base, edited)])
        sigma = np.sqrt(true * (1 - true) / 256)
        assert (np.abs(est - true) <= 4 * sigma + 1e-6).all(), (rate, est, true)
        assert abs(float(est.mean() - true.mean())) < 0.03


def test_documents_without_shingles_never_pair():
    texts = pa.array(["", "!!!", "???", "word"])
    sig, ok = minhash_signatures(texts, NearDedupConfig())
    assert ok.tolist() == [False, False, False, True]
    rows = band_rows(order_keys(0, 4), sig, ok, NearDedupConfig())
    assert set(rows[S.ORDER_KEY].to_pylist()) == {3} and rows.num_rows == 14
    assert candidate_pairs(rows.slice(0, 0)).num_rows == 0


def test_signature_file_round_trip_and_log(tmp_path, corpus):
    texts, ids, _ = corpus
    config = NearDedupConfig()
    keys = order_keys(3, 50)
    sig, ok = minhash_signatures(pa.array(texts[:50]), config)
    table = signature_table(keys, pa.array(ids[:50]), sig, ok)
    path = tmp_path / "sig.arrow"
    with ipc.new_file(path, table.schema) as w:
        w.write_table(table)
    back = ipc.open_file(path).read_all()
    assert back.equals(table)
    picked = select_rows(back, keys[[4, 9]])
    assert picked[S.ID].to_pylist() == [ids[4], ids[9]]
    removals, _, _ = run_dedup(_parts(texts, ids, 128), DedupConfig(near=NearDedupConfig()))
    lines = [json.loads(x) for x in removal_log(removals).splitlines()]
    assert len(lines) == removals.num_rows > 0
    assert set(lines[0]) == {"id", "method", "duplicate_of", "similarity"}
    assert removal_log(removals) == removal_log(run_dedup(_parts(texts, ids, 128), DedupConfig(near=NearDedupConfig()))[0])


def test_order_keys_and_bad_input():
    keys = np.concatenate([order_keys(1, 3), order_keys(0, 2), order_keys(2, 1)])
    assert np.argsort(keys).tolist() == [3, 4, 0, 1, 2, 5]
    with pytest.raises(ValueError, match="order key"):
        order_keys(-1, 5)
    with pytest.raises(KeyError, match="text"):
        document_texts(pa.table({S.ID: ["a"]}))
    with pytest.raises(ValueError, match="order keys"):
        exact_rows(np.zeros(2, np.int64), pa.array(["a"]), pa.array(["x"]))


def test_config_validation_and_lsh_numbers():
    assert NearDedupConfig().bands_rows == (14, 8) and NearDedupConfig().permutations == 112
    assert abs(NearDedupConfig().implied_threshold - 0.719) < 1e-3
    assert abs(lsh_threshold(14, 8) - (1 / 14) ** (1 / 8)) < 1e-12
    assert abs(float(collision_probability(0.8, 14, 8)) - 0.9235) < 1e-3
    tight = NearDedupConfig(threshold=0.85)
    b, r = tight.bands_rows
    assert b * r <= 112 and 0.8 < tight.implied_threshold < 0.92
    assert DedupConfig().exact and DedupConfig().near is None
    assert DedupConfig.model_validate({"exact": False, "near": {"threshold": 0.7}}).near.threshold == 0.7
    for bad, message in (({"exact": False}, "does nothing"),
                         ({"near": {"bands": 4}}, "together"),
                         ({"near": {"bands": 4, "rows": 4, "threshold": 0.5}}, "not both"),
                         ({"near": {"bands": 40, "rows": 4, "num_perm": 100}}, "more than num_perm"),
                         ({"near": {"shingles": 3}}, "Extra inputs"),
                         ({"near": {"threshold": 1.5}}, "less than 1")):
        with pytest.raises(ValidationError, match=message):
            DedupConfig.model_validate(bad)


def test_signatures_do_not_depend_on_the_permutation_block_size(corpus, monkeypatch):
    import operators.minhash as minhash
    texts = pa.array(corpus[0][:30])
    reference = minhash_signatures(texts, NearDedupConfig())[0]
    for block in (7, 1000):    # documents split across blocks at many places
        monkeypatch.setattr(minhash, "_CHUNK_SHINGLES", block)
        assert np.array_equal(minhash_signatures(texts, NearDedupConfig())[0], reference)


def test_ascii_fast_path_equals_the_unicode_normalisation(corpus):
    import pyarrow.compute as pc
    from operators.text_norm import _CJK_CHAR, _SPACE_TO_FIX, normalize_exact
    mixed = pa.array(corpus[0][:200] + ["ＡＢＣ！ done", "naïve café, über", "tab\there\u3000x", "中文，标题",
                                       "a\u00a0 b", "\u2028x", "  Mixed\r\n\x0bCASE  "], pa.large_string())
    unicode = pc.utf8_lower(pc.utf8_normalize(mixed, form="NFKC"))
    words = pc.replace_substring_regex(pc.replace_substring_regex(unicode, pattern=_CJK_CHAR, replacement=r" \1 "),
                                       pattern=r"[\p{P}\p{S}]+", replacement=" ")
    exact = pc.utf8_trim_whitespace(pc.replace_substring_regex(unicode, pattern=_SPACE_TO_FIX, replacement=" "))
    assert normalize_words(mixed).equals(words)
    assert normalize_exact(mixed).equals(exact)
    assert normalize_exact(mixed).to_pylist()[-4:] == ["中文,标题", "a b", "x", "mixed case"]


def test_removal_summary_counts_balance(corpus):
    from operators.dedup_graph import removal_summary
    texts, ids, _ = corpus
    removals, _, _ = run_dedup(_parts(texts, ids, 128), DedupConfig(near=NearDedupConfig()))
    lines = [json.loads(x) for x in removal_log(removals).splitlines()]
    summary = removal_summary(lines + [{"id": "z", "method": "decontaminate", "eval_source": "gsm", "eval_id": "e1",
                                        "ngram": "a b c", "similarity": 0.5}])
    assert sum(summary["removed"].values()) == len(lines) + 1
    assert summary["removed"]["decontaminate"] == 1 and summary["most_matched_eval_rows"] == [("gsm:e1", 1)]
    assert sum(n for _, n in summary["largest_duplicate_groups"]) <= len(lines)
    assert all(0 <= q <= 1 for qs in summary["similarity_quartiles"].values() for q in qs)
