"""Device-time profiles of a benchmark's contenders: what limits a MISS.

`capture(fn)` traces a few calls of an already compiled `fn` with
`jax.profiler` and returns the trace as Perfetto writes it (Chrome's JSON
trace format, gzipped: open it at ui.perfetto.dev). `summarize(trace)`
reads it back with nothing but `json`: per lane of the trace (a GPU
stream, a TPU core's op line, a thread of the CPU client) the time it was
busy, as a share of the traced wall time, and the ops that took most of it.
A kernel at its limit keeps one lane busy with its own ops; a busiest lane
at 40% says the device waited (on launches, the host, transfers), and ops
named like copies or reductions beside the product say where the rest
went. The summary is a measurement of the run at hand, never a model.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
import time
from typing import Any, Callable

import jax

from mmal_jax import fs

# The thread that runs Python: its events are the caller's, not the work.
_CALLER_THREADS = ("python",)


def capture(fn: Callable[[], Any], calls: int = 3) -> tuple[bytes, float]:
  """Traces `calls` calls of `fn` (compiled already: call it once before),
  each waited for. Returns (the gzipped Perfetto trace, seconds of wall
  time the calls took). Cost: the calls plus writing the trace (tens of
  milliseconds; its size grows with the kernel launches, not the data)."""
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(fn())
      seconds = time.perf_counter() - start
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                      recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no Perfetto trace in {log_dir}")
    with open(paths[0], "rb") as f:
      return f.read(), seconds


def _events(trace: bytes) -> list[dict]:
  data = json.loads(gzip.decompress(trace))
  return data["traceEvents"] if isinstance(data, dict) else data


def _union_us(intervals: list[tuple[float, float, str]]) -> float:
  """Length of the union of the [start, end) intervals (nested ops count
  once)."""
  total, reach = 0.0, float("-inf")
  for start, end, _ in sorted(intervals):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def _self_us(intervals: list[tuple[float, float, str]]
             ) -> dict[str, list[float]]:
  """name -> [self time, count] over one lane's (start, end, name) events:
  an event's time less its nested events' (a module's time is not counted
  again as its ops')."""
  out = collections.defaultdict(lambda: [0.0, 0])
  stack = []  # [end, name, time of direct children]

  def close(frame):
    end, name, children, start = frame
    out[name][0] += max(0.0, end - start - children)
    out[name][1] += 1

  for start, end, name in sorted(intervals, key=lambda e: (e[0], -e[1])):
    while stack and start >= stack[-1][0]:
      close(stack.pop())
    if stack:
      stack[-1][2] += min(end, stack[-1][0]) - start
    stack.append([end, name, 0.0, start])
  while stack:
    close(stack.pop())
  return out


def summarize(trace: bytes, wall_s: float, top_lanes: int = 3,
              top_ops: int = 6) -> dict:
  """The busiest lanes of `trace` (a `capture`) and their top ops.

  Lanes are the device processes' threads ("/device:..." : GPU streams, TPU
  op lines) when the trace has any, else the host's threads but the
  Python caller's (the CPU client runs the work). Returns {"wall_ms",
  "lanes": [{"lane", "busy_ms", "busy_fraction" (of `wall_s`), "ops":
  [{"name", "ms" (self time: less its nested ops'), "count", "share" (of
  the lane's busy time)}]}]}, lanes by busy time. Cost: one sort of the
  trace's events.
  """
  events = _events(trace)
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  on_device = any(name.startswith("/device:") for name in processes.values())

  def lane_of(e):
    process = processes.get(e["pid"], str(e["pid"]))
    thread = threads.get((e["pid"], e["tid"]), str(e["tid"]))
    if on_device != process.startswith("/device:"):
      return None
    if not on_device and thread in _CALLER_THREADS:
      return None
    return f"{process} {thread}"

  spans = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or not e.get("dur"):
      continue
    lane = lane_of(e)
    if lane is not None:
      start = float(e["ts"])
      spans[lane].append((start, start + float(e["dur"]), e.get("name", "?")))
  wall_us = wall_s * 1e6
  lanes = []
  for lane, intervals in spans.items():
    busy = _union_us(intervals)
    by_time = sorted(_self_us(intervals).items(),
                     key=lambda kv: -kv[1][0])[:top_ops]
    lanes.append({
        "lane": lane, "busy_ms": busy / 1e3,
        "busy_fraction": busy / wall_us if wall_us else None,
        "ops": [{"name": name, "ms": us / 1e3, "count": count,
                 "share": us / busy if busy else None}
                for name, (us, count) in by_time]})
  lanes.sort(key=lambda lane: -lane["busy_ms"])
  return {"wall_ms": wall_s * 1e3, "lanes": lanes[:top_lanes]}


def record(contenders: dict[str, Callable[[], Any]],
           profile_dir: str | None) -> dict:
  """With `profile_dir` (local or gs://), a `capture` of each contender
  (compiled already), written to PROFILE_DIR/NAME.trace.json.gz, and its
  `summarize`, printed as one `describe` line each: name -> summary, or
  {"error": ...} where the profiler cannot trace here (no CUPTI, say: said,
  and the benchmark goes on). Without: {}."""
  if profile_dir is None:
    return {}
  out = {}
  for name, fn in contenders.items():
    try:
      trace, seconds = capture(fn)
    except Exception as e:  # pylint: disable=broad-except
      out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(f"  profile {name} failed: {out[name]['error']}", flush=True)
      continue
    fs.write_bytes(os.path.join(profile_dir, f"{name}.trace.json.gz"), trace)
    out[name] = summarize(trace, seconds)
    print(f"  profile {describe(name, out[name])}", flush=True)
  return out


def describe(name: str, summary: dict) -> str:
  """One line of `summarize`'s busiest lane: its busy share of the wall
  time and its top ops' shares, e.g. `top2_margin: /device:GPU:0 Stream #14
  busy 93% of 12.1 ms; fusion.3 71%, loop_reduce 20%`."""
  if not summary["lanes"]:
    return f"{name}: no device or client ops in the trace"
  lane = summary["lanes"][0]
  ops = ", ".join(f"{op['name'][:48]} {op['share']:.0%}"
                  for op in lane["ops"][:3] if op["share"] is not None)
  busy = lane["busy_fraction"]
  busy = "?" if busy is None else f"{busy:.0%}"
  return (f"{name}: {lane['lane']} busy {busy} of {summary['wall_ms']:.3g} "
          f"ms; {ops}")
