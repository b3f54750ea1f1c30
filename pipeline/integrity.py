"""A re-run verifies what it skips, and recomputes what is damaged.

Every item marker `<stage>/done/<item>.json` carries `data.commit` (pipeline/executor.py):
`outputs`, each file the item committed under run_dir with its bytes and sha256, and
`inputs`, the run_dir files it read. Before any stage runs, `verify_run_dir(layout)`:

1. lists run_dir once (sizes) and reads every item and stage marker; a marker that does not
   parse, or whose own `_sha256` does not match its body, is deleted: it reads as missing;
2. checks every recorded output: present, with its size (always) and its sha256 (local disks
   only: sha256 runs at 680 MB/s per core on this 2-core machine, about 1.5 s per GB of run_dir on a
   re-run; on an object store the check would download every object, so there it is size only);
   an output in a part directory removed by design (`_removed.json`) is not damage;
3. an item with a damaged output loses its marker and its stage's `_SUCCESS.json`, so the
   stage re-runs that item. An input of that item that is gone (removed by design, or
   damaged) has the item that produced it invalidated the same way, transitively;
4. a part directory removed by design is produced again when a stage that read it is no
   longer complete (its `_SUCCESS.json` deleted by hand, or by step 3): its producer items are
   invalidated, transitively. So deleting `mix/` of a finished run recomputes mix from
   re-made tokenize parts (and those from re-made read parts); `keep_intermediate: true`
   makes such a resume cheaper at the cost of the disk.

`remove_intermediates(layout, stages)` is the other half: it records, for each part directory
it removes, the items that wrote it and the stages whose items read it (from the markers),
before deleting it.

Outputs are a pure function of the config and the inputs (that is what makes a resume
byte-identical), so a recomputed item writes the same bytes, and the items downstream of it
that verified are left alone. Shards are covered by the records of the items that wrote them
(and the manifest, rewritten from those records at the end of every run).

Not covered: files the driver writes outside items (config.yaml, cluster/clusters.json,
mixture/state.json and mixture.json, mix/plan.*): delete one to have it recomputed. Markers
written before commits were recorded are trusted as they are.
"""
from __future__ import annotations

import dataclasses
import time

from pipeline import storage
from pipeline.layout import DamagedMarker, RunLayout, read_marker


@dataclasses.dataclass
class Verification:
    items: int = 0                  # item markers read
    files: int = 0                  # recorded outputs checked
    bytes_hashed: int = 0           # bytes read back for sha256
    seconds: float = 0.0
    damaged_markers: list[str] = dataclasses.field(default_factory=list)   # run_dir-relative paths deleted
    invalidated: dict[str, str] = dataclasses.field(default_factory=dict)  # "<stage>/<item>" -> why

    def line(self) -> str:
        text = (f"verified {self.items} finished items: {self.files} files, "
                f"{self.bytes_hashed / 1e6:,.1f} MB hashed in {self.seconds:.1f}s")
        if self.damaged_markers:
            text += f"; {len(self.damaged_markers)} damaged marker(s) dropped"
        if self.invalidated:
            shown = "; ".join(f"{k}: {v}" for k, v in list(self.invalidated.items())[:5])
            more = f" (+{len(self.invalidated) - 5} more)" if len(self.invalidated) > 5 else ""
            text += f"; recomputing {len(self.invalidated)} item(s): {shown}{more}"
        return text


def _marker_key(rel: str) -> tuple[str, str] | None:
    """(stage, item) of an item marker's run_dir-relative path, else None."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[-2] == "done" and parts[-1].endswith(".json") and not parts[-1].startswith("."):
        return "/".join(parts[:-2]), parts[-1][:-len(".json")]
    return None


def _under(rel: str, dirs) -> bool:
    return any(rel.startswith(d + "/") for d in dirs)


def _all_markers(layout: RunLayout, sizes: dict[str, int]) -> dict[tuple[str, str], dict]:
    markers = {}
    for rel in sizes:
        key = _marker_key(rel)
        if key is not None:
            try:
                markers[key] = read_marker(layout.path(*rel.split("/")))
            except DamagedMarker:
                continue
    return markers


def _commit(body: dict) -> dict:
    data = body.get("data")
    return data.get("commit", {}) if isinstance(data, dict) else {}


def remove_intermediates(layout: RunLayout, stages: set[str]) -> list[str]:
    """Delete `<stage>/parts/` of each stage after recording who wrote and who read it in
    `_removed.json`; returns the directories removed."""
    dirs = sorted(f"{s}/parts" for s in stages if storage.listdir(layout.path(*s.split("/"), "parts")))
    if not dirs:
        return []
    markers = _all_markers(layout, storage.file_sizes(layout.run_dir))
    record = layout.removed_record()
    for d in dirs:
        record[d] = {
            "producers": sorted([list(k) for k, body in markers.items() if _under_any(_commit(body).get("outputs", {}), d)]),
            "consumers": sorted({k[0] for k, body in markers.items() if _under_any(_commit(body).get("inputs", []), d)}),
        }
    layout.write_removed_record(record)  # before deleting: a crash in between leaves no unexplained loss
    for d in dirs:
        storage.remove_tree(layout.path(*d.split("/")))
    return dirs


def _under_any(paths, d: str) -> bool:
    return any(p.startswith(d + "/") for p in paths)


def verify_run_dir(layout: RunLayout, check_sha256: bool | None = None) -> Verification:
    """Verify every finished item's recorded outputs; drop the markers of damaged items, of the
    producers of their lost inputs, and of the producers of removed parts that an incomplete
    stage needs again, so the stages recompute them. See the module docstring."""
    t0 = time.time()
    report = Verification()
    if check_sha256 is None:
        check_sha256 = not storage.is_uri(layout.run_dir)
    sizes = storage.file_sizes(layout.run_dir)
    removed = layout.removed_record()

    def drop(rel: str) -> None:
        storage.remove(layout.path(*rel.split("/")))
        sizes.pop(rel, None)

    markers: dict[tuple[str, str], dict] = {}
    for rel in sorted(sizes):
        key = _marker_key(rel)
        if key is None and not rel.endswith("/_SUCCESS.json"):
            continue
        try:
            body = read_marker(layout.path(*rel.split("/")))
        except DamagedMarker:
            report.damaged_markers.append(rel)
            drop(rel)
            if key is not None and f"{key[0]}/_SUCCESS.json" in sizes:  # the item is not done: nor its stage
                drop(f"{key[0]}/_SUCCESS.json")
            continue
        if key is not None:
            markers[key] = body

    producer = {rel: key for key in markers for rel in _commit(markers[key]).get("outputs", {})}
    bad: dict[tuple[str, str], str] = {}
    for key in markers:
        report.items += 1
        for rel, rec in _commit(markers[key]).get("outputs", {}).items():
            report.files += 1
            size = sizes.get(rel)
            if size is None:
                if not _under(rel, removed):
                    bad[key] = f"{rel} is missing"
                    break
                continue
            if size != rec["bytes"]:
                bad[key] = f"{rel} has {size:,} bytes, its marker says {rec['bytes']:,}"
                break
            if check_sha256:
                report.bytes_hashed += size
                if storage.sha256_file(layout.path(*rel.split("/"))) != rec["sha256"]:
                    bad[key] = f"{rel} does not match its sha256"
                    break

    def complete(stage: str) -> bool:
        return f"{stage}/_SUCCESS.json" in sizes and not any(k[0] == stage for k in bad)

    changed = True
    while changed:
        changed = False
        # A damaged item re-runs; an input it needs that is gone must be produced again first.
        for key in list(bad):
            for rel in _commit(markers[key]).get("inputs", []):
                source = producer.get(rel)
                if rel not in sizes and source is not None and source not in bad:
                    bad[source] = f"{rel} is needed again by {key[0]}/{key[1]}"
                    changed = True
        # A removed part directory that an incomplete stage read is produced again.
        for d, info in removed.items():
            waiting = [c for c in info.get("consumers", []) if not complete(c)]
            if not waiting or _under_any(sizes, d):
                continue
            for stage, item in info.get("producers", []):
                if (stage, item) in markers and (stage, item) not in bad:
                    bad[(stage, item)] = f"{d} (removed) is needed again by {waiting[0]}"
                    changed = True

    for (stage, item), why in bad.items():
        storage.remove(layout.done_marker(stage, item))
        if storage.exists(layout.stage_marker(stage)):
            storage.remove(layout.stage_marker(stage))
        report.invalidated[f"{stage}/{item}"] = why
    report.seconds = time.time() - t0
    return report
