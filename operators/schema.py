"""Column names and types: the contract between operators.

Document-level tables (one row per document) flow from the readers through
tokenize, score and select into pack; pack turns them into fixed-length rows
(shard-format.md). Every operator names the columns it reads and adds with
these constants, never with string literals.
"""
import pyarrow as pa

# --- document rows (readers) ---------------------------------------------
ID = "id"                  # string, unique per document
TEXT = "text"              # string; null for SFT rows
PROMPT = "prompt"          # string; null for plain documents
RESPONSE = "response"      # string; null for plain documents
SOURCE = "source"          # string: the file (or dataset) the row came from
SOURCE_LINE = "source_line"  # int64: 1-based line (JSONL) or 0-based row index

DOC_SCHEMA = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(TEXT, pa.string()),
    pa.field(PROMPT, pa.string()),
    pa.field(RESPONSE, pa.string()),
    pa.field(SOURCE, pa.string(), nullable=False),
    pa.field(SOURCE_LINE, pa.int64(), nullable=False),
])

# --- tokenized documents (one row per document, variable length) ---------
INPUT_IDS = "input_ids"        # list<int32>: BOS? + tokens + EOS?
TARGET_MASK = "target_mask"    # list<uint8>: 1 where the token may be a target
LOSS_MASK = "loss_mask"        # list<uint8>: subset of target_mask after selection
TOKEN_SCORES = "token_scores"  # list<float32>: selection score, NaN where not scored
REF_LOSS = "ref_loss"          # list<float32>: history/reference model's loss (nats), NaN where not a target
NUM_TOKENS = "num_tokens"      # int32

TOKENIZED_SCHEMA = pa.schema([
    pa.field(ID, pa.string(), nullable=False),
    pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
    pa.field(TARGET_MASK, pa.list_(pa.uint8()), nullable=False),
    pa.field(NUM_TOKENS, pa.int32(), nullable=False),
])

# --- dedup and decontamination (operators/minhash.py, dedup_graph.py, decontam.py) ---
ORDER_KEY = "order_key"        # int64, unique and sortable: (part index << 32) | row; lowest is kept
HASH_HI = "hash_hi"            # uint64: high half of the 128-bit normalised-text hash
HASH_LO = "hash_lo"            # uint64: low half (also picks the shuffle bucket)
BAND = "band"                  # uint16: LSH band index
BAND_HASH = "band_hash"        # uint64: hash of one band of a MinHash signature
SIGNATURE = "signature"        # fixed_size_list<uint32>[num_perm]
KEY_A = "key_a"                # int64: the lower order key of a candidate pair
KEY_B = "key_b"                # int64: the higher one
DUPLICATE_OF = "duplicate_of"  # string: id of the kept document a removed one duplicates
DUPLICATE_OF_KEY = "duplicate_of_key"  # int64: its order key
SIMILARITY = "similarity"      # float32: estimated Jaccard (1.0 exact); decontam: eval n-gram coverage
METHOD = "method"              # string: exact | near | decontaminate
EVAL_SOURCE = "eval_source"    # string: the eval set (its `source`) a removed document overlaps
EVAL_ID = "eval_id"            # string: the eval row
NGRAM = "ngram"                # string: the first shared n-gram, normalised words

# --- embeddings and clusters ---------------------------------------------
EMBEDDING = "embedding"    # fixed_size_list<float32>[dim], L2-normalised
CLUSTER_ID = "cluster_id"  # int32
DOMAIN_ID = "domain_id"    # int32; null when the document's cluster was pruned
QUALITY = "quality"        # float32 quality score on a 0-5 scale

# --- packed rows (shard-format.md, version 1) ------------------------------
POSITION_IDS = "position_ids"
DOC_IDS = "doc_ids"
DOC_OFFSETS = "doc_offsets"
DOC_TOKEN_STARTS = "doc_token_starts"
DOMAIN_IDS = "domain_ids"


def shard_schema(seq_len: int, with_scores: bool = False, with_domains: bool = False,
                 with_ref_loss: bool = False) -> pa.Schema:
    """Schema of one training shard: every fixed-size list has `seq_len` items."""
    fields = [
        pa.field(INPUT_IDS, pa.list_(pa.int32(), seq_len), nullable=False),
        pa.field(TARGET_MASK, pa.list_(pa.uint8(), seq_len), nullable=False),
        pa.field(LOSS_MASK, pa.list_(pa.uint8(), seq_len), nullable=False),
        pa.field(POSITION_IDS, pa.list_(pa.int32(), seq_len), nullable=False),
        pa.field(DOC_IDS, pa.list_(pa.string()), nullable=False),
        pa.field(DOC_OFFSETS, pa.list_(pa.int32()), nullable=False),
        pa.field(DOC_TOKEN_STARTS, pa.list_(pa.int32()), nullable=False),
        pa.field(NUM_TOKENS, pa.int32(), nullable=False),
    ]
    if with_scores:
        fields.append(pa.field(TOKEN_SCORES, pa.list_(pa.float16(), seq_len)))
    if with_ref_loss:
        fields.append(pa.field(REF_LOSS, pa.list_(pa.float32(), seq_len)))
    if with_domains:
        fields.append(pa.field(DOMAIN_IDS, pa.list_(pa.int32())))
    return pa.schema(fields)
