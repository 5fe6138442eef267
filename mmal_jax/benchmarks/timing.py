"""Timing helpers shared by the benchmarks (no command-line flags here, so
any benchmark module may import it).

Every timed comparison interleaves its contenders (A B C A B C ...) after
one untimed warm-up call each, repeats, and reports the median and min-max
spread; ratios are taken within each repeat.
"""
from __future__ import annotations

import statistics
import time

import jax


def interleaved(contenders: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds of each contender (a no-argument callable) per repeat, run
  A B C A B C ... after one untimed warm-up call each (compilation)."""
  for fn in contenders.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, fn in contenders.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def stats(values) -> dict:
  """{"median", "min", "max"} of `values`."""
  return {"median": statistics.median(values), "min": min(values),
          "max": max(values)}


def ratios(a, b) -> dict:
  """`stats` of a / b within each repeat."""
  return stats([x / y for x, y in zip(a, b)])


def fmt(s: dict, scale=1.0, digits=1) -> str:
  """"median [min, max]" of a `stats` dict, times `scale`."""
  return (f"{s['median'] * scale:.{digits}f} "
          f"[{s['min'] * scale:.{digits}f}, {s['max'] * scale:.{digits}f}]")


def target(name: str, value: float | None, ok: bool | None, unit=""):
  """Prints one target's verdict (PASS / MISS, SKIP without a verdict) and
  value; returns its record."""
  verdict = "SKIP" if ok is None else "PASS" if ok else "MISS"
  shown = "-" if value is None else f"{value:.3g}{unit}"
  print(f"  [{verdict}] {name}: {shown}", flush=True)
  return {"target": name, "value": value, "verdict": verdict}


def resident_bytes(field: str) -> int | None:
  """`field` of /proc/self/status (VmRSS: resident set, VmHWM: its peak) in
  bytes; None where there is no /proc (not Linux)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None
