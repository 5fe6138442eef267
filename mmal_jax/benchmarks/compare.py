r"""Accelerator comparison: the acquisition and train-step benchmarks on the
devices present, as rows to set beside other machines' rows.

  python -m mmal_jax.benchmarks.compare --out DIR [--quick]
  python -m mmal_jax.benchmarks.compare --plot --out DIR [--rows=A.jsonl,...]

The first form runs `mmal_jax.benchmarks.acquisition` and
`mmal_jax.benchmarks.train_step` (each in its own process, through their
command-line flags and JSON outputs, so that no process holds the
accelerator while another wants it) and appends a row per measurement to
DIR/compare.jsonl: device kind and count, mesh, N, D, dtype, seconds, the
achieved bandwidth or FLOP rate and its fraction of the machine's peak where
that is known, date, jax version and host. Peaks come from the vendors' specs
(`PEAKS`) for accelerators and are measured in the same run on a CPU (the
best of 5 large `jnp.dot`s and array copies). `--quick` runs toy sizes in
seconds (a check that everything runs, not a measurement). DIR may be gs://.

The second form draws every row of DIR/compare.jsonl and the `--rows` files
(copied from other machines) side by side in DIR/compare.png: a panel per
benchmark, grouped bars per device kind, the fraction of peak above the bars.
"""
from __future__ import annotations

import datetime
import io
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from mmal_jax import cli
from mmal_jax import fs
from mmal_jax.benchmarks.peaks import device_peak  # noqa: F401  (public here too)

_PROG = "mmal_jax.benchmarks.compare"
_OUT = flags.DEFINE_string("out", None, "Folder of compare.jsonl (local or "
                           "gs://).", required=True)
_QUICK = flags.DEFINE_bool("quick", False, "Toy sizes: checks that it runs.")
_PLOT = flags.DEFINE_bool("plot", False, "Draw DIR/compare.jsonl and --rows "
                          "into DIR/compare.png instead of running.")
_ROWS = flags.DEFINE_list("rows", [], "More compare.jsonl files for --plot.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Train-step "
                           "dtype (default: bfloat16 on accelerators, float32 "
                           "on CPU).")
_ACQUISITION_FLAGS = flags.DEFINE_string(
    "acquisition_flags", "", "More flags for the acquisition benchmark.")
_TRAIN_STEP_FLAGS = flags.DEFINE_string(
    "train_step_flags", "", "More flags for the train-step benchmark.")

ROWS_FILE = "compare.jsonl"
ACQUISITION = "mmal_jax.benchmarks.acquisition"
TRAIN_STEP = "mmal_jax.benchmarks.train_step"

def measure_cpu_peaks(quick: bool, dtype: str) -> dict:
  """This host's best matmul TFLOP/s (an n x n `jnp.dot` in `dtype`) and copy
  GB/s (bytes read + written by `x + 1` on a large float32 array) over 5
  repeats each, interleaved. Costs 5 n^3-sized matmuls and 5 copies (n =
  4096, 512 MiB; quick: 512, 16 MiB)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  n, num_bytes = (512, 16 << 20) if quick else (4096, 512 << 20)
  a = jnp.ones((n, n), dtype)
  x = jnp.ones(num_bytes // 4, jnp.float32)
  dot, copy = jax.jit(jnp.dot), jax.jit(lambda x: x + 1)
  jax.block_until_ready((dot(a, a), copy(x)))
  best = {"dot": math.inf, "copy": math.inf}
  for _ in range(5):
    for name, run in (("dot", lambda: dot(a, a)), ("copy", lambda: copy(x))):
      start = time.perf_counter()
      jax.block_until_ready(run())
      best[name] = min(best[name], time.perf_counter() - start)
  return {"tflops": 2 * n**3 / best["dot"] / 1e12,
          "gb_s": 2 * num_bytes / best["copy"] / 1e9}


def probe(quick: bool, dtype: str | None) -> dict:
  """The devices of this process, and their peaks (see the module doc)."""
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  dtype = dtype or ("float32" if device.platform == "cpu" else "bfloat16")
  machine = {"platform": device.platform, "device_kind": device.device_kind,
             "device_count": jax.device_count(), "jax": jax.__version__,
             "host": socket.gethostname(), "dtype": dtype}
  peak = device_peak(device.device_kind)
  if peak is not None:
    machine.update(peak_tflops=peak[0] if dtype == "bfloat16" else None,
                   peak_gb_s=peak[1], peak_source="vendor spec")
  elif device.platform == "cpu":
    measured = measure_cpu_peaks(quick, dtype)
    machine.update(peak_tflops=measured["tflops"], peak_gb_s=measured["gb_s"],
                   peak_source="measured")
  else:
    machine.update(peak_tflops=None, peak_gb_s=None, peak_source=None)
  return machine


def _progress(message: str) -> None:
  print(f"[compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_python(*args: str, stream: bool = False) -> str:
  """Runs `python args` with this package importable; returns its stdout
  (`stream`: lets its output through to this process' instead, as it
  comes, and returns "")."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  result = subprocess.run([sys.executable, *args], env=env, text=True,
                          capture_output=not stream)
  if result.returncode:
    raise RuntimeError(f"{' '.join(args[:3])} failed" + (
        "" if stream else f":\n{result.stderr[-3000:]}"))
  return result.stdout or ""


def benchmark_flags(machine: dict, quick: bool) -> tuple[list, list]:
  """Flags of the acquisition and the train-step benchmark for `machine`."""
  count = machine["device_count"]
  if quick:
    acquisition = ["--quick", "--parts=rounds,greedy", "--sizes=1000",
                   "--dim=16", "--budget=8", "--coreset_size=32",
                   "--step_n=4096", "--step_dim=16"]
    train = ["--variant=mu/8", "--text_variant=mu", "--res=16",
             f"--batch={count * max(1, 8 // count)}", "--text_len=8",
             "--steps=2", "--warmup=1"]
  else:
    acquisition = ["--sizes=10000,100000,1000000", "--uncertainty_cap=30"]
    if machine["platform"] == "cpu":
      train = ["--steps=10"]
    else:  # README's accelerator row, 256 examples per device.
      train = ["--variant=B/16", "--text_variant=B", "--res=224",
               f"--batch={256 * count}", "--text_len=64", "--vocab_size=32000",
               "--steps=20"]
  return acquisition, train + [f"--dtype={machine['dtype']}"]


# Run in a subprocess (each benchmark defines its own --out): imports a
# benchmark module and parses each argv against its flags, running nothing.
# absl modules: FLAGS(argv); argparse modules: main() up to parse_args.
_PARSE_ONLY = r"""
import argparse, importlib, json, sys
from absl import flags
name, argvs = sys.argv[1], json.loads(sys.argv[2])
module = importlib.import_module(name)

class Parsed(Exception):
  pass

def error(self, message):
  raise ValueError(message)

def parse_only(self, args=None, namespace=None):
  _, extra = self.parse_known_args(args, namespace)
  if extra:
    raise ValueError("unrecognized arguments: " + " ".join(extra))
  raise Parsed

argparse.ArgumentParser.error = error
argparse.ArgumentParser.parse_args = parse_only
uses_absl = bool(flags.FLAGS.get_flags_for_module(name))
problems = []
for argv in argvs:
  try:
    if uses_absl:
      try:
        flags.FLAGS([name] + argv)
      finally:
        flags.FLAGS.unparse_flags()
    else:
      sys.argv = [name] + argv
      module.main()
      problems.append("main() ran past parse_args")
  except Parsed:
    pass
  except (flags.Error, ValueError) as e:
    problems.append(f"{' '.join(argv)}: {e}")
print(json.dumps(problems))
"""


class FlagsNotAccepted(ValueError):
  """A benchmark does not accept the flags compare would pass it."""


def check_flags(module: str, argvs: list[list[str]]) -> None:
  """Parses each of `argvs` against benchmark `module`'s command-line flags
  (absl or argparse) without running it, in one subprocess (a few seconds:
  the module's imports).

  Raises:
    FlagsNotAccepted: naming each argv that does not parse and why.
  """
  problems = json.loads(run_python("-c", _PARSE_ONLY, module,
                                   json.dumps(argvs)).strip().splitlines()[-1])
  if problems:
    raise FlagsNotAccepted(f"{module} does not accept the flags: "
                     + "; ".join(problems))


def _fraction(achieved, peak):
  return achieved / peak if achieved and peak else None


def _total_peak(machine: dict, key: str) -> float | None:
  """The peak of the whole job: per chip x chips on accelerators; a CPU's
  measured peak is already the host's, which all its devices share."""
  peak = machine.get(key)
  if peak is None or machine["platform"] == "cpu":
    return peak
  return peak * machine["device_count"]


def _row(machine: dict, benchmark: str, **values) -> dict:
  row = {"benchmark": benchmark, "device_kind": machine["device_kind"],
         "platform": machine["platform"],
         "device_count": machine["device_count"],
         "mesh": {"data": machine["device_count"], "fsdp": 1},
         "n": None, "d": None, "dtype": "float32", "seconds": None,
         "achieved": None, "unit": None, "peak": None, "fraction_of_peak": None,
         "peak_source": machine.get("peak_source"), "date": machine["date"],
         "jax": machine["jax"], "host": machine["host"],
         "quick": machine["quick"]}
  row.update(values)
  return row


def acquisition_rows(result: dict, machine: dict) -> list[dict]:
  """Rows of the acquisition benchmark's results.json: seconds per round of
  each strategy and N, and the greedy k-center step against the bandwidth
  peak (it reads the pool once per pick)."""
  rows = []
  for name, seconds in result["seconds_per_round"].items():
    for n, s in sorted(seconds.items(), key=lambda kv: int(kv[0])):
      rows.append(_row(machine, f"acquisition/{name}", n=int(n),
                       d=result["dim"], seconds=s["median"]))
  step = result["greedy_step"]
  one_pass = step["seconds"]["kernel_one_pass_per_pick"]["median"]
  gb_s = step["bytes_per_pass"] / one_pass / 1e9
  peak = _total_peak(machine, "peak_gb_s")
  rows.append(_row(machine, "kcenter_step", n=step["n"], d=step["dim"],
                   seconds=one_pass, achieved=gb_s, unit="GB/s",
                   peak=peak, fraction_of_peak=_fraction(gb_s, peak)))
  rows.append(_row(machine, "kcenter_pick_batched", n=step["n"], d=step["dim"],
                   seconds=step["seconds"]["kernel_batched_per_pick"]
                   ["median"]))
  return rows


def train_step_rows(result: dict, machine: dict) -> list[dict]:
  """The row of the train-step benchmark's train_step.json, against the FLOP
  peak: the model FLOPs of a step counted from the towers' shapes
  (`mmal_jax.flops`, all devices), not XLA's cost analysis, which misses
  custom calls and counts a scanned layer once."""
  seconds = result["step_ms"] / 1e3
  tflops = result["model_gflop_per_step"] / seconds / 1e3
  peak = (_total_peak(machine, "peak_tflops")
          if result["dtype"] == machine["dtype"] else None)
  mesh = result.get("mesh") or {"data": result["num_devices"], "fsdp": 1}
  return [_row(machine, "train_step", n=result["batch"], d=None,
               model=f"{result['model']} res {result['res']}",
               dtype=result["dtype"], mesh=mesh, seconds=seconds,
               achieved=tflops, unit="TFLOP/s", peak=peak,
               fraction_of_peak=_fraction(tflops, peak))]


def run(quick: bool, dtype: str | None = None, acquisition_flags=(),
        train_step_flags=()) -> list[dict]:
  """Probes the devices, runs both benchmarks (their output streamed as it
  comes); returns their rows."""
  _progress("probing the devices" + ("" if quick else " and their peaks"))
  machine = json.loads(run_python(
      "-c", "import json, sys; from mmal_jax.benchmarks import compare; "
      f"print(json.dumps(compare.probe({quick!r}, {dtype!r})))"))
  machine.update(quick=quick, date=datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds"))
  acquisition, train = benchmark_flags(machine, quick)
  acquisition += list(acquisition_flags)
  train += list(train_step_flags)
  # Every flag checked before the first (long) benchmark starts.
  _progress(f"{machine['device_count']} x {machine['device_kind']}; "
            f"checking the benchmarks' flags")
  check_flags(ACQUISITION, [acquisition + ["--out=x"]])
  check_flags(TRAIN_STEP, [train + ["--out=x"]])
  with tempfile.TemporaryDirectory() as tmp:
    _progress(f"{ACQUISITION} {' '.join(acquisition)}")
    run_python("-m", ACQUISITION, f"--out={tmp}", *acquisition, stream=True)
    rows = acquisition_rows(
        json.loads(fs.read_text(os.path.join(tmp, "results.json"))), machine)
    _progress(f"{TRAIN_STEP} {' '.join(train)}")
    run_python("-m", TRAIN_STEP, f"--out={tmp}", *train, stream=True)
    rows += train_step_rows(
        json.loads(fs.read_text(os.path.join(tmp, "train_step.json"))),
        machine)
  return rows


def append_rows(path: str, rows: list[dict]) -> None:
  """Appends `rows` to the JSONL file `path` (local or gs://; rewritten
  whole, atomically, since objects in a bucket cannot be appended to)."""
  old = fs.read_text(path) if fs.exists(path) else ""
  fs.write_text(path, old + "".join(json.dumps(r) + "\n" for r in rows))


def read_rows(paths) -> list[dict]:
  """The rows of compare.jsonl files, in order."""
  return [json.loads(line) for path in paths
          for line in fs.read_text(path).splitlines() if line.strip()]


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
  """A Markdown table of `rows`."""
  lines = ["| device | count | benchmark | N | D | dtype | seconds | achieved "
           "| peak | fraction of peak |", "|---|---:|---|---:|---:|---|---:|"
           "---:|---:|---:|"]
  for r in rows:
    unit = f" {r['unit']}" if r["unit"] else ""
    lines.append(
        f"| {r['device_kind']} | {r['device_count']} | {r['benchmark']} | "
        f"{_fmt(r['n'], ',')} | {_fmt(r['d'], '')} | {r['dtype']} | "
        f"{_fmt(r['seconds'], '.4g')} | {_fmt(r['achieved'], '.3g')}{unit} | "
        f"{_fmt(r['peak'], '.4g')} | {_fmt(r['fraction_of_peak'], '.1%')} |")
  return "\n".join(lines)


def _device(row: dict) -> str:
  return f"{row['device_kind']} x{row['device_count']}"


def figure(rows: list[dict]):
  """A panel per benchmark; in it, a group of bars per size (N, or the
  model and batch) and a bar per device, the latest row of each; the
  fraction of peak written above the bars that have one."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  latest = {}
  for r in sorted(rows, key=lambda r: r["date"]):
    size = (f"{r['model']}, batch {r['n']}" if r.get("model")
            else f"N={r['n']:,}" + (f", D={r['d']}" if r["d"] else ""))
    latest[(r["benchmark"], size, _device(r))] = r
  benchmarks = sorted({b for b, _, _ in latest})
  devices = sorted({d for _, _, d in latest})
  colors = {d: f"C{i}" for i, d in enumerate(devices)}
  cols = min(3, len(benchmarks)) or 1
  nrows = max(1, -(-len(benchmarks) // cols))
  fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows + 0.8),
                           squeeze=False, layout="constrained")
  width = 0.8 / len(devices) if devices else 0.8
  for ax, benchmark in zip(axes.flat, benchmarks):
    sizes = list(dict.fromkeys(s for b, s, _ in latest if b == benchmark))
    for i, device in enumerate(devices):
      for j, size in enumerate(sizes):
        r = latest.get((benchmark, size, device))
        if r is None or r["seconds"] is None:
          continue
        bar = ax.bar(j + (i - (len(devices) - 1) / 2) * width, r["seconds"],
                     width, color=colors[device], label=device)
        if r["fraction_of_peak"] is not None:
          ax.bar_label(bar, [f"{r['fraction_of_peak']:.0%}"], fontsize=7)
    ax.set_xticks(range(len(sizes)), sizes, fontsize=7,
                  rotation=15 if len(sizes) > 2 else 0)
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.set_title(benchmark)
    ax.grid(axis="y", alpha=0.3)
  for ax in list(axes.flat)[len(benchmarks):]:
    ax.axis("off")
  if devices:
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colors[d]) for d in devices],
               devices, loc="outside lower center", ncol=min(len(devices), 4),
               frameon=False)
  fig.suptitle("Seconds (log scale; lower is better); % = fraction of the "
               "device's memory-bandwidth or FLOP peak", fontsize="medium")
  return fig


def plot(rows: list[dict], path: str) -> None:
  """Writes `figure(rows)` as a PNG to `path` (local or gs://)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig = figure(rows)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  fs.write_bytes(path, buffer.getvalue())


def main(argv):
  if len(argv) > 1:
    cli.fail(_PROG, f"unexpected arguments {argv[1:]}; pass only flags.")
  cli.check_output_folder(_PROG, "--out", _OUT.value)
  path = os.path.join(_OUT.value, ROWS_FILE)
  if _PLOT.value:
    paths = [p for p in [path] if fs.exists(p)] + _ROWS.value
    rows = read_rows(paths)
    if not rows:
      cli.fail(_PROG, f"no rows to plot in {path} or --rows; run compare "
               f"there first or pass --rows=A.jsonl,...")
    plot(rows, os.path.join(_OUT.value, "compare.png"))
    print(f"Plotted {len(rows)} rows of {len(paths)} file(s) into "
          f"{_OUT.value}/compare.png")
    return
  try:
    rows = run(_QUICK.value, _DTYPE.value,
               shlex.split(_ACQUISITION_FLAGS.value),
               shlex.split(_TRAIN_STEP_FLAGS.value))
  except FlagsNotAccepted as e:  # Before any benchmark has run.
    cli.fail(_PROG, f"{e}. Fix --acquisition_flags / --train_step_flags.")
  print(table(rows))
  append_rows(path, rows)
  print(f"\nAppended {len(rows)} rows to {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser(_PROG))
