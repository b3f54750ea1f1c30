"""Where each number on the report comes from: a file of the run and a key path into it.

Every number the report shows is a `ref`: `{"v": value, "src": "<file under run_dir>", "key": "<path>"}`.
The page writes `src` and `key` next to the number (`data-src`, `data-key`), so a reader (and
tests/unit/test_report.py, with its own resolver) can check it against the file itself.

Key paths, evaluated on the parsed JSON file:

    rows_in                           a key
    counts.tokens  weights.3          nested keys; a list index or a dict key such as "3"
    items.*.tokens                    `*`: every element of a list (or value of a dict)
    history[round=1].target_loss      `[k=v]`: the elements of a list whose `k` equals v
    shards[:4].rows                   `[:n]`: the first n elements of a list
    sum:items.*.tokens                sum | min | max | mean | count over the values found
    sum:items.*.tokens / seconds      the ratio of two such paths (rates, fractions)

A path without an aggregate must find exactly one value; a missing key raises KeyError.
"""
from __future__ import annotations

import re

AGGREGATES = ("sum", "min", "max", "mean", "count")
_FILTER = re.compile(r"^(?P<name>[^\[]+)\[(?P<k>[^=\]:]+)=(?P<v>[^\]]*)\]$")
_SLICE = re.compile(r"^(?P<name>[^\[]+)\[:(?P<n>\d+)\]$")


def _walk(node, parts: list[str]):
    if not parts:
        yield node
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        for child in (node.values() if isinstance(node, dict) else node):
            yield from _walk(child, rest)
        return
    m = _SLICE.match(head)
    if m:
        for child in _child(node, m["name"])[:int(m["n"])]:
            yield from _walk(child, rest)
        return
    m = _FILTER.match(head)
    if m:
        for child in _child(node, m["name"]):
            if str(child.get(m["k"])) == m["v"]:
                yield from _walk(child, rest)
        return
    yield from _walk(_child(node, head), rest)


def _child(node, key: str):
    if isinstance(node, dict):
        return node[key]
    if isinstance(node, list) and key.lstrip("-").isdigit():
        return node[int(key)]
    raise KeyError(key)


def _single(doc, path: str):
    agg, sep, rest = path.partition(":")
    if sep and agg in AGGREGATES:
        values = list(_walk(doc, rest.split(".")))
        if agg == "count":
            return len(values)
        if agg == "sum":
            return sum(values)
        if not values:
            raise KeyError(f"{path}: nothing to aggregate")
        return {"min": min, "max": max}[agg](values) if agg != "mean" else sum(values) / len(values)
    values = list(_walk(doc, path.split(".")))
    if len(values) != 1:
        raise KeyError(f"{path}: {len(values)} values, expected one")
    return values[0]


def resolve(doc, key: str):
    """The value `key` names in `doc` (see the module docstring); KeyError when it is absent."""
    if " / " in key:
        num, den = key.split(" / ", 1)
        d = _single(doc, den)
        return _single(doc, num) / d if d else None
    return _single(doc, key)


def ref(doc, src: str, key: str) -> dict | None:
    """A number with its provenance, or None when the file lacks the key."""
    if doc is None:
        return None
    try:
        v = resolve(doc, key)
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return {"v": v, "src": src, "key": key}


def value(r: dict | None, default=None):
    return default if r is None else r["v"]
