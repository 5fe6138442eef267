"""Strict JSON for every file a run writes: no bare `NaN` or `Infinity`.

JSON (RFC 8259) has no NaN and no infinities. Python's `json` writes them as
bare `NaN` / `Infinity`, which strict readers (jq, JavaScript's JSON.parse,
pandas' ujson engine) reject. Every writer of a run's files (metrics.jsonl,
config.json, annotation snapshots and logs, query files, the MMCSAL picks,
the sweep report's JSON) goes through `dumps`, which writes a non-finite
float as `null`: a metric that is undefined at that point (e.g.
`pseudo_label/margin_correct` before any pseudo-label is correct) or
infinite reads back as `None`. Rows are passed through `finite_or_none` when
they are made, so the row in memory, in the checkpoint's meta and in
metrics.jsonl are equal and a resume compares them unchanged.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite_or_none(obj: Any) -> Any:
  """`obj` with every non-finite float replaced by None, recursively.

  Dicts, lists and tuples (as lists) are rebuilt; numpy scalars become
  Python scalars (so `json` can write them). Cost: one walk over `obj`.
  """
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """`json.dumps` of `finite_or_none(obj)`, refusing anything non-strict.

  `kwargs` go to `json.dumps` (indent, sort_keys, ...).
  """
  return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def _reject(name: str):
  raise ValueError(f"{name} is not JSON (RFC 8259)")


def loads(text: str) -> Any:
  """`json.loads` that raises ValueError on bare NaN / Infinity / -Infinity."""
  return json.loads(text, parse_constant=_reject)
