"""Shared fixtures: real tokenizers trained here (no downloads), shared data, a local Ray."""
from __future__ import annotations

import io
import json
import os
import pathlib

import pytest
import zstandard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FASTOKENS_BPE_THREADS", "1")   # one encoding thread per process, as the workers run (pipeline/executor.py)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def shared_rows(name: str, limit: int | None = None) -> list[dict]:
    """The first `limit` rows of a shared data file (JSON Lines, zstd)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    rows = []
    with open(path, "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def write_jsonl_zst(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


@pytest.fixture(scope="session")
def training_texts() -> list[str]:
    rows = shared_rows("news_agnews_5k.jsonl.zst", 2000) + shared_rows("code_python_thealgorithms.jsonl.zst", 100)
    return [r["text"] for r in rows]


@pytest.fixture(scope="session")
def hf_bpe_dir(tmp_path_factory, training_texts) -> pathlib.Path:
    """A byte-level BPE tokenizer directory with special tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok.train_from_iterator(training_texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("hf_bpe")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<pad>", "chat_template": CHATML}))
    return d


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, training_texts) -> pathlib.Path:
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("sp")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_texts), model_writer=buf, vocab_size=1000,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=3, minloglevel=2, num_threads=1)
    (d / "sp.model").write_bytes(buf.getvalue())
    return d / "sp.model"


@pytest.fixture(scope="session")
def local_ray():
    """One real local Ray for every integration test in the session."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.executor import init_ray
    os.environ.pop("RAY_ADDRESS", None)   # a fresh local cluster, never one the environment names
    init_ray(RayConfig(num_cpus=2))        # as `tokenmill run` starts it
    yield ray
    ray.shutdown()
