"""Near dedup steps C and D: pairs -> connected components -> one kept per component.

    C  one task:  pairs   = concat of every bucket's candidate_pairs (minhash.py)
                  members = pair_members(pairs)
                  sigs    = concat over parts of select_rows(signatures/<part>.arrow, members)
                  near    = near_duplicates(pairs, sigs, exclude=exact removals' ORDER_KEY,
                                            min_similarity=config.min_similarity)
                  write removals = concat(exact removals, near) sorted by ORDER_KEY, and
                  dedup/removed.jsonl = removal_log(removals)
    D  per part:  keep = ~removal_mask(order_keys, removals[ORDER_KEY])

Components come from scipy's `connected_components` over the pair graph (transitive: a~b
and b~c put a, b, c together). The keeper is the component's lowest order key, so the
result does not depend on the bucket count, the part count or the order pairs arrive in.
`duplicate_of` names the keeper, and `similarity` is the Jaccard similarity estimated from
the two signatures (a chain a~b~c can leave c far from a: the log shows it).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as S
from operators.minhash import estimate_jaccard, signature_matrix, unique_pairs

REMOVALS_SCHEMA = pa.schema([
    pa.field(S.ORDER_KEY, pa.int64(), nullable=False),
    pa.field(S.ID, pa.string(), nullable=False),
    pa.field(S.DUPLICATE_OF_KEY, pa.int64(), nullable=False),
    pa.field(S.DUPLICATE_OF, pa.string(), nullable=False),
    pa.field(S.SIMILARITY, pa.float32(), nullable=False),
    pa.field(S.METHOD, pa.string(), nullable=False),
])


def removals_table(keys: np.ndarray, ids: pa.Array, dup_keys: np.ndarray, dup_ids: pa.Array,
                   similarity: np.ndarray, method: str) -> pa.Table:
    """A REMOVALS_SCHEMA table sorted by order key."""
    order = pa.array(np.argsort(np.asarray(keys, np.int64), kind="stable"))
    table = pa.table({
        S.ORDER_KEY: np.asarray(keys, np.int64), S.ID: ids.cast(pa.string()),
        S.DUPLICATE_OF_KEY: np.asarray(dup_keys, np.int64), S.DUPLICATE_OF: dup_ids.cast(pa.string()),
        S.SIMILARITY: np.asarray(similarity, np.float32), S.METHOD: pa.array([method] * len(keys), pa.string()),
    }, schema=REMOVALS_SCHEMA)
    return table.take(order)


def pair_members(pairs: pa.Table) -> np.ndarray:
    """Sorted unique order keys named by any pair (int64)."""
    return np.unique(np.concatenate([pairs[S.KEY_A].to_numpy(), pairs[S.KEY_B].to_numpy()]))


def select_rows(table: pa.Table, keys: np.ndarray) -> pa.Table:
    """The rows of `table` whose order key is in `keys` (for reading back signatures)."""
    mask = np.isin(table[S.ORDER_KEY].to_numpy(), keys)
    return table.filter(pa.array(mask))


def connected_components(key_a: np.ndarray, key_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, keepers): every key in a pair, sorted, and its component's lowest key."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as components

    nodes, index = np.unique(np.concatenate([key_a, key_b]).astype(np.int64), return_inverse=True)
    if len(nodes) == 0:
        return nodes, nodes.copy()
    m = len(key_a)
    graph = coo_matrix((np.ones(m, np.int8), (index[:m], index[m:])), shape=(len(nodes), len(nodes)))
    _, label = components(graph, directed=False)
    # nodes are sorted, so the first node seen with each label is that component's lowest key
    first = np.full(label.max() + 1, len(nodes), np.int64)
    np.minimum.at(first, label, np.arange(len(nodes)))
    return nodes, nodes[first[label]]


def near_duplicates(pairs: pa.Table, signatures: pa.Table, *, exclude: np.ndarray | None = None,
                    min_similarity: float | None = None) -> pa.Table:
    """Step C: removals (method "near") from all candidate pairs.

    pairs: (key_a, key_b), repeats allowed; signatures: (order_key, id, signature) with a
    row for every pair member (more rows are ignored). Pairs touching `exclude` (documents
    already removed, e.g. exact duplicates) are dropped; with `min_similarity`, so are pairs
    whose estimated Jaccard is lower. Each non-keeper of a component is removed.
    """
    pairs = unique_pairs(pairs[S.KEY_A].to_numpy(), pairs[S.KEY_B].to_numpy())
    a, b = pairs[S.KEY_A].to_numpy(), pairs[S.KEY_B].to_numpy()
    if exclude is not None and len(exclude):
        keep = ~(np.isin(a, exclude) | np.isin(b, exclude))
        a, b = a[keep], b[keep]
    sig_keys = signatures[S.ORDER_KEY].to_numpy()
    order = np.argsort(sig_keys, kind="stable")
    sig_keys = sig_keys[order]
    sig = signature_matrix(signatures)[order]
    sig_ids = signatures[S.ID].combine_chunks().take(pa.array(order))

    def rows_of(keys: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(sig_keys, keys)
        found = pos < len(sig_keys)
        found[found] = sig_keys[pos[found]] == keys[found]
        if not found.all():
            raise KeyError(f"near_duplicates: no signature for order key {int(keys[~found][0])}")
        return pos

    if min_similarity is not None and len(a):
        ok = estimate_jaccard(sig[rows_of(a)], sig[rows_of(b)]) >= np.float32(min_similarity)
        a, b = a[ok], b[ok]
    nodes, keepers = connected_components(a, b)
    removed = nodes != keepers
    keys, dup = nodes[removed], keepers[removed]
    rk, rd = rows_of(keys), rows_of(dup)
    return removals_table(keys, sig_ids.take(pa.array(rk)), dup, sig_ids.take(pa.array(rd)),
                          estimate_jaccard(sig[rk], sig[rd]), "near")


def removal_mask(order_keys: np.ndarray, removed_keys: np.ndarray) -> np.ndarray:
    """Step D: bool [N], True where the document is removed."""
    return np.isin(np.asarray(order_keys, np.int64), np.asarray(removed_keys, np.int64))


_LOG_FIELDS = {"exact": (S.DUPLICATE_OF, S.SIMILARITY), "near": (S.DUPLICATE_OF, S.SIMILARITY),
               "decontaminate": (S.EVAL_SOURCE, S.EVAL_ID, S.NGRAM, S.SIMILARITY)}


def removal_log(removals: pa.Table) -> str:
    """The `dedup/` log: one JSON object per removed document, in table order:
    {"id", "method": "exact"|"near", "duplicate_of", "similarity"} or
    {"id", "method": "decontaminate", "eval_source", "eval_id", "ngram", "similarity"}."""
    rows = removals.select([c for c in removals.column_names
                            if c in {S.ID, S.METHOD, S.DUPLICATE_OF, S.SIMILARITY, S.EVAL_SOURCE, S.EVAL_ID, S.NGRAM}])
    if S.SIMILARITY in rows.column_names:   # 4 decimals: stable text for byte-identical logs
        rows = rows.set_column(rows.column_names.index(S.SIMILARITY), S.SIMILARITY,
                               pc.round(rows[S.SIMILARITY].cast(pa.float64()), 4))
    lines = []
    for row in rows.to_pylist():
        fields = _LOG_FIELDS[row[S.METHOD]]
        lines.append(json.dumps({S.ID: row[S.ID], S.METHOD: row[S.METHOD], **{f: row[f] for f in fields}},
                                ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def removal_summary(log_lines: list[dict], top: int = 5) -> dict:
    """What `inspect` shows for a `dedup/` log (its parsed JSON lines): counts per method,
    similarity quartiles per method, the kept documents with the most removed duplicates,
    and the eval rows that removed the most documents."""
    by_method: dict[str, list[float]] = {}
    keepers: dict[str, int] = {}
    eval_rows: dict[str, int] = {}
    for row in log_lines:
        by_method.setdefault(row["method"], []).append(float(row.get("similarity", 1.0)))
        if "duplicate_of" in row:
            keepers[row["duplicate_of"]] = keepers.get(row["duplicate_of"], 0) + 1
        if "eval_id" in row:
            key = f"{row['eval_source']}:{row['eval_id']}"
            eval_rows[key] = eval_rows.get(key, 0) + 1

    def most(counts: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]

    return {
        "removed": {m: len(v) for m, v in sorted(by_method.items())},
        "similarity_quartiles": {m: [round(float(q), 4) for q in np.quantile(v, [0.25, 0.5, 0.75])]
                                 for m, v in sorted(by_method.items())},
        "largest_duplicate_groups": most(keepers),
        "most_matched_eval_rows": most(eval_rows),
    }
