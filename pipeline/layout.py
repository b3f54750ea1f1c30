"""The run directory: where every stage keeps its files, markers and quarantine.

    run_dir/
      config.yaml, config.sha256   the resolved config and the hash that ties the run_dir to it
      <stage>/parts/<part>.arrow   intermediate document tables (lz4 Arrow IPC)
      <stage>/done/<item>.json     one marker per finished item: its counts and outputs
      <stage>/_SUCCESS.json        written last, once every item is done and the counts balance
      quarantine/<stage>-<item>.jsonl   rejected rows with source location and reason
      shards/<tokenizer>/          the product (shard-format.md)
      _removed.json                part directories removed once no later stage reads them

Commit protocol: every file is written to a temporary name and renamed into place
(`storage.write_atomic`; copy-then-marker on object stores), an item's marker only after its
outputs, a stage's marker only after every item's. A re-run skips what its markers say is done,
so a killed run resumes to byte-identical shards. Markers carry a sha256 of their own body
(`_sha256`): a marker that does not parse or does not match reads as missing. What each item
committed (sizes, sha256) is checked before a re-run skips it (pipeline/integrity.py).
Nothing here imports ray or a stage module.
"""
from __future__ import annotations

import hashlib
import json

from operators import schema as S
from pipeline import storage

INTERMEDIATE_COMPRESSION = "lz4"  # parts between stages: fast, not the product


class RunLayout:
    """Paths inside one run_dir. Stage names may be nested (`tokenize/gpt2`)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def path(self, *parts: str) -> str:
        """A path inside run_dir. Names come from code and validated config (item names, tokenizer
        names), never from input rows; still, a part that could leave run_dir is refused."""
        for part in parts:
            if part.startswith(("/", "\\")) or ".." in part.replace("\\", "/").split("/"):
                raise ValueError(f"{part!r} would name a path outside run_dir {self.run_dir}")
        return storage.join(self.run_dir, *parts)

    def stage_dir(self, stage: str) -> str:
        return self.path(*stage.split("/"))

    def done_dir(self, stage: str) -> str:
        return self.path(*stage.split("/"), "done")

    def done_marker(self, stage: str, item: str) -> str:
        return self.path(*stage.split("/"), "done", f"{item}.json")

    def stage_marker(self, stage: str) -> str:
        return self.path(*stage.split("/"), "_SUCCESS.json")

    def part(self, stage: str, name: str) -> str:
        return self.path(*stage.split("/"), "parts", f"{name}.arrow")

    def shard_dir(self, tokenizer: str) -> str:
        return self.path("shards", tokenizer)

    def quarantine(self, name: str) -> str:
        return self.path("quarantine", f"{name}.jsonl")

    # -- markers -----------------------------------------------------------------------------

    def done_items(self, stage: str) -> set[str]:
        """Names of the items of a stage whose marker exists."""
        return {n[:-5] for n in storage.listdir(self.done_dir(stage)) if n.endswith(".json")}

    def stage_summary(self, stage: str) -> dict | None:
        """The stage's `_SUCCESS.json`, or None while the stage is not complete (or its marker is damaged)."""
        marker = self.stage_marker(stage)
        if not storage.exists(marker):
            return None
        try:
            return read_marker(marker)
        except DamagedMarker:
            return None

    # -- intermediate parts removed by design ------------------------------------------------

    def removed_record(self) -> dict[str, dict]:
        """Part directories (relative to run_dir) removed once no later stage read them:
        {dir: {"producers": [[stage, item], ...], "consumers": [stage, ...]}} (pipeline/integrity.py)."""
        path = self.path("_removed.json")
        if not storage.exists(path):
            return {}
        try:
            record = json.loads(storage.read_text(path))["removed"]
        except (ValueError, KeyError, TypeError):
            return {}
        return record if isinstance(record, dict) else {}

    def write_removed_record(self, record: dict[str, dict]) -> None:
        storage.write_text_atomic(self.path("_removed.json"), json.dumps({"removed": record}, sort_keys=True) + "\n")

    def write_quarantine(self, name: str, records: list[dict]) -> None:
        """One JSON object per rejected row; nothing is written when there are none."""
        if records:
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            storage.write_text_atomic(self.quarantine(name), body)


class DamagedMarker(ValueError):
    """A marker that does not parse, or whose body does not match its own sha256."""


class StageError(RuntimeError):
    """A stage failed for a reason the user can act on (a full disk, a refusing object store):
    the message names the stage, the item and the path."""


def _body_sha256(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_marker(path: str, body: dict) -> None:
    body = {k: v for k, v in body.items() if k != "_sha256"}
    storage.write_text_atomic(path, json.dumps({**body, "_sha256": _body_sha256(body)}, sort_keys=True) + "\n")


def read_marker(path: str) -> dict:
    """The marker's body; DamagedMarker when it does not parse or its `_sha256` does not match."""
    try:
        body = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedMarker(f"{path}: not a marker ({e})") from None
    if not isinstance(body, dict):
        raise DamagedMarker(f"{path}: not a marker (a JSON {type(body).__name__})")
    seal = body.pop("_sha256", None)
    if seal is not None and seal != _body_sha256(body):
        raise DamagedMarker(f"{path}: its content does not match its sha256")
    return body


def reason_key(reason: str) -> str:
    """Group quarantine reasons for counting: the text before the first detail."""
    return reason.split(":")[0].split(" at ")[0]


def assignment_path(layout: RunLayout, part: str) -> str:
    """Cluster and domain of each document of a part (cluster/assign writes it)."""
    return layout.path("cluster", "assignments", f"{part}.parquet")


def read_domain_columns(layout: RunLayout, part: str) -> dict:
    """cluster_id and domain_id of a part's documents, in the part's row order."""
    import pyarrow.parquet as pq
    with storage.open_random_access(assignment_path(layout, part)) as f:
        t = pq.read_table(f)
    return {S.CLUSTER_ID: t.column(S.CLUSTER_ID), S.DOMAIN_ID: t.column(S.DOMAIN_ID)}


def load_domains(layout: RunLayout):
    """(domain id, tokens) per document in corpus order, as the mixture search saved them."""
    import io

    import numpy as np
    z = np.load(io.BytesIO(storage.read_bytes(layout.path("mixture", "data", "domains.npz"))))
    return z["domain_ids"], z["num_tokens"]


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory."""


def acquire_lock(layout: RunLayout) -> str:
    """Claim `run_dir/_LOCK` for this process ({host, pid}); returns the lock path.

    A lock held by a live process on this host, or by any process on another host, refuses the
    run, naming the holder. A lock left by a dead process on this host is taken over: the new
    lock is written to a temporary name and renamed over the stale one, and a concurrent taker
    loses the re-read check below."""
    import os
    import socket
    path, me = layout.path("_LOCK"), {"host": socket.gethostname(), "pid": os.getpid()}
    if storage.exists(path):
        try:
            holder = json.loads(storage.read_text(path))
        except (ValueError, FileNotFoundError):
            holder = {}
        if holder and holder != me:
            if holder.get("host") != me["host"] or _alive(holder.get("pid", -1)):
                raise RunDirInUse(f"run_dir {layout.run_dir} is in use by pid {holder.get('pid')} on host "
                                  f"{holder.get('host')} (lock {path}); wait for it, or delete the lock if that "
                                  f"process is gone")
    storage.write_text_atomic(path, json.dumps(me))
    if json.loads(storage.read_text(path)) != me:
        raise RunDirInUse(f"run_dir {layout.run_dir} was claimed by another process at the same time ({path})")
    return path


def release_lock(layout: RunLayout) -> None:
    import os
    import socket
    path = layout.path("_LOCK")
    try:
        if json.loads(storage.read_text(path)) == {"host": socket.gethostname(), "pid": os.getpid()}:
            storage.remove(path)
    except (FileNotFoundError, ValueError):
        pass


def _alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
