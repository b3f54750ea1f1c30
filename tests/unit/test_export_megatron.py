"""Megatron exports read back by Megatron-Core's own IndexedDataset, built by its own builder, and blended."""
import numpy as np
import pytest

from pipeline.export import export_run
from tests.unit.export_shards import WEIGHTS, documents_of, exported_order, shard_run  # noqa: F401

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron.*"),  # no Transformer Engine on CPU
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # megatron's builder under numpy 2
indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                      reason="megatron-core==0.16.1 (dev extra) is not installed")


@pytest.mark.parametrize("name,dtype", [("bpe", np.uint16), ("sp", np.uint16), ("cl100k", np.int32)])
def test_indexed_dataset_reads_back_every_document(shard_run, tmp_path, name, dtype):
    _, docs, manifest = shard_run[name]
    m = export_run(str(shard_run["run_dir"]), "megatron", tokenizer=name, out=str(tmp_path), allow_drop_masks=True)[0]
    ds = indexed_dataset.IndexedDataset(str(tmp_path / name / "data"))
    expect = documents_of(docs)
    order = exported_order(tmp_path / name)
    assert len(ds) == len(order) == docs.num_rows == m["counts"]["docs"]
    assert ds.index.dtype == dtype and m["dtype"] == np.dtype(dtype).name
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one document per sequence
    for i, doc_id in enumerate(order):
        assert ds[i].tolist() == expect[doc_id][0].tolist()
    eos = manifest["tokenizer"]["eos_id"]
    assert m["eod_id"] == eos and all(ds[i][-1] == eos for i in range(len(ds)))


def test_same_bytes_as_megatrons_own_builder(shard_run, tmp_path):
    import torch
    export_run(str(shard_run["run_dir"]), "megatron", tokenizer="bpe", out=str(tmp_path), allow_drop_masks=True)
    ours = indexed_dataset.IndexedDataset(str(tmp_path / "bpe" / "data"))
    builder = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for i in range(len(ours)):
        builder.add_document(torch.from_numpy(ours[i].astype(np.int64)), [len(ours[i])])
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / "bpe" / f"data.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()


def test_blend_per_domain_with_the_mixture_weights(shard_run, tmp_path):
    from megatron.core.datasets.utils import get_blend_from_list
    _, docs, _ = shard_run["bpe"]
    m = export_run(str(shard_run["run_dir"]), "megatron-blend", tokenizer="bpe", out=str(tmp_path),
                   allow_drop_masks=True)[0]
    data_path = (tmp_path / "bpe" / "data_path.txt").read_text().strip()
    assert data_path == m["data_path"]
    prefixes, weights = get_blend_from_list(data_path.split())  # Megatron's own --data-path parser
    assert weights == [WEIGHTS[str(d)] for d in range(3)]
    assert prefixes == [str(tmp_path / "bpe" / f"domain-{d:05d}") for d in range(3)]
    expect = documents_of(docs)
    domain_of = dict(zip(docs.column("id").to_pylist(), docs.column("domain_id").to_pylist()))
    seen = []
    for d, prefix in enumerate(prefixes):
        ds = indexed_dataset.IndexedDataset(prefix)
        ids = [doc_id for doc_id in exported_order(tmp_path / "bpe") if domain_of[doc_id] == d]
        assert len(ds) == len(ids) == m["domain_docs"][str(d)]
        for i, doc_id in enumerate(ids):
            assert ds[i].tolist() == expect[doc_id][0].tolist()
        seen += ids
    assert sorted(seen) == sorted(expect)


def test_blend_builds_a_megatron_gpt_dataset(shard_run, tmp_path):
    """The data-path string through Megatron-Core's BlendedMegatronDatasetBuilder: samples come from every
    domain in the weights' proportions, and each sample is a window of that domain's token stream."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.core.tokenizers import MegatronTokenizerBase
    _, docs, manifest = shard_run["bpe"]
    m = export_run(str(shard_run["run_dir"]), "megatron-blend", tokenizer="bpe", out=str(tmp_path),
                   allow_drop_masks=True)[0]

    class Tok(MegatronTokenizerBase):  # GPTDataset reads vocab_size, eod and pad only
        def __init__(self):
            super().__init__(path="tokenmill-test", config={})
            self.unique_identifiers = {"class": "Tok"}  # what GPTDataset hashes into its cache names
        vocab_size = manifest["tokenizer"]["vocab_size"]
        eod = manifest["tokenizer"]["eos_id"]
        pad = manifest["tokenizer"]["pad_id"]
        def tokenize(self, text): raise NotImplementedError
        def detokenize(self, ids): raise NotImplementedError
        def apply_chat_template(self, *a, **k): raise NotImplementedError
        vocab = inv_vocab = {}

    seq_len, num_samples = 32, 200
    config = GPTDatasetConfig(random_seed=1, sequence_length=seq_len, blend=get_blend_from_list(m["data_path"].split()),
                              split="1,0,0", tokenizer=Tok(), reset_position_ids=True, reset_attention_mask=True,
                              eod_mask_loss=False, mid_level_dataset_surplus=0.5)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    datasets = [indexed_dataset.IndexedDataset(p) for p in get_blend_from_list(m["data_path"].split())[0]]
    domain_docs = [[ds[i].copy() for i in range(len(ds))] for ds in datasets]  # copies: ds[i] views an mmap
    counts = np.bincount(train.dataset_index[:num_samples], minlength=3)
    assert np.allclose(counts / num_samples, [WEIGHTS[str(d)] for d in range(3)], atol=0.02)
    eod = manifest["tokenizer"]["eos_id"]
    for k in range(0, num_samples, 5):
        d = int(train.dataset_index[k])
        text = np.r_[train[k]["tokens"].numpy(), train[k]["labels"].numpy()[-1]]
        # GPTDataset concatenates shuffled documents: every EOD-delimited segment is part of one domain-d document
        for seg in np.split(text, np.flatnonzero(text == eod) + 1):
            if len(seg):
                assert any(_contains(doc, seg) for doc in domain_docs[d]), f"sample {k}: a segment not in domain {d}"


def _contains(hay: np.ndarray, needle: np.ndarray) -> bool:
    if len(needle) > len(hay):
        return False
    hits = np.flatnonzero(hay[: len(hay) - len(needle) + 1] == needle[0])
    return any((hay[h:h + len(needle)] == needle).all() for h in hits)
