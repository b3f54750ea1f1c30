"""Tokenize documents: DOC_SCHEMA rows -> TOKENIZED_SCHEMA rows.

Plain documents: `[BOS] + encode(text) + [EOS]`; target_mask is 1 on every
token but the first (nothing precedes it to predict it from).

SFT rows: the tokenizer's chat template when it has one (or the config's
`chat_template`), else the default template documented in DEFAULT_SFT_TEMPLATE.
target_mask is 1 exactly on the response tokens, including the tokens that
close the assistant turn and the EOS, 0 on the prompt and template markup.

Chat templates are rendered with sentinel strings in place of the message
contents, so template markup is encoded with its special tokens while the
contents are encoded as text (a prompt that contains "<|im_start|>" stays text).
"""
from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from operators import schema as S
from operators.base import Operator
from operators.tokenizers import LoadedTokenizer, load_tokenizer

DEFAULT_SFT_TEMPLATE = "[BOS] encode(prompt + '\\n\\n') + encode(response) [EOS]; targets: the response and EOS"

_PROMPT_SENTINEL = "\ue000TOKENMILL_PROMPT\ue001"
_RESPONSE_SENTINEL = "\ue000TOKENMILL_RESPONSE\ue001"


class ChatTemplate:
    """A Jinja chat template split into markup around the two message contents."""

    def __init__(self, template: str, tok: LoadedTokenizer):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        rendered = env.from_string(template).render(
            messages=[{"role": "user", "content": _PROMPT_SENTINEL},
                      {"role": "assistant", "content": _RESPONSE_SENTINEL}],
            add_generation_prompt=False, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        if rendered.count(_PROMPT_SENTINEL) != 1 or rendered.count(_RESPONSE_SENTINEL) != 1 \
                or rendered.index(_PROMPT_SENTINEL) > rendered.index(_RESPONSE_SENTINEL):
            raise ValueError("the chat template must render the user message and then the assistant "
                             "message verbatim, once each")
        pre, rest = rendered.split(_PROMPT_SENTINEL)
        mid, post = rest.split(_RESPONSE_SENTINEL)
        self.pre, self.mid, self.post = (tok.encode_markup(x) if x else [] for x in (pre, mid, post))


def _first_zero_mask(n: int) -> np.ndarray:
    m = np.ones(n, np.uint8)
    if n:
        m[0] = 0
    return m


class Tokenize(Operator):
    reads = (S.ID, S.TEXT, S.PROMPT, S.RESPONSE)
    adds = (S.INPUT_IDS, S.TARGET_MASK, S.NUM_TOKENS)

    def __init__(self, *, spec: str, add_bos: bool | None = None, add_eos: bool = True,
                 chat_template: str | None = None, read_bytes=None, exists=None, encoder: str = "auto",
                 trusted: tuple[str, ...] = ()):
        self.spec, self.add_bos_cfg, self.add_eos = spec, add_bos, add_eos
        self.chat_template_cfg = chat_template
        self.encoder = encoder   # auto: a verified fast BPE core when one applies; library: never
        self.trusted = trusted   # fast cores the run's driver verified (load_tokenizer)
        self._io = {k: v for k, v in (("read_bytes", read_bytes), ("exists", exists)) if v is not None}
        self.tok: LoadedTokenizer | None = None

    def setup(self) -> None:
        self.tok = load_tokenizer(self.spec, encoder=self.encoder, trusted=self.trusted, **self._io)
        self.add_bos = self.tok.default_add_bos if self.add_bos_cfg is None else self.add_bos_cfg
        if self.add_bos and self.tok.bos_id is None:
            raise ValueError(f"{self.spec}: add_bos is set but the tokenizer has no BOS token")
        if self.add_eos and self.tok.eos_id is None:
            raise ValueError(f"{self.spec}: add_eos is set but the tokenizer has no EOS token; set add_eos: false")
        template = self.chat_template_cfg or self.tok.chat_template
        self.template = ChatTemplate(template, self.tok) if template else None

    def describe(self) -> dict:
        """The manifest's tokenizer block (without the name)."""
        t = self.tok
        return {"spec": t.spec, "kind": t.kind, "vocab_size": t.vocab_size, "eos_id": t.eos_id, "pad_id": t.pad_id,
                "bos_id": t.bos_id if self.add_bos else None, "add_bos": self.add_bos, "add_eos": self.add_eos,
                "sha256": t.sha256, "encoder": t.encoder,
                **({"encoder_fallback_reason": t.fallback_reason} if t.fallback_reason else {}),
                "sft_template": "chat_template" if self.template else DEFAULT_SFT_TEMPLATE}

    # -- encoding ------------------------------------------------------------------

    def encode_plain(self, texts: list[str]) -> tuple[list[list[int]], list[np.ndarray]]:
        bos = [self.tok.bos_id] if self.add_bos else []
        eos = [self.tok.eos_id] if self.add_eos else []
        ids = [bos + x + eos for x in self.tok.encode_texts(texts)]
        return ids, [_first_zero_mask(len(x)) for x in ids]

    def encode_sft(self, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[np.ndarray]]:
        bos = [self.tok.bos_id] if self.add_bos else []
        eos = [self.tok.eos_id] if self.add_eos else []
        out_ids, out_masks = [], []
        if self.template is None:
            p_ids = self.tok.encode_texts([p + "\n\n" if p else "" for p in prompts])
            r_ids = self.tok.encode_texts(responses)
            for p, r in zip(p_ids, r_ids):
                head, tail = bos + p, r + eos
                out_ids.append(head + tail)
                out_masks.append(np.concatenate([np.zeros(len(head), np.uint8), np.ones(len(tail), np.uint8)]))
        else:
            t = self.template
            p_ids, r_ids = self.tok.encode_texts(prompts), self.tok.encode_texts(responses)
            for p, r in zip(p_ids, r_ids):
                head = t.pre + p + t.mid
                lead = bos if self.add_bos and (not head or head[0] != self.tok.bos_id) else []
                tail = r + t.post
                trail = eos if self.add_eos and (not tail or tail[-1] != self.tok.eos_id) else []
                ids = lead + head + tail + trail
                mask = np.zeros(len(ids), np.uint8)
                mask[len(lead) + len(head):] = 1
                out_ids.append(ids)
                out_masks.append(mask)
        for m in out_masks:
            if len(m):
                m[0] = 0
        return out_ids, out_masks

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.tokenize(table)

    def _tokenize_plain(self, table: pa.Table) -> pa.Table:
        """All-plain tables (the common case): one flat array, no per-document Python lists.

        Per-document list concatenation and mask arrays cost 3-4x the encoder itself on
        short documents (AG News); here BOS/EOS and the first-token mask are placed by index.
        """
        raw, raw_len = self.tok.encode_flat(table.column(S.TEXT).to_pylist())
        nb, ne = int(self.add_bos), int(self.add_eos)
        lengths = raw_len + nb + ne
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), np.int32)
        # The encoder's ids fill every slot but BOS/EOS: one boolean-mask store, 3x faster than
        # scattering them through an index array
        is_raw = np.ones(len(ids), bool)
        if nb:
            is_raw[offsets[:-1]] = False
        if ne:
            is_raw[offsets[1:] - 1] = False
        ids[is_raw] = raw
        if nb:
            ids[offsets[:-1]] = self.tok.bos_id
        if ne:
            ids[offsets[1:] - 1] = self.tok.eos_id
        mask = np.ones(len(ids), np.uint8)
        mask[offsets[:-1][lengths > 0]] = 0
        return flat_tokenized_table(table.column(S.ID), ids, mask, offsets, extra=_passthrough(table))

    def tokenize(self, table: pa.Table) -> pa.Table:
        """TOKENIZED_SCHEMA rows (+ domain_id / cluster_id when present), one per input row, in
        input order. Every row is encoded (any string encodes; the readers quarantine rows that
        have none), so nothing is rejected here."""
        n = table.num_rows
        if n and table.column(S.TEXT).null_count == 0:
            return self._tokenize_plain(table)
        texts = table.column(S.TEXT).to_pylist()
        is_sft = [t is None for t in texts]
        ids: list[list[int] | None] = [None] * n
        masks: list[np.ndarray | None] = [None] * n
        plain_idx = [i for i in range(n) if not is_sft[i]]
        sft_idx = [i for i in range(n) if is_sft[i]]
        if plain_idx:
            got_ids, got_masks = self.encode_plain([texts[i] for i in plain_idx])
            for i, a, m in zip(plain_idx, got_ids, got_masks):
                ids[i], masks[i] = a, m
        if sft_idx:
            prompts = table.column(S.PROMPT).take(sft_idx).to_pylist()
            responses = table.column(S.RESPONSE).take(sft_idx).to_pylist()
            got_ids, got_masks = self.encode_sft(prompts, responses)
            for i, a, m in zip(sft_idx, got_ids, got_masks):
                ids[i], masks[i] = a, m
        return tokenized_table(table.column(S.ID), ids, masks, extra=_passthrough(table))


def _passthrough(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    """Small per-document columns that later stages use (domains, scores)."""
    keep = (S.DOMAIN_ID, S.CLUSTER_ID)
    return {c: table.column(c) for c in keep if c in table.column_names}


def tokenized_table(ids_col, ids: list[list[int]], masks: list[np.ndarray], extra: dict | None = None) -> pa.Table:
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    flat_mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    return flat_tokenized_table(ids_col, flat_ids, flat_mask, offsets, extra)


def flat_tokenized_table(ids_col, flat_ids: np.ndarray, flat_mask: np.ndarray, offsets: np.ndarray,
                         extra: dict | None = None) -> pa.Table:
    """TOKENIZED_SCHEMA rows from flat token/mask arrays and document offsets [n + 1]."""
    offsets_arr = pa.array(offsets.astype(np.int32), pa.int32())
    cols = {
        S.ID: ids_col,
        S.INPUT_IDS: pa.ListArray.from_arrays(offsets_arr, pa.array(flat_ids, pa.int32())),
        S.TARGET_MASK: pa.ListArray.from_arrays(offsets_arr, pa.array(flat_mask, pa.uint8())),
        S.NUM_TOKENS: pa.array(np.diff(offsets).astype(np.int32), pa.int32()),
    }
    cols.update(extra or {})
    return pa.table(cols)
