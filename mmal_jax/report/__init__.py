"""Results of a multi-strategy run: Markdown table, AL curves, annotation savings.

Reads the rows of `WORKDIR/metrics.jsonl` (one per strategy, seed and round)
and the annotation page's records (`WORKDIR/annotate/`, see
`annotate.store`), and writes `WORKDIR/results.md` and
`WORKDIR/al_curves.png` (through
`mmal_jax.fs`, so the workdir may be on gs://).

As a command (`__main__`) it compares several workdirs of a sweep
(`mmal_jax.sweep`, which builds on this module; this module imports neither):

  python -m mmal_jax.report --workdirs A,B,... --out DIR [--metric NAME]

writes DIR/sweep.md and DIR/sweep.png. Exit status 2 with one line on
stderr for a workdir or output folder that cannot be used.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable, Sequence

from absl import logging
import numpy as np

from mmal_jax import fs
from mmal_jax import plots
from mmal_jax import summaries
from mmal_jax.annotate import store as annotation_store
from mmal_jax.evaluators import colorswap

# Columns of a metrics row that time the run (they differ between reruns).
TIMING_KEYS = ("embed_s", "acquire_s", "train_s", "eval_s", "stage1_s",
               "device_hours")
# Bookkeeping columns of a metrics row; every other number is a metric.
ROW_KEYS = ("strategy", "seed", "round", "queries", "pairs", "percent",
            "train_steps", "modality_counts", "skipped_items") + TIMING_KEYS


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
    if r.get(metric) is not None:  # None: undefined (NaN) at that point.
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


# Two-sided confidence of the lower bound that gates an annotation saving.
CONFIDENCE = 0.95


def _values(rows: Sequence[dict], metric: str) -> dict:
  """(strategy, round) -> {seed: (percent, value)} of the rows with a value
  (None, a NaN written as null, is left out)."""
  out = collections.defaultdict(dict)
  for r in rows:
    if r.get(metric) is not None:
      out[(r["strategy"], r["round"])][r["seed"]] = (r["percent"], r[metric])
  return out


def _mean_se(values) -> tuple[float, float]:
  """Mean and standard error (sample std / sqrt(n); NaN for n < 2)."""
  values = np.asarray(values, np.float64)
  se = (values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1
        else float("nan"))
  return float(values.mean()), float(se)


def paired_differences(rows: Sequence[dict], metric: str,
                       baseline: str = "random") -> dict[str, dict]:
  """Per round: each strategy minus `baseline`, paired by seed.

  Returns strategy -> {"percent", "mean", "se", "positive", "seeds"}, each
  `(R,)` over the rounds where at least one seed has both values: the mean
  over seeds of d_s = strategy_s - baseline_s, its standard error
  (std(d, ddof=1) / sqrt(n), NaN for one seed), how many d_s > 0 and n.
  `percent` is the strategy's mean % annotated at that round. A seed fixes
  the eval split and the initialisation, so pairing removes their variance.
  Cost: O(rows).
  """
  values = _values(rows, metric)
  out = {}
  for strategy in sorted({s for s, _ in values} - {baseline}):
    stats = collections.defaultdict(list)
    for t in sorted(t for s, t in values if s == strategy):
      mine, theirs = values[(strategy, t)], values.get((baseline, t), {})
      seeds = sorted(set(mine) & set(theirs))
      if not seeds:
        continue
      d = [mine[k][1] - theirs[k][1] for k in seeds]
      mean, se = _mean_se(d)
      stats["percent"].append(float(np.mean([mine[k][0] for k in seeds])))
      stats["mean"].append(mean)
      stats["se"].append(se)
      stats["positive"].append(int(np.sum(np.asarray(d) > 0)))
      stats["seeds"].append(len(seeds))
    if stats:
      out[strategy] = {k: np.asarray(v) for k, v in stats.items()}
  return out


def area_differences(rows: Sequence[dict], metric: str,
                     baseline: str = "random") -> dict[str, dict]:
  """Curve level: the paired difference of the areas under the curves.

  For each seed both runs have, over the rounds both have (at least two):
  (area under the strategy's curve - area under the baseline's) / (last %
  - first %), areas by the trapezoid rule over % annotated (the strategy's
  %), so the number reads in the metric's units: the mean gap between the
  two curves. Returns strategy -> {"mean", "se", "positive", "seeds"} over
  those seeds (se NaN for one seed). Cost: O(rows).
  """
  values = _values(rows, metric)
  out = {}
  for strategy in sorted({s for s, _ in values} - {baseline}):
    seeds = sorted({k for (s, _), v in values.items() if s == strategy
                    for k in v})
    d = []
    for seed in seeds:
      points = sorted(
          (values[(strategy, t)][seed][0], values[(strategy, t)][seed][1],
           values[(baseline, t)][seed][1])
          for (s, t) in values if s == strategy
          and seed in values[(strategy, t)]
          and seed in values.get((baseline, t), {}))
      if len(points) < 2:
        continue
      x, a, b = (np.array(column, np.float64) for column in zip(*points))
      if x[-1] > x[0]:
        d.append(float(np.trapezoid(a - b, x) / (x[-1] - x[0])))
    if d:
      mean, se = _mean_se(d)
      out[strategy] = {"mean": mean, "se": se,
                       "positive": int(np.sum(np.asarray(d) > 0)),
                       "seeds": len(d)}
  return out


def savings(rows: Sequence[dict], metric: str,
            baseline: str = "random") -> dict[str, dict]:
  """Annotation a strategy needs to reach the baseline's final mean score,
  judged on the strategy's lower confidence bound.

  At each round the bound is mean - t * SE over the strategy's seeds (t the
  two-sided `CONFIDENCE` quantile of Student's t with n - 1 degrees of
  freedom, SE = std(ddof=1) / sqrt(n); no bound for one seed). Returns
  strategy -> {"target" (the baseline's final mean), "percent" (first %
  where the bound reaches the target, None if never), "saving" (1 - percent
  / the baseline's final %, None if not reached)}. Cost: O(rows).
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  values = _values(rows, metric)
  final_round = max((t for s, t in values if s == baseline), default=None)
  if final_round is None:
    return {}
  last = values[(baseline, final_round)].values()
  target = float(np.mean([v for _, v in last]))
  final = float(np.mean([p for p, _ in last]))
  out = {}
  for strategy in sorted({s for s, _ in values}):
    percent = None
    for t in sorted(t for s, t in values if s == strategy):
      points = list(values[(strategy, t)].values())
      if len(points) < 2:
        continue
      mean, se = _mean_se([v for _, v in points])
      bound = mean - stats.t.ppf(0.5 + CONFIDENCE / 2, len(points) - 1) * se
      if bound >= target:
        percent = float(np.mean([p for p, _ in points]))
        break
    out[strategy] = {"target": target, "percent": percent,
                     "saving": None if percent is None or final <= 0
                     else 1.0 - percent / final}
  return out


def _pm(mean: float, std: float) -> str:
  return f"{mean:.1f} ± {std:.1f}"


def paired_cell(mean: float, se: float, positive: int, seeds: int) -> str:
  """A paired difference as "+1.23 ± 0.45 (k/n)" (no ± for one seed)."""
  spread = "" if np.isnan(se) else f" ± {se:.2f}"
  return f"{mean:+.2f}{spread} ({positive}/{seeds})"


def paired_markdown(rows: Sequence[dict], metric: str,
                    baseline: str = "random") -> list[str]:
  """Markdown lines: the paired differences per round and over the curve
  (`paired_differences`, `area_differences`) and the annotation savings at
  the lower confidence bound (`savings`). Empty without the baseline."""
  paired = paired_differences(rows, metric, baseline)
  lines = []
  if paired:
    areas = area_differences(rows, metric, baseline)
    percents = sorted({round(float(p), 1) for v in paired.values()
                       for p in v["percent"]})
    lines += [f"## Paired differences vs {baseline} on {metric}", "",
              f"Each strategy minus {baseline} on the same seed (a seed "
              f"fixes the eval split and the initialisation, so the runs are "
              f"paired): mean ± standard error over "
              f"seeds (std with ddof=1 / sqrt(n)), and (seeds where the "
              f"strategy is ahead / seeds). Over the curve: the paired "
              f"difference of the areas under the curves (trapezoid over % "
              f"annotated) divided by the % span, i.e. the mean gap between "
              f"the curves.", "",
              "| strategy | " + " | ".join(f"{p:g}%" for p in percents)
              + " | over the curve |", "|---|" + "---|" * (len(percents) + 1)]
    for strategy, d in sorted(paired.items()):
      cells = {round(float(p), 1): paired_cell(m, e, k, n) for p, m, e, k, n
               in zip(d["percent"], d["mean"], d["se"], d["positive"],
                      d["seeds"])}
      area = areas.get(strategy)
      lines.append(f"| {strategy} | " + " | ".join(
          cells.get(p, "-") for p in percents) + " | " + (
              paired_cell(area["mean"], area["se"], area["positive"],
                           area["seeds"]) if area else "-") + " |")
    lines.append("")
  saved = savings(rows, metric, baseline)
  saved.pop(baseline, None)
  if saved:
    target = next(iter(saved.values()))["target"]
    lines += [f"## Annotation savings on {metric} vs {baseline}", "",
              f"First % annotated at which a strategy's lower "
              f"{100 * CONFIDENCE:g}% confidence bound (mean - t * SE over "
              f"its seeds, Student's t with n - 1 degrees of freedom) reaches "
              f"{baseline}'s final mean ({target:.1f}); saving = 1 - that % "
              f"/ {baseline}'s final %. Not reached: the strategy is not "
              f"shown to match {baseline}'s final score (also with one seed, "
              f"which gives no bound).", "",
              "| strategy | first % reaching it | saving |", "|---|---|---|"]
    for strategy, s in sorted(saved.items()):
      reached = "not reached" if s["percent"] is None else f"{s['percent']:g}%"
      saving = "-" if s["saving"] is None else f"{100 * s['saving']:.0f}%"
      lines.append(f"| {strategy} | {reached} | {saving} |")
    lines.append("")
  return lines


def markdown(rows: Sequence[dict], metrics: Iterable[str], main_metric: str,
             title: str = "Results") -> str:
  """Tables (one per metric: strategies x % annotated, mean ± std), the
  paired statistics vs random on `main_metric` (`paired_markdown`) and the
  acquisition seconds."""
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
  lines += paired_markdown(rows, main_metric)
  lines += acquisition_seconds(rows)
  return "\n".join(lines)


def acquisition_seconds(rows: Sequence[dict]) -> list[str]:
  """Markdown lines: each strategy's first acquisition round and the mean of
  its later rounds, apart (the first round includes compiling the kernels).

  The first round is the first timed round of each seed (after a resume: the
  first one this run timed), averaged over seeds. Empty without timings.
  """
  by_run = collections.defaultdict(list)
  for r in rows:
    if r["round"] > 0 and "acquire_s" in r:  # Absent for resumed rounds.
      by_run[(r["strategy"], r["seed"])].append((r["round"], r["acquire_s"]))
  if not by_run:
    return []
  first, later = collections.defaultdict(list), collections.defaultdict(list)
  for (strategy, _), timed in by_run.items():
    timed.sort()
    first[strategy].append(timed[0][1])
    later[strategy] += [seconds for _, seconds in timed[1:]]
  lines = ["## Acquisition seconds per round", "",
           "First round: the first timed round of each seed, including "
           "compilation of the strategy's kernels (mean over seeds). Later "
           "rounds: the steady state, mean over every later round and seed.",
           "", "| strategy | first round (compile + run) | later rounds (mean) "
           "| later rounds timed |", "|---|---|---|---|"]
  for strategy in sorted(first):
    steady = (f"{np.mean(later[strategy]):.3f}" if later[strategy] else "-")
    lines.append(f"| {strategy} | {np.mean(first[strategy]):.3f} | {steady} "
                 f"| {len(later[strategy])} |")
  return lines + [""]


def figure(rows: Sequence[dict], metrics: Sequence[str]):
  """The AL curves as a matplotlib Figure: a panel per metric (y: the metric,
  x: % of the pool annotated), a line per strategy with its mean over seeds
  and a +- std band, a dashed chance line on ColorSwap panels
  (`evaluators.colorswap.CHANCE`), one legend below the panels, and a title
  saying how many seeds the band is over."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metrics = [m for m in metrics if curves(rows, m)]
  cols = min(3, max(1, len(metrics)))
  nrows = max(1, -(-len(metrics) // cols))
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows + 0.9),
                           squeeze=False, layout="constrained")
  # One colour per strategy in every panel, also where one has no values.
  colors = {s: f"C{i}" for i, s in enumerate(sorted({r["strategy"]
                                                      for r in rows}))}
  seeds = set()
  handles = {}
  for ax, metric in zip(axes.flat, metrics):
    for strategy, c in sorted(curves(rows, metric).items()):
      (line,) = ax.plot(c["percent"], c["mean"], marker="o", ms=3,
                        color=colors[strategy], label=strategy)
      ax.fill_between(c["percent"], c["mean"] - c["std"], c["mean"] + c["std"],
                      color=colors[strategy], alpha=0.2)
      handles.setdefault(strategy, line)
      seeds.update(int(n) for n in c["seeds"])
    kind = metric.removeprefix("colorswap/")
    if metric.startswith("colorswap/") and kind in colorswap.CHANCE:
      chance = ax.axhline(colorswap.CHANCE[kind], ls="--", lw=1, color="0.4",
                          label="chance")
      handles.setdefault("chance", chance)
    ax.set_ylabel(metric)
    ax.set_xlabel("% of pool annotated")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis("off")
  if seeds:
    count = (f"{min(seeds)}" if len(seeds) == 1
             else f"{min(seeds)}-{max(seeds)}")
    fig.suptitle(f"Lines: mean over {count} seeds; bands: ± std over {count} "
                 "seeds (population std)", fontsize="medium")
  if handles:
    fig.legend(handles.values(), handles.keys(), loc="outside lower center",
               ncol=min(len(handles), 6), frameon=False)
  return fig


def plot(rows: Sequence[dict], metrics: Sequence[str], path: str) -> None:
  """Writes `figure(rows, metrics)` as a PNG to `path` (local or gs://)."""
  plots.save_png(figure(rows, metrics), path)


def write(workdir: str, main_metric: str, metrics: Sequence[str] | None = None,
          title: str = "Results", save: bool = True,
          rows: Sequence[dict] | None = None, appendix: str = "") -> str:
  """Writes WORKDIR/results.md, WORKDIR/al_curves.png (`figure`),
  modality_queries.png (`plots.modality_figure`, where rows have
  modality_counts), seconds_per_round.png (`plots.seconds_figure`, where
  rows are timed) (local or gs://, each atomically) and the Markdown as a
  TensorBoard text summary in WORKDIR/tensorboard/report/ (tag "results"),
  unless `save` is False; returns the Markdown (with the annotation page's
  table when WORKDIR/annotate/ holds its records, then `appendix`: an
  experiment's own tables).

  `rows` default to those of WORKDIR/metrics.jsonl.
  """
  if rows is None:
    rows = read_rows(os.path.join(workdir, "metrics.jsonl"))
  metrics = list(metrics) if metrics else metric_names(rows)
  text = markdown(rows, metrics, main_metric, title)
  text += "\n".join(annotation_store.markdown(workdir))
  text += appendix
  if save:
    fs.write_text(os.path.join(workdir, "results.md"), text)
    plot(rows, metrics, os.path.join(workdir, "al_curves.png"))
    if plots.modality_queries(rows):
      plots.save_png(plots.modality_figure(rows),
                     os.path.join(workdir, "modality_queries.png"))
    if any(plots.seconds_per_round(rows, k) for k in plots.SECONDS_KEYS):
      plots.save_png(plots.seconds_figure(rows),
                     os.path.join(workdir, "seconds_per_round.png"))
    with summaries.SummaryWriter(os.path.join(workdir, "tensorboard",
                                              "report")) as writer:
      writer.text(0, "results", text)
  return text
