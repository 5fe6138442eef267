"""Results of a multi-strategy run: Markdown table, AL curves, annotation savings.

Reads the rows of `WORKDIR/metrics.jsonl` (one per strategy, seed and round)
and writes `WORKDIR/results.md` and `WORKDIR/al_curves.png`.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable, Sequence

from absl import logging
import numpy as np

from mmal_jax import fs

# Bookkeeping columns of a metrics row; every other number is a metric.
ROW_KEYS = ("strategy", "seed", "round", "queries", "pairs", "percent",
            "embed_s", "acquire_s", "train_s", "train_steps", "eval_s",
            "modality_counts")


class MetricsFileError(ValueError):
  """metrics.jsonl holds a line that is not a metrics row (not the last)."""


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl file (the last row wins for a repeated key).

  A torn last line (a write cut short: no trailing newline and not valid
  JSON) is dropped with a warning: its row is written again when its round
  is redone. Any other bad line raises MetricsFileError naming file:line.
  Cost: one read of the file.
  """
  text = fs.read_text(path)
  lines = text.split("\n")
  rows = {}
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      key = (row["strategy"], row["seed"], row["round"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      if lineno == len(lines):  # No newline after it: cut mid-write.
        logging.warning("%s:%d is a torn last line (%s); dropping it, its "
                        "round is redone.", path, lineno, e)
        continue
      raise MetricsFileError(
          f"{path}:{lineno} is not a metrics row ({e}). Fix or delete that "
          f"line: its round is then redone.") from None
    rows[key] = row
  return list(rows.values())


def metric_names(rows: Sequence[dict]) -> list[str]:
  names = {k for r in rows for k, v in r.items()
           if k not in ROW_KEYS and isinstance(v, (int, float))}
  return sorted(names)


def curves(rows: Sequence[dict], metric: str) -> dict[str, dict]:
  """strategy -> {"percent": (R,), "mean": (R,), "std": (R,), "seeds": (R,)}.

  Means and standard deviations over seeds at each round (population std).
  """
  by_point = collections.defaultdict(list)
  for r in rows:
    if metric in r:
      by_point[(r["strategy"], r["round"])].append((r["percent"], r[metric]))
  out = collections.defaultdict(lambda: collections.defaultdict(list))
  for (strategy, _), points in sorted(by_point.items(),
                                      key=lambda kv: (kv[0][0], kv[0][1])):
    values = np.array([v for _, v in points], np.float64)
    curve = out[strategy]
    curve["percent"].append(float(np.mean([p for p, _ in points])))
    curve["mean"].append(float(values.mean()))
    curve["std"].append(float(values.std()))
    curve["seeds"].append(len(values))
  return {s: {k: np.asarray(v) for k, v in c.items()} for s, c in out.items()}


def savings(rows: Sequence[dict], metric: str,
            baseline: str = "random") -> dict[str, dict]:
  """Annotation a strategy needs to reach the baseline's final mean score.

  Returns strategy -> {"target", "percent" (first % where its mean reaches the
  target, None if never), "saving" (1 - percent / baseline's final %)}.
  """
  c = curves(rows, metric)
  if baseline not in c:
    return {}
  target = c[baseline]["mean"][-1]
  final = c[baseline]["percent"][-1]
  out = {}
  for strategy, curve in c.items():
    reached = np.flatnonzero(curve["mean"] >= target)
    percent = float(curve["percent"][reached[0]]) if reached.size else None
    out[strategy] = {"target": float(target), "percent": percent,
                     "saving": None if percent is None or final <= 0
                     else 1.0 - percent / final}
  return out


def _pm(mean: float, std: float) -> str:
  return f"{mean:.1f} ± {std:.1f}"


def markdown(rows: Sequence[dict], metrics: Iterable[str], main_metric: str,
             title: str = "Results") -> str:
  """Tables (one per metric: strategies x % annotated, mean ± std) + savings."""
  lines = [f"# {title}", ""]
  for metric in metrics:
    c = curves(rows, metric)
    if not c:
      continue
    percents = sorted({round(float(p), 1) for v in c.values()
                       for p in v["percent"]})
    lines += [f"## {metric}", "",
              "| strategy | " + " | ".join(f"{p:g}%" for p in percents) + " |",
              "|---|" + "---|" * len(percents)]
    for strategy, curve in sorted(c.items()):
      cells = {round(float(p), 1): _pm(m, s) for p, m, s in
               zip(curve["percent"], curve["mean"], curve["std"])}
      lines.append(f"| {strategy} | " + " | ".join(
          cells.get(p, "-") for p in percents) + " |")
    lines.append("")
  saved = savings(rows, main_metric)
  saved.pop("random", None)
  if saved:
    target = next(iter(saved.values()))["target"]
    lines += [f"## Annotation savings on {main_metric} vs random", "",
              f"Annotation at which a strategy's mean first reaches random's "
              f"final mean ({target:.1f}); saving = 1 - that / random's.", "",
              "| strategy | first % reaching it | saving |", "|---|---|---|"]
    for strategy, s in sorted(saved.items()):
      reached = "not reached" if s["percent"] is None else f"{s['percent']:g}%"
      saving = "-" if s["saving"] is None else f"{100 * s['saving']:.0f}%"
      lines.append(f"| {strategy} | {reached} | {saving} |")
    lines.append("")
  seconds = collections.defaultdict(list)
  for r in rows:
    if r["round"] > 0 and "acquire_s" in r:  # Absent for resumed rounds.
      seconds[r["strategy"]].append(r["acquire_s"])
  if seconds:
    lines += ["## Acquisition seconds per round (mean)", "",
              "| strategy | seconds |", "|---|---|"]
    lines += [f"| {s} | {np.mean(v):.3f} |" for s, v in sorted(seconds.items())]
    lines.append("")
  return "\n".join(lines)


def plot(rows: Sequence[dict], metrics: Sequence[str], path: str) -> None:
  """AL curves: each metric vs % annotated, mean ± std band, a line a strategy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metrics = [m for m in metrics if curves(rows, m)]
  cols = min(3, max(1, len(metrics)))
  nrows = -(-len(metrics) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows),
                           squeeze=False)
  for ax, metric in zip(axes.flat, metrics):
    for strategy, c in sorted(curves(rows, metric).items()):
      (line,) = ax.plot(c["percent"], c["mean"], marker="o", ms=3,
                        label=strategy)
      ax.fill_between(c["percent"], c["mean"] - c["std"], c["mean"] + c["std"],
                      color=line.get_color(), alpha=0.2)
    ax.set_title(metric)
    ax.set_xlabel("% of pool annotated")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis("off")
  axes.flat[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(workdir: str, main_metric: str, metrics: Sequence[str] | None = None,
          title: str = "Results", save: bool = True) -> str:
  """Writes results.md and al_curves.png from WORKDIR/metrics.jsonl (unless
  `save` is False); returns the Markdown."""
  rows = read_rows(os.path.join(workdir, "metrics.jsonl"))
  metrics = list(metrics) if metrics else metric_names(rows)
  text = markdown(rows, metrics, main_metric, title)
  if save:
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(text)
    plot(rows, metrics, os.path.join(workdir, "al_curves.png"))
  return text
