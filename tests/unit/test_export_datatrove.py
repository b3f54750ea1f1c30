"""DataTrove exports read back by DataTrove's own token reader (datatrove 0.10.1) and its merger."""
import numpy as np
import pytest

from pipeline.export import export_run
from tests.unit.export_shards import documents_of, exported_order, packed_masks, shard_run  # noqa: F401

dataset = pytest.importorskip("datatrove.utils.dataset", reason="datatrove==0.10.1 (dev extra) is not installed")


def _expected_stream(shard_run, name, export_dir):
    """Our documents in export order: (tokens, loss mask, document ends)."""
    _, docs, manifest = shard_run[name]
    expect = documents_of(docs)
    order = exported_order(export_dir)
    tokens = np.concatenate([expect[d][0] for d in order])
    loss = np.concatenate([packed_masks(expect[d], manifest["seq_len"])[1] for d in order])
    ends = np.cumsum([len(expect[d][0]) for d in order])
    return tokens, loss, ends


@pytest.mark.parametrize("name,token_size", [("bpe", 2), ("cl100k", 4)])
def test_folder_dataset_returns_the_same_windows_and_positions(shard_run, tmp_path, name, token_size):
    m = export_run(str(shard_run["run_dir"]), "datatrove", tokenizer=name, out=str(tmp_path))[0]
    assert m["token_size"] == token_size
    tokens, _, ends = _expected_stream(shard_run, name, tmp_path / name)
    seq_len = 100
    ds = dataset.DatatroveFolderDataset(str(tmp_path / name), seq_len=seq_len, token_size=token_size,
                                        return_positions=True)
    assert len(ds) == len(tokens) // (seq_len + 1) > 10
    for i in range(len(ds)):
        ws = i * (seq_len + 1)
        item = ds[i]
        assert item["input_ids"].tolist() == tokens[ws:ws + seq_len + 1].tolist()
        # positions restart at the window's first token and at every document start inside it
        restarts = np.r_[0, ends[(ends > ws) & (ends <= ws + seq_len)] - ws]
        local = np.arange(seq_len + 1)
        want = local - restarts[np.searchsorted(restarts, local, side="right") - 1]
        assert item["positions"].tolist() == want.tolist()

def test_loss_file_and_index_through_datatroves_merger(shard_run, tmp_path):
    """DataTrove's DocumentTokenizerMerger copies .ds, .ds.index and .ds.loss document by document (its own
    readers: load_doc_ends, get_data_reader); the merged files hold our tokens, ends and loss masks."""
    from datatrove.io import get_datafolder
    from datatrove.pipeline.tokens.merger import DocumentTokenizerMerger, get_data_reader, load_doc_ends
    export_run(str(shard_run["run_dir"]), "datatrove", tokenizer="bpe", out=str(tmp_path / "export"))
    tokens, loss, ends = _expected_stream(shard_run, "bpe", tmp_path / "export" / "bpe")
    assert loss.sum() < len(loss) * 0.7  # the selection is there to lose
    merger = DocumentTokenizerMerger(input_folder=str(tmp_path / "export" / "bpe"),
                                     output_folder=str(tmp_path / "merged"),
                                     save_filename="merged", shuffle=False, save_loss_metadata=True, progress=False)
    merger.run(None)
    folder = get_datafolder(str(tmp_path / "merged"))
    ds_files = folder.list_files(glob_pattern="*.ds")
    assert len(ds_files) == 1
    merged_ends = load_doc_ends(folder.open(ds_files[0] + ".index", "rb"))
    assert merged_ends.tolist() == ends.tolist()
    got_tokens = b"".join(get_data_reader(folder.open(ds_files[0], "rb"), merged_ends, nb_bytes=2))
    got_loss = b"".join(get_data_reader(folder.open(ds_files[0] + ".loss", "rb"), merged_ends, nb_bytes=1))
    assert np.frombuffer(got_tokens, np.uint16).tolist() == tokens.tolist()
    assert np.frombuffer(got_loss, np.bool_).tolist() == loss.astype(bool).tolist()
    meta = (tmp_path / "export" / "bpe" / "tokens.ds.metadata").read_text().splitlines()
    assert meta[0] == "bpe|2" and int(meta[1]) == len(tokens)
