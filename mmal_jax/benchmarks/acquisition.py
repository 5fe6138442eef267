r"""Acquisition cost vs pool size, and one greedy k-center step vs its floor.

  python -m mmal_jax.benchmarks.acquisition [--quick] --out DIR

Part 1: per-round acquisition seconds of `mmal`, `coreset` and `uncertainty`
for N items per modality (two modalities, D = 256, budget 256, coreset 1024,
1% of items annotated). `mmal` and `coreset` keep the min-distance cache
across rounds: a round's time is the cache update with the previous round's
newly annotated items (`O(N B D)`) plus the strategy call. Rebuilding the cache
from scratch (`O(N |S| D)`, what retraining forces every round) is timed
separately and reported as its own row. `uncertainty` runs until one round
passes `--uncertainty_cap` seconds.

Part 2: one step of greedy k-center at N = 200k, D = 512, float32, against
(a) the numpy reference that active-learning libraries use
(`sklearn.metrics.pairwise_distances` to the new center + `np.minimum`), and
(b) the memory-bandwidth floor: the bytes a step must read (the pool once)
divided by the bandwidth of a large numpy copy (bytes read + written / s),
measured in the same run. Both for the one-pass-per-pick kernel
(`picks_per_pass=1`) and, per pick, for the default that makes up to 16
exact picks per pass (which is not bound by that floor).

Writes DIR/results.json and DIR/acquisition_scaling.png and prints a table.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax import sharding
from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition import strategies

_QUICK = flags.DEFINE_bool("quick", False, "Small pools, for a fast check.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_SIZES = flags.DEFINE_list("sizes", None, "Pool sizes N (default: by mode).")
_DIM = flags.DEFINE_integer("dim", 256, "Embedding dimension, part 1.")
_BUDGET = flags.DEFINE_integer("budget", 256, "Queries per round.")
_CORESET = flags.DEFINE_integer("coreset_size", 1024, "MMAL coreset size.")
_ANNOTATED = flags.DEFINE_float("annotated", 0.01, "Annotated fraction.")
_UNC_CAP = flags.DEFINE_float("uncertainty_cap", 120.0,
                              "Stop uncertainty after a round this long (s).")
_REBUILD_CAP = flags.DEFINE_float("rebuild_cap", 120.0,
                                  "Stop cache rebuilds after one this long (s).")
_STEP_N = flags.DEFINE_integer("step_n", None, "Pool size, part 2.")
_STEP_DIM = flags.DEFINE_integer("step_dim", 512, "Dimension, part 2.")

FULL_SIZES = (10_000, 30_000, 100_000, 300_000, 1_000_000)
QUICK_SIZES = (2_000, 5_000, 10_000, 20_000)


def _timed(fn, repeats: int, warm_up: bool = True) -> float:
  """Median seconds of `repeats` calls of fn, after one untimed warm-up call
  (without it the one timed call includes compiling: for minute-long calls)."""
  if warm_up:
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _pool(n: int, dim: int, budget: int, annotated_fraction: float, seed: int):
  """Two modalities of n random embeddings; a fraction annotated as pairs."""
  rng = np.random.default_rng(seed)
  embeddings = {m: jnp.asarray(rng.standard_normal((n, dim), np.float32))
                for m in ("image", "text")}
  num_annotated = max(1, int(round(annotated_fraction * n)))
  annotated = {}
  for m in embeddings:
    mask = np.zeros(n, np.bool_)
    mask[rng.choice(n, num_annotated, replace=False)] = True
    annotated[m] = mask
  # The previous round's purchases: `budget` pairs among the annotated items.
  newly = {m: np.flatnonzero(annotated[m])[:budget] for m in embeddings}
  return embeddings, annotated, newly


def _fit_slope(sizes, seconds) -> float | None:
  if len(sizes) < 2:
    return None
  return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def scaling(sizes, *, dim, budget, coreset_size, annotated_fraction,
            uncertainty_cap, rebuild_cap, mesh) -> dict:
  """Part 1: per-round seconds of each strategy for each pool size."""
  rows = {"mmal": {}, "coreset": {}, "uncertainty": {}, "cache_rebuild": {}}
  for n in sizes:
    embeddings, annotated, newly = _pool(n, dim, budget, annotated_fraction, n)
    repeats = 3 if n <= 100_000 else 1
    before = {m: annotated[m].copy() for m in annotated}
    for m in before:
      before[m][newly[m]] = False
    cache = strategies.build_min_distance_cache(embeddings, before, mesh=mesh)

    def incremental_round(name):
      def run():
        updated = strategies.update_min_distance_cache(cache, embeddings, newly,
                                                       mesh=mesh)
        hparams = {"coreset_size": coreset_size} if name == "mmal" else {}
        return strategies.STRATEGIES[name](
            embeddings, annotated, budget=budget, seed=0, min_dist=updated,
            mesh=mesh, **hparams)
      return run

    for name in ("mmal", "coreset"):
      rows[name][n] = _timed(incremental_round(name), repeats)
    if _below_cap(rows["cache_rebuild"], rebuild_cap):
      rows["cache_rebuild"][n] = _timed(
          lambda: strategies.build_min_distance_cache(embeddings, annotated,
                                                      mesh=mesh), repeats)
    if _below_cap(rows["uncertainty"], uncertainty_cap):
      rows["uncertainty"][n] = _timed(
          lambda: strategies.STRATEGIES["uncertainty"](
              embeddings, annotated, budget=budget, seed=0, mesh=mesh),
          1 if n > 30_000 else repeats, warm_up=n <= 30_000)
    print(f"N={n:>9,}  " + "  ".join(
        f"{k}={v[n]:.3f}s" for k, v in rows.items() if n in v), flush=True)
  return rows


def _below_cap(row: dict, cap: float) -> bool:
  return not row or max(row.values()) <= cap


def copy_bandwidth(num_bytes: int) -> float:
  """Bytes read + written per second by np.copyto on a large float32 array."""
  src = np.ones(num_bytes // 4, np.float32)
  dst = np.empty_like(src)
  best = min(_seconds(lambda: np.copyto(dst, src)) for _ in range(5))
  return 2 * src.nbytes / best


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def greedy_step(n: int, dim: int, mesh) -> dict:
  """Part 2: seconds per greedy k-center step: kernel, numpy reference, floor."""
  from sklearn.metrics import pairwise_distances  # Only this benchmark needs it.

  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, dim), np.float32)
  pool = layout_lib.shard_rows(x, mesh)
  eligible = layout_lib.shard_mask(np.ones(n, np.bool_), pool.layout)
  init = kernels.min_distance_sharded(pool, x[:1])

  def seconds_per_pick(picks_per_pass, few, many):
    def run(k):
      return lambda: kernels.kcenter_greedy_sharded(
          pool, k, eligible=eligible, init_dist=init,
          picks_per_pass=picks_per_pass)
    return (_timed(run(many), 3) - _timed(run(few), 3)) / (many - few)

  kernel_step = seconds_per_pick(1, 4, 68)
  batched = seconds_per_pick(kernels.DEFAULT_PICKS_PER_PASS, 64, 1088)

  dist = np.full(n, np.inf, np.float32)

  def reference_step(j):
    d = pairwise_distances(x, x[j:j + 1]).ravel()
    np.minimum(dist, d, out=dist)
    return int(np.argmax(dist))

  reference = statistics.median(_seconds(lambda: reference_step(j))
                                for j in range(5))
  bandwidth = copy_bandwidth(x.nbytes)
  floor = x.nbytes / bandwidth
  return {"n": n, "dim": dim, "kernel_step_s": kernel_step,
          "numpy_reference_step_s": reference,
          "speedup_vs_reference": reference / kernel_step,
          "copy_bandwidth_gb_s": bandwidth / 1e9,
          "bytes_read_per_step": x.nbytes, "floor_step_s": floor,
          "fraction_of_floor": floor / kernel_step,
          "picks_per_pass": kernels.DEFAULT_PICKS_PER_PASS,
          "batched_pick_s": batched,
          "batched_speedup_vs_reference": reference / batched}


def _plot(rows, slopes, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  styles = {"mmal": "o-", "coreset": "s-", "uncertainty": "^-",
            "cache_rebuild": "x--"}
  for name, row in rows.items():
    if row:
      sizes = sorted(row)
      slope = slopes.get(name)
      label = name if slope is None else f"{name} (slope {slope:.2f})"
      ax.loglog(sizes, [row[s] for s in sizes], styles[name], label=label)
  ax.set_xlabel("pool size N per modality")
  ax.set_ylabel("seconds per acquisition round")
  ax.set_title(f"Acquisition cost ({jax.devices()[0].platform}, "
               f"{jax.device_count()} device(s))")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind}


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  mesh = sharding.make_mesh()
  sizes = ([int(s) for s in _SIZES.value] if _SIZES.value
           else QUICK_SIZES if _QUICK.value else FULL_SIZES)
  step_n = _STEP_N.value or (50_000 if _QUICK.value else 200_000)
  print(f"Machine: {_machine()}")
  rows = scaling(sizes, dim=_DIM.value, budget=_BUDGET.value,
                 coreset_size=_CORESET.value,
                 annotated_fraction=_ANNOTATED.value,
                 uncertainty_cap=_UNC_CAP.value,
                 rebuild_cap=_REBUILD_CAP.value, mesh=mesh)
  slopes = {name: _fit_slope(sorted(row), [row[s] for s in sorted(row)])
            for name, row in rows.items()}
  step = greedy_step(step_n, _STEP_DIM.value, mesh)

  print("\nSeconds per acquisition round (D={}, budget {}, coreset {}, "
        "{:.0%} annotated):".format(_DIM.value, _BUDGET.value, _CORESET.value,
                                    _ANNOTATED.value))
  names = list(rows)
  print(f"{'N':>10} " + " ".join(f"{k:>14}" for k in names))
  for n in sizes:
    print(f"{n:>10,} " + " ".join(
        f"{rows[k][n]:>14.3f}" if n in rows[k] else f"{'-':>14}"
        for k in names))
  print(f"{'slope':>10} " + " ".join(
      f"{slopes[k]:>14.2f}" if slopes[k] is not None else f"{'-':>14}"
      for k in names))
  common = [n for n in sizes if n in rows["uncertainty"]]
  ratio_n = 100_000 if 100_000 in common else (common[-1] if common else None)
  ratio = (rows["uncertainty"][ratio_n] / rows["mmal"][ratio_n]
           if ratio_n else None)
  if ratio:
    print(f"uncertainty / mmal at N={ratio_n:,}: {ratio:.1f}x")
  print(f"\nGreedy k-center step, N={step['n']:,}, D={step['dim']}, float32:\n"
        f"  kernel, one pass per pick   {step['kernel_step_s'] * 1e3:8.2f} ms\n"
        f"  numpy reference             "
        f"{step['numpy_reference_step_s'] * 1e3:8.2f} ms "
        f"({step['speedup_vs_reference']:.1f}x the kernel's time)\n"
        f"  bandwidth floor             {step['floor_step_s'] * 1e3:8.2f} ms "
        f"({step['bytes_read_per_step'] / 1e6:.0f} MB at "
        f"{step['copy_bandwidth_gb_s']:.1f} GB/s numpy copy bandwidth); "
        f"the kernel reaches {step['fraction_of_floor']:.0%} of it\n"
        f"  kernel, up to {step['picks_per_pass']} picks per pass "
        f"{step['batched_pick_s'] * 1e3:8.2f} ms per pick "
        f"({step['batched_speedup_vs_reference']:.1f}x faster than the "
        f"reference)")
  results = {
      "machine": _machine(), "quick": _QUICK.value, "dim": _DIM.value,
      "budget": _BUDGET.value, "coreset_size": _CORESET.value,
      "annotated_fraction": _ANNOTATED.value,
      "seconds_per_round": {k: {str(n): t for n, t in v.items()}
                            for k, v in rows.items()},
      "loglog_slope": slopes,
      "uncertainty_over_mmal": {"n": ratio_n, "ratio": ratio},
      "greedy_step": step}
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  _plot(rows, slopes, os.path.join(_OUT.value, "acquisition_scaling.png"))
  print(f"\nWrote {_OUT.value}/results.json and "
        f"{_OUT.value}/acquisition_scaling.png")


if __name__ == "__main__":
  app.run(main)
