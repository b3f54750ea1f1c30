"""DocumentEmbedder on real text from shared/data, with the shipped all-MiniLM-L6-v2."""
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pytest

from operators import schema
from operators.embed import DocumentEmbedder, document_texts, embedding_matrix
from tests.conftest import shared_rows as read_rows


@pytest.fixture(scope="module")
def texts() -> list[str]:
    # Mixed lengths (short news, encyclopedia, long usenet posts) so length sorting matters.
    rows = (read_rows("news_agnews_5k.jsonl.zst", 6) + read_rows("news_20newsgroups_train.jsonl.zst", 3)
            + read_rows("encyclopedia_dbpedia14_9800.jsonl.zst", 5))
    return [r["text"] for r in rows]


@pytest.fixture(scope="module")
def embedder() -> DocumentEmbedder:
    # Small batches: several length-sorted batches. 128 tokens keeps the long posts cheap.
    emb = DocumentEmbedder(max_seq_length=128, batch_size=4)
    emb.setup()
    return emb


@pytest.fixture(scope="module")
def batched(embedder, texts) -> np.ndarray:
    return embedder.embed_texts(texts)


def doc_table(texts, prompts=None, responses=None) -> pa.Table:
    n = len(texts)
    return pa.table({schema.ID: [f"doc-{i}" for i in range(n)],
                     schema.TEXT: pa.array(texts, pa.string()),
                     schema.PROMPT: pa.array(prompts or [None] * n, pa.string()),
                     schema.RESPONSE: pa.array(responses or [None] * n, pa.string())})


def test_adds_normalised_fixed_size_column_of_dim_384(embedder, texts, batched):
    out = embedder(doc_table(texts))
    assert out.schema.field(schema.EMBEDDING).type == pa.list_(pa.float32(), 384)
    assert out.column_names[:4] == [schema.ID, schema.TEXT, schema.PROMPT, schema.RESPONSE]
    vectors = embedding_matrix(out)
    assert vectors.shape == (len(texts), 384) and embedder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, batched, atol=1e-5)  # table path == plain-strings path


def test_length_batching_restores_input_order(embedder, texts, batched):
    # Reference: each text encoded alone (no sorting, no padding), normalised.
    alone = np.stack([embedder.model.encode([t], normalize_embeddings=True)[0] for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    np.testing.assert_allclose(embedder.embed_texts(texts[::-1]), batched[::-1], atol=1e-5)


def test_deterministic(embedder, texts, batched):
    np.testing.assert_allclose(embedder.embed_texts(texts), batched, atol=1e-6)


def test_truncates_to_max_seq_length(embedder, texts):
    long_text = max(texts, key=len)  # a usenet post, far longer than 16 tokens
    extended = long_text + " Completely different words appended at the very end."
    short = DocumentEmbedder(max_seq_length=16)
    short.setup()
    assert short.model.max_seq_length == 16
    a, b = short.embed_texts([long_text, extended])
    np.testing.assert_allclose(a, b, atol=1e-6)  # only the first 16 tokens count
    # ...and they are the first 14 word pieces (16 minus [CLS] and [SEP]).
    tokenizer = short.model.tokenizer
    prefix = tokenizer.convert_tokens_to_string(tokenizer.tokenize(long_text)[:14])
    np.testing.assert_allclose(a, short.embed_texts([prefix])[0], atol=1e-4)


def test_sft_rows_embed_prompt_and_response(embedder):
    rows = read_rows("sft_alpaca_00000_42147.jsonl.zst", 3)
    table = doc_table([None] * 3, [r["prompt"] for r in rows], [r["response"] for r in rows])
    joined = [r["prompt"] + "\n\n" + r["response"] for r in rows]
    assert document_texts(table).to_pylist() == joined
    np.testing.assert_allclose(embedding_matrix(embedder(table)), embedder.embed_texts(joined), atol=1e-5)


def test_row_without_any_text_is_a_clear_error(embedder):
    with pytest.raises(ValueError, match="doc-1"):
        embedder(doc_table(["fine", None], [None, "prompt only"], [None, None]))


def test_empty_table(embedder):
    out = embedder(doc_table([]))
    assert len(out) == 0 and out.schema.field(schema.EMBEDDING).type == pa.list_(pa.float32(), 384)


def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DocumentEmbedder(model=str(missing)).setup()
    with pytest.raises(FileNotFoundError, match="modules.json"):
        DocumentEmbedder(model=str(tmp_path)).setup()  # exists, but is no model directory


def test_constructed_without_weights_until_setup(texts, batched):
    # A stage worker constructs the operator, then calls setup() once: the constructor loads
    # nothing (it is cheap and picklable), and setup() gives the same vectors as any other load.
    clone = pickle.loads(pickle.dumps(DocumentEmbedder(max_seq_length=128, batch_size=4)))
    assert clone.model is None
    with pytest.raises(RuntimeError, match="setup"):
        clone.embed_texts(["x"])
    clone.setup()
    np.testing.assert_array_equal(clone.embed_texts(texts), batched)
