"""Shard sections of the report: per-tokenizer counts (from the manifests) and, from the shard
files themselves, document lengths and the selection's scores, kept fraction by position and
kept/dropped token examples.

Shards are read column by column (`pyarrow.dataset`, only the columns needed), and at most
`MAX_ROWS_READ` rows per tokenizer: the first shard files, whole, so the report of a large
run costs seconds, not a pass over the data. The page says how much was read.
"""
from __future__ import annotations

import json

import numpy as np

from operators import schema as S
from pipeline import storage
from pipeline.report.refs import ref

MAX_ROWS_READ = 4096          # rows per tokenizer read for lengths and selection statistics
POSITION_BINS = 10            # relative position in the response: tenths
SCORE_BINS = 40
EXAMPLES = 3                  # kept/dropped token examples
EXAMPLE_TOKENS = 160          # tokens shown per example
PROMPT_CONTEXT = 24           # prompt tokens shown before a response starts


def _manifest(run_dir: str, tok: str) -> dict | None:
    path = storage.join(run_dir, "shards", tok, "manifest.json")
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def _read_columns(run_dir: str, tok: str, manifest: dict, columns: list[str]):
    """The first shard files (whole) up to MAX_ROWS_READ rows: (table, number of files read)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    files, rows = [], 0
    for entry in manifest.get("shards", []):
        if files and rows + entry.get("rows", 0) > MAX_ROWS_READ:
            break
        files.append(entry["file"])
        rows += entry.get("rows", 0)
    if not files:
        return None, 0
    fs, base = storage.resolve(storage.join(run_dir, "shards", tok))
    dataset = ds.dataset([f"{base}/{f}" for f in files], format="ipc", filesystem=fs)
    present = [c for c in columns if c in dataset.schema.names]
    table = dataset.to_table(columns=present)
    return table.combine_chunks() if table.num_rows else pa.table({}), len(files)


def _fixed(table, col: str) -> np.ndarray:
    arr = table.column(col).combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, arr.type.list_size)


def _pieces(table):
    """(row, start, end, doc_id, doc_token_start) of every document piece in the table."""
    ntok = table.column(S.NUM_TOKENS).to_numpy()
    ids = table.column(S.DOC_IDS).to_pylist()
    offsets = table.column(S.DOC_OFFSETS).to_pylist()
    starts = table.column(S.DOC_TOKEN_STARTS).to_pylist() if S.DOC_TOKEN_STARTS in table.column_names \
        else [[0] * len(o) for o in offsets]
    for r in range(table.num_rows):
        ends = offsets[r][1:] + [int(ntok[r])]
        for d, a, b, s in zip(ids[r], offsets[r], ends, starts[r]):
            yield r, a, b, d, s


def _doc_lengths(table) -> np.ndarray:
    lengths: dict[str, int] = {}
    for _, a, b, d, _ in _pieces(table):
        lengths[d] = lengths.get(d, 0) + (b - a)
    return np.fromiter(lengths.values(), dtype=np.int64, count=len(lengths))


def collect_shards(run_dir: str) -> dict:
    """{"shards": {tok: ...} | None, "selection": {...} | None}."""
    toks = [t for t in storage.listdir(storage.join(run_dir, "shards"))
            if storage.exists(storage.join(run_dir, "shards", t, "manifest.json"))]
    shards, selection = {}, None
    for tok in toks:
        m = _manifest(run_dir, tok)
        src = f"shards/{tok}/manifest.json"
        entry = {"tokenizer": tok, "spec": m.get("tokenizer", {}).get("spec", ""), "src": src,
                 "seq_len": ref(m, src, "seq_len"), "vocab_size": ref(m, src, "tokenizer.vocab_size"),
                 "files": ref(m, src, "count:shards.*"), "bytes": ref(m, src, "sum:shards.*.bytes"),
                 "padding_fraction": ref(m, src, "packing.padding_fraction"),
                 "split_docs": ref(m, src, "packing.split_docs"), "pieces": ref(m, src, "packing.pieces"),
                 "selection_method": m.get("selection", {}).get("method", "none")}
        for k in ("rows", "docs", "tokens", "target_tokens", "loss_tokens", "pad_tokens"):
            entry[k] = ref(m, src, f"counts.{k}")
        selected = entry["selection_method"] not in (None, "none")
        cols = [S.DOC_IDS, S.DOC_OFFSETS, S.DOC_TOKEN_STARTS, S.NUM_TOKENS]
        if selected and selection is None:
            cols += [S.INPUT_IDS, S.TARGET_MASK, S.LOSS_MASK, S.TOKEN_SCORES]
        table, nfiles = _read_columns(run_dir, tok, m, cols)
        entry["sample"] = {"files": ref(m, src, f"count:shards[:{nfiles}]"),
                           "rows": ref(m, src, f"sum:shards[:{nfiles}].rows")}
        entry["doc_lengths"] = _doc_lengths(table).tolist() if table is not None and table.num_rows else []
        shards[tok] = entry
        if selected and selection is None:
            selection = _selection(run_dir, tok, m, src, table, entry["sample"])
    return {"shards": shards or None, "selection": selection}


def _selection(run_dir: str, tok: str, m: dict, src: str, table, sample: dict) -> dict:
    sel = m.get("selection", {})
    out = {"tokenizer": tok, "method": sel.get("method"), "src": src, "sample": sample,
           "params": {k: v for k, v in sel.items() if k not in ("method", "target_tokens", "loss_tokens", "kept_fraction")
                      and not isinstance(v, (int, float))},
           "numbers": {k: ref(m, src, f"selection.{k}") for k, v in sel.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)},
           "scores_kept": [], "scores_dropped": [], "position": None, "examples": []}
    if table is None or not table.num_rows:
        return out
    tgt, loss = _fixed(table, S.TARGET_MASK).astype(bool), _fixed(table, S.LOSS_MASK).astype(bool)
    if S.TOKEN_SCORES in table.column_names:
        scores = _fixed(table, S.TOKEN_SCORES).astype(np.float32)
        finite = np.isfinite(scores) & tgt
        out["scores_kept"] = _histogram(scores[finite & loss], scores[finite])
        out["scores_dropped"] = _histogram(scores[finite & ~loss], scores[finite])
    docs = _reassemble(table, tgt, loss)
    kept, total = np.zeros(POSITION_BINS), np.zeros(POSITION_BINS)
    for _, t, l in docs.values():
        where = np.flatnonzero(t)
        if len(where):
            bins = np.minimum((np.arange(len(where)) * POSITION_BINS) // len(where), POSITION_BINS - 1)
            np.add.at(total, bins, 1)
            np.add.at(kept, bins, l[where])
    out["position"] = {"kept": kept.tolist(), "total": total.tolist(), "bins": POSITION_BINS}
    out["examples"] = _examples(m, docs, _fixed(table, S.INPUT_IDS), table)
    return out


def _histogram(values: np.ndarray, all_values: np.ndarray) -> dict:
    lo, hi = (float(all_values.min()), float(all_values.max())) if all_values.size else (0.0, 1.0)
    counts, edges = np.histogram(values, bins=SCORE_BINS, range=(lo, hi if hi > lo else lo + 1))
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def _reassemble(table, tgt, loss) -> dict[str, tuple]:
    """doc id -> (row pieces [(row, a, b)], target mask, loss mask), pieces in document order;
    only documents whose every piece is in the table (pieces start at 0 and are contiguous)."""
    pieces: dict[str, list] = {}
    for r, a, b, d, s in _pieces(table):
        pieces.setdefault(d, []).append((s, r, a, b))
    docs = {}
    for d, ps in pieces.items():
        ps.sort()
        expect, ok = 0, True
        for s, _, a, b in ps:
            ok, expect = ok and s == expect, expect + (b - a)
        if ok:
            docs[d] = ([(r, a, b) for _, r, a, b in ps],
                       np.concatenate([tgt[r, a:b] for _, r, a, b in ps]),
                       np.concatenate([loss[r, a:b] for _, r, a, b in ps]))
    return docs


def _token_texts(decode, ids: list[int]) -> list[str]:
    """Each token's text: the growth of the decoded prefix (so SentencePiece spaces and
    WordPiece `##` come out as they read); a token that ends inside a UTF-8 character gets
    "" and the next one the whole character. O(n^2) decodes: for EXAMPLE_TOKENS-sized windows."""
    out, prev = [], ""
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        if text.endswith("\ufffd") and k < len(ids):
            out.append("")
            continue
        out.append(text[len(prev):] if text.startswith(prev) else decode(ids[k - 1:k]))
        prev = text
    return out


def _examples(m: dict, docs: dict, ids_2d: np.ndarray, table) -> list[dict]:
    """A few documents as (text, state) runs: state "prompt" (not a target), "kept" (in the
    loss), "dropped" (a target the selection left out). Documents with a prompt come first."""
    decode = None
    try:
        from operators.tokenizers import load_tokenizer
        tk = load_tokenizer(m["tokenizer"]["spec"], read_bytes=storage.read_bytes, exists=storage.exists)
        if hasattr(tk, "decode"):
            decode = tk.decode
    except Exception:  # the tokenizer moved or cannot load here: show token ids instead
        decode = None
    with_prompt, plain = [], []
    for d, (pieces, t, l) in docs.items():
        first = int(np.argmax(t)) if t.any() else None
        if first is None or not (l.any() and (~l & t).any()):
            continue
        (with_prompt if first > 1 else plain).append((d, pieces, t, l, first))
    chosen = with_prompt[:EXAMPLES - 1] + plain[:1]
    chosen += [c for c in with_prompt[EXAMPLES - 1:] + plain[1:]][:EXAMPLES - len(chosen)]
    out = []
    for d, pieces, t, l, first in chosen:
        ids = np.concatenate([ids_2d[r, a:b] for r, a, b in pieces]).tolist()
        start = max(0, first - PROMPT_CONTEXT)
        window = slice(start, start + EXAMPLE_TOKENS)
        ids_w, t_w, l_w = ids[window], t[window], l[window]
        texts = _token_texts(decode, ids_w) if decode else [f"[{i}]" for i in ids_w]
        states = ["kept" if lk else "dropped" if tk_ else "prompt" for tk_, lk in zip(t_w, l_w)]
        runs: list[list] = []
        for text, state in zip(texts, states):
            if runs and runs[-1][1] == state:
                runs[-1][0] += text
            else:
                runs.append([text, state])
        out.append({"doc_id": d, "runs": runs, "decoded": decode is not None,
                    "truncated": len(ids) > start + EXAMPLE_TOKENS, "skipped": start})
    return out
