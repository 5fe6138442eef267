"""Sweeps side by side: several workdirs that differ in some config keys.

  python -m mmal_jax.report --workdirs A,B,... --out DIR [--metric NAME]

reads each workdir's config.json and metrics.jsonl (local or gs://, through
`mmal_jax.fs`) and writes DIR/sweep.md (one table) and DIR/sweep.png (one
figure). The config keys whose values differ between the workdirs (dotted,
e.g. `strategy_hparams.mmal.coreset_size`) are the swept values: the table's
first columns and the figure's legend. The metric is each config's
`report.main_metric` (they must agree) unless --metric names one.
Per workdir and strategy the table gives the final % annotated, the final
mean ± std over seeds and, against `random` of the same workdir, the paired
statistics of `report.paired_markdown`: the last round's paired difference,
the paired difference over the curve and the saving at the lower 95%
confidence bound.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from typing import Any, Sequence

import ml_collections

from mmal_jax import cli
from mmal_jax import fs
from mmal_jax import report


class SweepError(ValueError):
  """A workdir or the output folder cannot be used (one readable line)."""


@dataclasses.dataclass(frozen=True)
class Workdir:
  """One workdir of a sweep: its path, config.json (nested) and rows."""
  path: str
  config: dict
  rows: list


def load(path: str) -> Workdir:
  """Reads WORKDIR/config.json and WORKDIR/metrics.jsonl.

  Raises SweepError naming the file and what to do when one is missing or
  unreadable. Cost: one read of each file.
  """
  files = {name: os.path.join(path, name)
           for name in ("config.json", "metrics.jsonl")}
  for name, file in files.items():
    if not fs.exists(file):
      raise SweepError(f"{file} does not exist: --workdirs takes workdirs of "
                       f"finished or running experiments (each holds "
                       f"config.json and metrics.jsonl); fix that entry.")
  try:
    config = json.loads(fs.read_text(files["config.json"]))
    rows = report.read_rows(files["metrics.jsonl"])
  except (json.JSONDecodeError, report.MetricsFileError) as e:
    raise SweepError(f"{path} cannot be read ({e}); fix the file or drop "
                     f"that workdir from --workdirs.") from None
  if not rows:
    raise SweepError(f"{files['metrics.jsonl']} has no rows yet; drop that "
                     f"workdir from --workdirs or wait for its first round.")
  return Workdir(path, config, rows)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """Dotted key -> leaf value of a nested dict (lists stay values)."""
  if not isinstance(config, dict):
    return {prefix.rstrip("."): config}
  out = {}
  for key, value in config.items():
    out.update(flatten(value, f"{prefix}{key}."))
  return out


def swept_keys(configs: Sequence[dict]) -> list[str]:
  """The sorted dotted keys whose values are not the same in every config
  (a key missing from one counts as a differing value)."""
  flat = [flatten(c) for c in configs]
  keys = set().union(*flat) if flat else set()
  return sorted(k for k in keys
                if any(f.get(k, None) != flat[0].get(k, None) for f in flat))


def _value(v: Any) -> str:
  return v if isinstance(v, str) else json.dumps(v)


def labels(workdirs: Sequence[Workdir]) -> list[str]:
  """Legend label of each workdir: its swept values (`key=value, ...`), or
  its folder name where no key differs."""
  keys = swept_keys([w.config for w in workdirs])
  if not keys:
    return [os.path.basename(os.path.normpath(w.path)) for w in workdirs]
  return [", ".join(f"{k}={_value(flatten(w.config).get(k))}" for k in keys)
          for w in workdirs]


def main_metric(workdirs: Sequence[Workdir]) -> str:
  """The workdirs' common `report.main_metric` (as `config_lib.main_metric`
  resolves it); SweepError if they differ."""
  from mmal_jax import config_lib  # pylint: disable=g-import-not-at-top
  names = {config_lib.main_metric(ml_collections.ConfigDict(w.config))
           for w in workdirs}
  if len(names) != 1:
    raise SweepError(f"The workdirs' report.main_metric differ "
                     f"({sorted(names)}); pass --metric NAME.")
  return names.pop()


def markdown(workdirs: Sequence[Workdir], metric: str,
             baseline: str = "random") -> str:
  """The sweep table: a row per workdir and strategy (see module doc)."""
  keys = swept_keys([w.config for w in workdirs])
  head = [*(keys or ["workdir"]), "strategy", "final %",
          f"final {metric} (mean ± std)", f"last round - {baseline} (paired)",
          f"over the curve - {baseline} (paired)", "saving"]
  lines = [f"# Sweep: {metric}", "",
           f"Each workdir's strategies; paired columns: the strategy minus "
           f"{baseline} of the same workdir on the same seed, mean ± standard "
           f"error (seeds ahead / seeds); over the curve: the paired "
           f"difference of the areas under the curves (trapezoid over % "
           f"annotated) / the % span; saving: at the first % where the "
           f"strategy's lower {100 * report.CONFIDENCE:g}% confidence bound "
           f"reaches {baseline}'s final mean (- where never). Swept keys: "
           f"{', '.join(keys) or 'none differ'}.", "",
           "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for w, label in zip(workdirs, labels(workdirs)):
    flat = flatten(w.config)
    first = ([_value(flat.get(k)) for k in keys] if keys else [label])
    c = report.curves(w.rows, metric)
    paired = report.paired_differences(w.rows, metric, baseline)
    areas = report.area_differences(w.rows, metric, baseline)
    saved = report.savings(w.rows, metric, baseline)
    for strategy, curve in sorted(c.items()):
      d, area = paired.get(strategy), areas.get(strategy)
      last = ("-" if d is None else report.paired_cell(
          d["mean"][-1], d["se"][-1], d["positive"][-1], d["seeds"][-1]))
      over = ("-" if area is None else report.paired_cell(
          area["mean"], area["se"], area["positive"], area["seeds"]))
      s = saved.get(strategy, {}).get("saving")
      saving = ("-" if s is None or strategy == baseline
                else f"{100 * s:.0f}% (at {saved[strategy]['percent']:.1f}%)")
      lines.append("| " + " | ".join([
          *first, strategy, f"{round(float(curve['percent'][-1]), 1):g}",
          f"{curve['mean'][-1]:.2f} ± {curve['std'][-1]:.2f} "
          f"({curve['seeds'][-1]})", last, over, saving]) + " |")
  return "\n".join(lines + [""])


def figure(workdirs: Sequence[Workdir], metric: str):
  """A panel per strategy (`metric` vs % annotated), a line per workdir
  (mean over seeds, ± std band), one legend titled by the swept keys."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  strategies = sorted({r["strategy"] for w in workdirs for r in w.rows})
  cols = min(3, len(strategies))
  nrows = -(-len(strategies) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows + 1.2),
                           squeeze=False, sharey=True, layout="constrained")
  handles = {}
  for ax, strategy in zip(axes.flat, strategies):
    for k, (w, label) in enumerate(zip(workdirs, labels(workdirs))):
      c = report.curves(w.rows, metric).get(strategy)
      if c is None:
        continue
      (line,) = ax.plot(c["percent"], c["mean"], marker="o", ms=3,
                        color=f"C{k}", label=label)
      ax.fill_between(c["percent"], c["mean"] - c["std"],
                      c["mean"] + c["std"], color=f"C{k}", alpha=0.2)
      handles.setdefault(label, line)
    ax.set_title(strategy)
    ax.set_ylabel(metric)
    ax.set_xlabel("% of pool annotated")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(strategies):]:
    ax.axis("off")
  keys = swept_keys([w.config for w in workdirs])
  fig.suptitle("Lines: mean over seeds; bands: ± std over seeds "
               "(population std)", fontsize="medium")
  if handles:
    fig.legend(handles.values(), handles.keys(), loc="outside lower center",
               ncol=min(len(handles), 3), frameon=False,
               title=", ".join(keys) if keys else None)
  return fig


def write(paths: Sequence[str], out: str, metric: str | None = None) -> str:
  """Reads the workdirs, writes OUT/sweep.md and OUT/sweep.png; returns the
  Markdown. Every workdir and OUT are checked first (SweepError)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if len(paths) < 1:
    raise SweepError("--workdirs is empty; pass A,B,... (local or gs://).")
  workdirs = [load(p) for p in paths]
  metric = metric or main_metric(workdirs)
  missing = [w.path for w in workdirs if not report.curves(w.rows, metric)]
  if missing:
    raise SweepError(f"{missing[0]}/metrics.jsonl has no {metric!r} values; "
                     f"pass --metric with one of "
                     f"{report.metric_names(workdirs[0].rows)}.")
  problem = cli.output_folder_problem(out)
  if problem:
    raise SweepError(f"--out: {problem}; give a folder this process can "
                     f"write.")
  text = markdown(workdirs, metric)
  fig = figure(workdirs, metric)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  fs.write_text(os.path.join(out, "sweep.md"), text)
  fs.write_bytes(os.path.join(out, "sweep.png"), buffer.getvalue())
  return text


def command(workdirs: Sequence[str], out: str, metric: str = "") -> int:
  """`write` for the command line: 0, or `cli.EXIT_USAGE` with one line on
  stderr naming the problem (before anything is written)."""
  try:
    write(workdirs, out, metric or None)
  except SweepError as e:
    print(f"mmal_jax.report: error: {e}", file=sys.stderr)
    return cli.EXIT_USAGE
  print(f"Wrote {os.path.join(out, 'sweep.md')} and "
        f"{os.path.join(out, 'sweep.png')}")
  return 0
