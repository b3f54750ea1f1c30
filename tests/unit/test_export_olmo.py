"""OLMo-core exports read back by OLMo-core's own numpy datasets (ai2-olmo-core 3.0.0)."""
import numpy as np
import pytest

from pipeline.export import ExportError, export_run
from tests.unit.export_shards import (corpus_rows, documents_of, exported_order, packed_masks, shard_run,  # noqa: F401
                                      tokenized_docs, write_shard_set)

numpy_dataset = pytest.importorskip("olmo_core.data.numpy_dataset",
                                    reason="ai2-olmo-core (dev extra, installed with --no-deps) is not importable")


def _export(shard_run, name, out):
    m = export_run(str(shard_run["run_dir"]), "olmo", tokenizer=name, out=str(out))[0]
    _, docs, manifest = shard_run[name]
    expect = documents_of(docs)
    order = exported_order(out / name)
    want = [(expect[d][0], packed_masks(expect[d], manifest["seq_len"])[1]) for d in order]
    return m, manifest, want


@pytest.mark.parametrize("name,dtype", [("bpe", np.uint16), ("sp", np.uint16), ("cl100k", np.uint32)])
def test_fsl_dataset_windows_label_masks_and_document_lengths(shard_run, tmp_path, name, dtype):
    m, manifest, want = _export(shard_run, name, tmp_path)
    tokens = np.concatenate([w[0] for w in want])
    loss = np.concatenate([w[1] for w in want]).astype(bool)
    tok = manifest["tokenizer"]
    seq_len = 64
    ds = numpy_dataset.NumpyFSLDataset(
        *m["paths"], sequence_length=seq_len, pad_token_id=tok["pad_id"], eos_token_id=tok["eos_id"],
        vocab_size=tok["vocab_size"], dtype=dtype, label_mask_paths=m["label_mask_paths"],
        generate_doc_lengths=True, bos_token_id=tok["bos_id"])
    ds.work_dir = tmp_path / "work"
    ds.prepare()
    assert m["dtype"] == np.dtype(dtype).name and len(ds) == len(tokens) // seq_len
    ends = np.cumsum([len(w[0]) for w in want])
    for i in range(len(ds)):
        item = ds[i]
        window = slice(i * seq_len, (i + 1) * seq_len)
        assert item["input_ids"].tolist() == tokens[window].tolist()
        assert item["label_mask"].tolist() == loss[window].tolist()
        cuts = np.r_[0, ends[(ends > window.start) & (ends < window.stop)] - window.start, seq_len]
        assert item["doc_lens"].tolist() == np.diff(cuts).tolist()  # OLMo finds our boundaries at EOS


def test_padded_dataset_gives_one_instance_per_document(shard_run, tmp_path):
    m, manifest, want = _export(shard_run, "sp", tmp_path)
    tok = manifest["tokenizer"]
    longest = max(len(w[0]) for w in want)
    ds = numpy_dataset.NumpyPaddedFSLDataset(
        *m["paths"], sequence_length=longest, pad_token_id=tok["pad_id"], eos_token_id=tok["eos_id"],
        vocab_size=tok["vocab_size"], dtype=np.uint16, label_mask_paths=m["label_mask_paths"])
    ds.work_dir = tmp_path / "work"
    ds.prepare()
    assert len(ds) == len(want) == m["counts"]["docs"]
    for i, (ids, loss) in enumerate(want):
        item = ds[i]
        n = len(ids)
        assert item["input_ids"][:n].tolist() == ids.tolist() and (item["input_ids"][n:] == tok["pad_id"]).all()
        assert item["label_mask"][:n].tolist() == loss.astype(bool).tolist() and not item["label_mask"][n:].any()


def test_metadata_file_gives_the_same_boundaries(shard_run, tmp_path):
    from olmo_core.data.utils import iter_document_indices
    m, manifest, want = _export(shard_run, "bpe", tmp_path)
    ends = np.cumsum([len(w[0]) for w in want])
    expect = list(zip(np.r_[0, ends[:-1]].tolist(), ends.tolist()))
    from_metadata = list(iter_document_indices(m["paths"][0], use_array_if_local=False, dtype=np.uint16))
    from_eos = list(iter_document_indices(m["paths"][0], eos_token_id=manifest["tokenizer"]["eos_id"], dtype=np.uint16))
    assert from_metadata == from_eos == expect and m["docs_with_inner_eos"] == 0


def test_refuses_shards_without_eos(tmp_path, hf_bpe_dir):
    docs, tok = tokenized_docs(f"hf:{hf_bpe_dir}/tokenizer.json", corpus_rows(5, 0, 0))
    tok = {**tok, "add_eos": False}
    write_shard_set(tmp_path / "run" / "shards" / "t", docs, tok, name="t", seq_len=64)
    with pytest.raises(ExportError, match="add_eos: false"):
        export_run(str(tmp_path / "run"), "olmo")


def test_inner_eos_is_counted_and_the_metadata_keeps_the_boundary(tmp_path, hf_bpe_dir):
    import pyarrow as pa
    from olmo_core.data.utils import iter_document_indices
    from operators import schema as S
    docs, tok = tokenized_docs(f"hf:{hf_bpe_dir}/tokenizer.json", corpus_rows(5, 0, 0))
    ids = docs.column(S.INPUT_IDS).combine_chunks()
    values = ids.values.to_numpy().copy()
    values[3] = tok["eos_id"]  # an EOS id inside the first document (an SFT template can put one there)
    docs = docs.set_column(docs.schema.get_field_index(S.INPUT_IDS), S.INPUT_IDS,
                           pa.ListArray.from_arrays(ids.offsets, pa.array(values, pa.int32())))
    write_shard_set(tmp_path / "run" / "shards" / "t", docs, tok, name="t", seq_len=512)
    m = export_run(str(tmp_path / "run"), "olmo")[0]
    assert m["docs_with_inner_eos"] == 1
    from_metadata = list(iter_document_indices(m["paths"][0], use_array_if_local=False, dtype=np.uint16))
    from_eos = list(iter_document_indices(m["paths"][0], eos_token_id=tok["eos_id"], dtype=np.uint16))
    assert len(from_metadata) == docs.num_rows and len(from_eos) == docs.num_rows + 1
