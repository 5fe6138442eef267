r"""Acquisition at the hardware's limit: kernel rates, round cost, memory, compiles.

  python -m mmal_jax.benchmarks.acquisition [--quick] --out DIR

Every timed comparison interleaves its contenders (A B C A B C ...), repeats
`--repeats` (>= 5) times, reports the median and min-max spread, and takes
ratios within each repeat (their median is reported).

Part 1, kernel rates (Q = N in `--rate_sizes`, D = 256, float32,
L2-normalised): `top2_margin` and the min-distance kernel (the cache build:
distance to the nearest of C = Q centers) in GFLOP/s, against a large
`jnp.dot` and a fused `jnp.dot` + row max in the same repeat, and against
FAISS (`faiss-cpu`, optional: `IndexFlatIP.search(k=2)` for top-2,
`IndexFlatL2.search(k=1)` for the nearest center) on the same inputs.

Part 2, seconds per acquisition round of `mmal`, `coreset`, `uncertainty`
and `badge` for N items per modality (two modalities, D = 256, budget 256,
coreset 1024, 1% annotated), embeddings handed over laid out
(`layout.shard_rows`'s contract). `mmal` and `coreset` with the min-distance
cache kept across rounds (update with the previous round's purchases + the
strategy), `mmal` with the cache rebuilt (what retraining forces every round:
the honest figure), and the rebuild alone; log-log slopes over N. The
quadratic strategies (`uncertainty`, `badge`) stop at the first size where
their round is predicted to exceed `--uncertainty_cap` seconds (quadratic
growth from their last size; badge's first size from a timed budget-1 round,
its 2 statistics passes and 1 pick pass, scaled to budget + 2 passes).

Part 3, one greedy k-center step at N = 200k, D = 512, float32: the kernel
(one pass per pick, and up to 16 exact picks per pass) against a float32 numpy
step (`||x||^2 + ||c||^2 - 2 x c` + `np.minimum` + `argmax`: what
google/active-learning and LabelBench do, minus their float64 upcast), the
sklearn `pairwise_distances` step (which upcasts to float64), and the
memory-bandwidth floor: the pool's bytes over the rate of the fastest
read-only pass (jitted max, numpy max, BLAS product with ones) measured in the
same repeat.

Part 4, peak host memory of one `mmal` call at N = `--memory_n`, D = 256, in a
fresh subprocess (VmHWM reset before the call), for laid-out `jax.Array`
embeddings and for host numpy embeddings.

Part 5, compile counts: programs lowered by `mmal` calls whose N, budget and
annotated count change within a power-of-two bucket (target 0).

Prints each target with its measured value and PASS / MISS, writes
DIR/results.json and DIR/acquisition_scaling.png (DIR may be gs://).
"""
from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax import cli
from mmal_jax import fs
from mmal_jax import sharding
from mmal_jax.acquisition import badge as badge_lib
from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition import strategies
from mmal_jax.benchmarks import timing

_PROG = "mmal_jax.benchmarks.acquisition"
_QUICK = flags.DEFINE_bool("quick", False, "Small sizes, for a fast check.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repeats (>= 5).")
_RATE_SIZES = flags.DEFINE_list("rate_sizes", None, "Q = N for part 1.")
_SIZES = flags.DEFINE_list("sizes", None, "Pool sizes N for part 2.")
_DIM = flags.DEFINE_integer("dim", 256, "Embedding dimension, parts 1, 2, 4.")
_BUDGET = flags.DEFINE_integer("budget", 256, "Queries per round.")
_CORESET = flags.DEFINE_integer("coreset_size", 1024, "MMAL coreset size.")
_ANNOTATED = flags.DEFINE_float("annotated", 0.01, "Annotated fraction.")
_UNC_CAP = flags.DEFINE_float(
    "uncertainty_cap", 120.0, "Skip uncertainty and badge at sizes where "
    "their round is predicted to take longer (s).")
_STEP_N = flags.DEFINE_integer("step_n", None, "Pool size, part 3.")
_STEP_DIM = flags.DEFINE_integer("step_dim", 512, "Dimension, part 3.")
_MEMORY_N = flags.DEFINE_integer("memory_n", None, "Pool size, part 4.")
PARTS = ("rates", "rounds", "greedy", "memory", "compiles")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
_MEMORY_PROBE = flags.DEFINE_string(
    "memory_probe", None, "Internal: 'jax' or 'numpy'; run one mmal call and "
    "print its peak memory as JSON.")

FULL = dict(rate_sizes=(20_000, 50_000),
            sizes=(10_000, 30_000, 100_000, 300_000, 1_000_000),
            step_n=200_000, memory_n=1_000_000)
QUICK = dict(rate_sizes=(4_096,), sizes=(2_000, 5_000, 20_000),
             step_n=50_000, memory_n=100_000)

TARGET_RATE_VS_DOT = 0.8
TARGET_TIME_VS_FAISS = 1.25
TARGET_MEMORY = 1.5


_interleaved = timing.interleaved
_stats = timing.stats
_ratios = timing.ratios
_fmt = timing.fmt


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("FAISS comparison skipped: faiss-cpu is not installed (an optional "
          "dependency of this benchmark only: pip install faiss-cpu).")
    return None
  return faiss


def _normalised(n, dim, seed) -> np.ndarray:
  x = np.random.default_rng(seed).standard_normal((n, dim), np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@jax.jit
def _dot(a, b):
  return a @ b.T


@jax.jit
def _dot_max(a, b):
  return jnp.max(a @ b.T, axis=1)


def kernel_rates(n: int, dim: int, mesh, repeats: int) -> dict:
  """Part 1 at Q = N = n."""
  keys_host = _normalised(n, dim, 0)
  queries_host = _normalised(n, dim, 1)
  keys = layout_lib.shard_rows(keys_host, mesh)
  valid = layout_lib.shard_mask(np.ones(n, np.bool_), keys.layout)
  block = layout_lib.DEFAULT_BLOCK
  queries = kernels.host_operand(queries_host, keys, block=block,
                                 name="queries", pool_has="keys have",
                                 normalize=False)
  dot_n = min(n, 8192)
  a, b = jnp.asarray(queries_host[:dot_n]), jnp.asarray(keys_host[:dot_n])
  flops = {"top2_margin": 2. * n * n * dim, "min_distance": 2. * n * n * dim,
           "jnp.dot": 2. * dot_n * dot_n * dim,
           "jnp.dot+max": 2. * dot_n * dot_n * dim}
  contenders = {
      "top2_margin": lambda: kernels.top2_margin_sharded(queries, keys, valid),
      "min_distance": lambda: kernels.min_distance_sharded(keys, queries),
      "jnp.dot": lambda: _dot(a, b),
      "jnp.dot+max": lambda: _dot_max(a, b),
  }
  faiss = _faiss()
  if faiss is not None:
    inner, l2 = faiss.IndexFlatIP(dim), faiss.IndexFlatL2(dim)
    inner.add(keys_host)
    l2.add(queries_host)  # Centers = the queries, as in min_distance above.
    contenders["faiss_top2"] = lambda: inner.search(queries_host, 2)
    contenders["faiss_nearest"] = lambda: l2.search(keys_host, 1)
    flops["faiss_top2"] = flops["faiss_nearest"] = 2. * n * n * dim
    sims, _ = inner.search(queries_host, 2)
    ours = np.asarray(kernels.top2_margin_sharded(queries, keys, valid))[:n]
    agreement = float(np.abs(ours - (sims[:, 0] - sims[:, 1])).max())
  times = _interleaved(contenders, repeats)
  rate = {k: [flops[k] / t / 1e9 for t in v] for k, v in times.items()}
  out = {"n": n, "dim": dim, "seconds": {k: _stats(v) for k, v in
                                         times.items()},
         "gflops": {k: _stats(v) for k, v in rate.items()}}
  for name, ref in (("top2_margin", "faiss_top2"),
                    ("min_distance", "faiss_nearest")):
    out[f"{name}_rate_vs_dot"] = _ratios(rate[name], rate["jnp.dot"])
    out[f"{name}_rate_vs_dot_max"] = _ratios(rate[name], rate["jnp.dot+max"])
    if ref in times:
      out[f"{name}_time_vs_faiss"] = _ratios(times[name], times[ref])
  if faiss is not None:
    out["top2_max_abs_diff_vs_faiss"] = agreement
  return out


# --------------------------------------------------------------------------
# Part 2.


def _laid_out_pool(n, dim, mesh, seed, annotated_fraction, budget):
  """Two modalities of n embeddings, laid out on the mesh (host copy freed)."""
  rng = np.random.default_rng(seed)
  embeddings, annotated = {}, {}
  for m in ("image", "text"):
    x = rng.standard_normal((n, dim), np.float32)
    embeddings[m] = layout_lib.shard_rows(x, mesh).rows
    del x
    annotated[m] = np.zeros(n, np.bool_)
    annotated[m][rng.choice(n, max(1, int(round(annotated_fraction * n))),
                            replace=False)] = True
  # The previous round's purchases: `budget` items among the annotated.
  newly = {m: np.flatnonzero(annotated[m])[:budget] for m in embeddings}
  return embeddings, annotated, newly


def round_costs(sizes, *, dim, budget, coreset_size, annotated_fraction,
                uncertainty_cap, mesh, repeats) -> dict:
  """Part 2: per-round seconds of each strategy for each pool size."""
  names = ("mmal", "mmal_with_rebuild", "cache_rebuild", "coreset",
           "uncertainty", "badge")
  rows = {name: {} for name in names}
  for n in sizes:
    embeddings, annotated, newly = _laid_out_pool(n, dim, mesh, n,
                                                  annotated_fraction, budget)
    before = {m: annotated[m].copy() for m in annotated}
    for m in before:
      before[m][newly[m]] = False
    cache = strategies.build_min_distance_cache(embeddings, before, mesh=mesh)
    common = dict(budget=budget, seed=0, mesh=mesh)

    def cached(name):
      def run():
        updated = strategies.update_min_distance_cache(cache, embeddings,
                                                       newly, mesh=mesh)
        extra = {"coreset_size": coreset_size} if name == "mmal" else {}
        return strategies.STRATEGIES[name](embeddings, annotated,
                                           min_dist=updated, **common, **extra)
      return run

    contenders = {
        "mmal": cached("mmal"),
        "mmal_with_rebuild": lambda: strategies.mmal(
            embeddings, annotated, coreset_size=coreset_size, **common),
        "cache_rebuild": lambda: strategies.build_min_distance_cache(
            embeddings, annotated, mesh=mesh),
        "coreset": cached("coreset"),
    }
    quadratic = {
        "uncertainty": (lambda: strategies.uncertainty(
            embeddings, annotated, **common), lambda: 0.),
        "badge": (lambda: badge_lib.badge(embeddings, annotated, **common),
                  lambda: _badge_guess(embeddings, annotated, common)),
    }
    for name, (run, first_guess) in quadratic.items():
      last = rows[name]
      if len(last) != len(rows["mmal"]):
        continue  # Skipped at a smaller size already.
      last_n = max(last, default=None)
      predicted = (last[last_n]["median"] * (n / last_n) ** 2 if last
                   else first_guess())
      if predicted <= uncertainty_cap:
        contenders[name] = run
    times = _interleaved(contenders, repeats)
    for name, t in times.items():
      rows[name][n] = _stats(t)
    print(f"N={n:>9,}  " + "  ".join(
        f"{k}={v[n]['median']:.3f}s" for k, v in rows.items() if n in v),
          flush=True)
  return rows


def _badge_guess(embeddings, annotated, common) -> float:
  """Predicted seconds of a badge round: a budget-1 round (2 statistics
  passes and 1 pick pass) timed after its compilation, scaled to the budget's
  `budget + 2` passes."""
  probe = lambda: badge_lib.badge(embeddings, annotated,
                                  **dict(common, budget=1))
  jax.block_until_ready(probe())
  start = time.perf_counter()
  jax.block_until_ready(probe())
  return (time.perf_counter() - start) * (common["budget"] + 2) / 3


def _fit_slope(row: dict) -> float | None:
  sizes = sorted(row)
  if len(sizes) < 2:
    return None
  return float(np.polyfit(np.log(sizes),
                          np.log([row[s]["median"] for s in sizes]), 1)[0])


# --------------------------------------------------------------------------
# Part 3.


@jax.jit
def _read_pass(rows):
  return jnp.max(rows)


def greedy_step(n: int, dim: int, mesh, repeats: int) -> dict:
  """Part 3: seconds per greedy k-center pick, kernel vs references vs floor."""
  from sklearn.metrics import pairwise_distances  # Only this benchmark needs it.

  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, dim), np.float32)
  pool = layout_lib.shard_rows(x, mesh)
  eligible = layout_lib.shard_mask(np.ones(n, np.bool_), pool.layout)
  init = kernels.min_distance_sharded(
      pool, kernels.gather_rows(pool, [0]))
  sq = np.einsum("nd,nd->n", x, x)
  ones = np.ones(dim, np.float32)
  dist32 = np.full(n, np.inf, np.float32)
  dist64 = np.full(n, np.inf, np.float64)
  state = {"j": 1}

  def picks(k, per_pass):
    return lambda: kernels.kcenter_greedy_sharded(
        pool, k, eligible=eligible, init_dist=init, picks_per_pass=per_pass)

  def numpy_f32_step():  # One greedy step: new center's distances, min, argmax.
    c = x[state["j"]]
    d = np.sqrt(np.maximum(sq + sq[state["j"]] - 2 * (x @ c), 0))
    np.minimum(dist32, d, out=dist32)
    state["j"] = int(np.argmax(dist32))

  def sklearn_step():
    d = pairwise_distances(x, x[state["j"]:state["j"] + 1]).ravel()
    np.minimum(dist64, d, out=dist64)
    return int(np.argmax(dist64))

  # Pick counts in one power-of-two bucket: the same compiled programs.
  few, many, batch_few, batch_many = 33, 64, 1040, 2048
  per_pass = kernels.resolve_picks_per_pass(kernels.DEFAULT_PICKS_PER_PASS,
                                            pool)
  times = _interleaved({
      "one_pass_few": picks(few, 1), "one_pass_many": picks(many, 1),
      "batched_few": picks(batch_few, per_pass),
      "batched_many": picks(batch_many, per_pass),
      "numpy_f32_step": numpy_f32_step, "sklearn_step": sklearn_step,
      "read_pass_jax": lambda: _read_pass(pool.rows),
      "read_pass_numpy": lambda: np.max(x),
      "read_pass_blas": lambda: x @ ones}, repeats)
  per_pick = [(b - a) / (many - few) for a, b in
              zip(times["one_pass_few"], times["one_pass_many"])]
  batched = [(b - a) / (batch_many - batch_few) for a, b in
             zip(times["batched_few"], times["batched_many"])]
  # The fastest of three read-only passes over the pool: a jitted max, numpy's
  # max (one thread) and BLAS's matrix-vector product with ones (threaded).
  floor = [min(t) for t in zip(times["read_pass_jax"], times["read_pass_numpy"],
                               times["read_pass_blas"])]
  return {
      "n": n, "dim": dim, "bytes_per_pass": x.nbytes,
      "picks_per_pass": per_pass,
      "seconds": {"kernel_one_pass_per_pick": _stats(per_pick),
                  "kernel_batched_per_pick": _stats(batched),
                  "numpy_float32_step": _stats(times["numpy_f32_step"]),
                  "sklearn_float64_step": _stats(times["sklearn_step"]),
                  "bandwidth_floor": _stats(floor)},
      "read_bandwidth_gb_s": _stats([x.nbytes / f / 1e9 for f in floor]),
      "numpy_f32_over_kernel": _ratios(times["numpy_f32_step"], per_pick),
      "sklearn_over_kernel": _ratios(times["sklearn_step"], per_pick),
      "floor_over_kernel": _ratios(floor, per_pick),
      "numpy_f32_over_batched": _ratios(times["numpy_f32_step"], batched)}


# --------------------------------------------------------------------------
# Part 4.


def _status_mb(field: str) -> float:
  value = timing.resident_bytes(field)
  if value is None:
    raise RuntimeError(f"no {field} in /proc/self/status")
  return value / 2**20


def memory_probe(kind: str, n: int, dim: int) -> dict:
  """One mmal call in this (fresh) process; its peak resident memory."""
  mesh = sharding.make_mesh()
  runtime_mb = _status_mb("VmRSS")
  if kind == "jax":
    embeddings, annotated, _ = _laid_out_pool(n, dim, mesh, 0, 0.01, 0)
    jax.block_until_ready(embeddings)
  else:
    rng = np.random.default_rng(0)
    embeddings = {m: rng.standard_normal((n, dim), np.float32)
                  for m in ("image", "text")}
    annotated = {m: rng.random(n) < 0.01 for m in embeddings}
  before_mb = _status_mb("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM, the peak resident set, to the current one.
  strategies.mmal(embeddings, annotated, budget=256, seed=0,
                  coreset_size=1024, mesh=mesh)
  feature_mb = 2 * n * dim * 4 / 2**20
  peak_mb = _status_mb("VmHWM")
  return {"kind": kind, "n": n, "dim": dim, "feature_mb": feature_mb,
          "runtime_mb": runtime_mb, "before_call_mb": before_mb,
          "peak_mb": peak_mb, "peak_over_features": peak_mb / feature_mb,
          "call_over_features": (peak_mb - before_mb) / feature_mb}


def peak_memory(n: int, dim: int) -> dict:
  """Part 4, each input kind in its own subprocess."""
  out = {}
  for kind in ("jax", "numpy"):
    if not os.path.exists("/proc/self/clear_refs"):
      print("Memory probe skipped: needs Linux /proc.")
      return out
    run = subprocess.run(
        [sys.executable, "-m", "mmal_jax.benchmarks.acquisition",
         f"--memory_probe={kind}", f"--memory_n={n}", f"--dim={dim}"],
        capture_output=True, text=True, check=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    out[kind] = json.loads(run.stdout.strip().splitlines()[-1])
  return out


# --------------------------------------------------------------------------
# Part 5.


def compile_counts(mesh, dim: int, scale: int) -> dict:
  """Programs lowered per mmal call as N, budget, annotated count vary in a
  bucket: N in (4096, 8192] / scale, budget in (16, 32] / scale, annotated
  in (64, 128] / scale."""
  from jax import monitoring  # pylint: disable=g-import-not-at-top

  seen = []

  def listen(name, *_, **__):
    if name == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      seen.append(name)

  calls = [(5000, 20, 70), (8192, 32, 128), (4097, 17, 65), (6500, 25, 100)]
  calls = [(-(-n // scale), -(-b // scale), -(-a // scale))
           for n, b, a in calls]
  counts = []
  monitoring.register_event_duration_secs_listener(listen)
  try:
    for n, budget, num_annotated in calls:
      embeddings, annotated, _ = _laid_out_pool(
          n, dim, mesh, n, num_annotated / n, 0)
      start = len(seen)
      strategies.mmal(embeddings, annotated, budget=budget, seed=0, mesh=mesh)
      counts.append(len(seen) - start)
  finally:
    monitoring.unregister_event_duration_listener(listen)
  return {"calls": [dict(n=n, budget=b, annotated=a, compiles=c)
                    for (n, b, a), c in zip(calls, counts)],
          "after_first": int(sum(counts[1:]))}


# --------------------------------------------------------------------------
# Report.


def _plot(rows, slopes, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  styles = {"mmal": "o-", "mmal_with_rebuild": "o--", "coreset": "s-",
            "uncertainty": "^-", "badge": "v-", "cache_rebuild": "x:"}
  for name, row in rows.items():
    if row:
      sizes = sorted(row)
      slope = slopes.get(name)
      label = name if slope is None else f"{name} (slope {slope:.2f})"
      ax.loglog(sizes, [row[s]["median"] for s in sizes], styles[name],
                label=label)
  ax.set_xlabel("pool size N per modality")
  ax.set_ylabel("seconds per acquisition round (median)")
  ax.set_title(f"Acquisition cost ({jax.devices()[0].platform}, "
               f"{jax.device_count()} device(s))")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  fs.write_bytes(path, buffer.getvalue())


def _machine() -> dict:
  with open("/proc/loadavg") as f:
    load = f.read().split()[:3]
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind, "loadavg": load}


_target = timing.target


def _print_rates(rates, repeats):
  print(f"\nKernel rates, GFLOP/s median [min, max] of {repeats} interleaved "
        f"repeats (D={_DIM.value}, float32, Q = N):")
  for r in rates:
    print(f"  Q = N = {r['n']:,}: " + "; ".join(
        f"{k} {_fmt(v, digits=0)}" for k, v in r["gflops"].items()))
    for k in ("top2_margin", "min_distance"):
      faiss_ratio = r.get(f"{k}_time_vs_faiss")
      print(f"    {k}: {_fmt(r[f'{k}_rate_vs_dot'], digits=2)} x jnp.dot's "
            f"rate, {_fmt(r[f'{k}_rate_vs_dot_max'], digits=2)} x fused "
            f"dot+max's" + ("" if faiss_ratio is None else
                            f"; time {_fmt(faiss_ratio, digits=2)} x FAISS's"))


def _print_rounds(rows, slopes, sizes, repeats):
  names = list(rows)
  print(f"\nSeconds per acquisition round, median [min, max] of {repeats} "
        f"(D={_DIM.value}, budget {_BUDGET.value}, coreset {_CORESET.value}, "
        f"{_ANNOTATED.value:.0%} annotated):")
  print(f"{'N':>10} " + " ".join(f"{k:>24}" for k in names))
  for n in sizes:
    print(f"{n:>10,} " + " ".join(
        f"{_fmt(rows[k][n], digits=3):>24}" if n in rows[k] else f"{'-':>24}"
        for k in names))
  print(f"{'slope':>10} " + " ".join(
      f"{slopes[k]:>24.2f}" if slopes[k] is not None else f"{'-':>24}"
      for k in names))


def _print_step(step):
  s = step["seconds"]
  print(f"\nGreedy k-center, ms per pick, N={step['n']:,}, D={step['dim']}, "
        f"float32:\n"
        f"  kernel, one pass per pick        "
        f"{_fmt(s['kernel_one_pass_per_pick'], 1e3, 2)}\n"
        f"  kernel, up to {step['picks_per_pass']} picks per pass   "
        f"{_fmt(s['kernel_batched_per_pick'], 1e3, 2)}\n"
        f"  numpy float32 step               "
        f"{_fmt(s['numpy_float32_step'], 1e3, 2)}"
        f" ({_fmt(step['numpy_f32_over_kernel'], digits=2)} x one-pass)\n"
        f"  sklearn pairwise_distances step  "
        f"{_fmt(s['sklearn_float64_step'], 1e3, 2)}"
        f" (upcasts to float64; {_fmt(step['sklearn_over_kernel'], digits=2)}"
        f" x)\n"
        f"  bandwidth floor (read-only pass) "
        f"{_fmt(s['bandwidth_floor'], 1e3, 2)}"
        f" ({step['bytes_per_pass'] / 1e6:.0f} MB at "
        f"{_fmt(step['read_bandwidth_gb_s'])} GB/s); one-pass kernel at "
        f"{_fmt(step['floor_over_kernel'], digits=2)} of it")


def _print_memory(memory):
  for kind, m in memory.items():
    print(f"\nPeak memory, mmal, {kind} embeddings, N={m['n']:,}: peak RSS "
          f"{m['peak_mb']:.0f} MB for {m['feature_mb']:.0f} MB of features "
          f"({m['peak_over_features']:.2f}x; runtime alone "
          f"{m['runtime_mb']:.0f} MB, before the call {m['before_call_mb']:.0f}"
          f" MB, the call itself +{m['call_over_features']:.2f}x)")


def _targets(results) -> list[dict]:
  print("\nTargets:")
  verdicts = []
  for r in results.get("kernel_rates", []):
    for k in ("top2_margin", "min_distance"):
      v = r[f"{k}_rate_vs_dot"]["median"]
      verdicts.append(_target(f"{k} rate / jnp.dot rate, N={r['n']:,} "
                              f"(>= {TARGET_RATE_VS_DOT})", v,
                              v >= TARGET_RATE_VS_DOT, "x"))
      f = r.get(f"{k}_time_vs_faiss")
      verdicts.append(_target(
          f"{k} time / FAISS time, N={r['n']:,} (<= {TARGET_TIME_VS_FAISS})",
          None if f is None else f["median"],
          None if f is None else f["median"] <= TARGET_TIME_VS_FAISS, "x"))
  for kind, m in results.get("peak_memory", {}).items():
    verdicts.append(_target(
        f"mmal peak memory / feature bytes, {kind} embeddings, "
        f"N={m['n']:,} (<= {TARGET_MEMORY})", m["peak_over_features"],
        m["peak_over_features"] <= TARGET_MEMORY, "x"))
  if "compile_counts" in results:
    after = results["compile_counts"]["after_first"]
    verdicts.append(_target("compiles after the first mmal call within a "
                            "bucket (== 0)", after, after == 0))
  slopes = results.get("loglog_slope", {})
  for name in ("mmal_with_rebuild", "mmal"):
    if slopes.get(name) is not None:
      print(f"  [info] {name} log-log slope over N: {slopes[name]:.2f}")
  return verdicts


def main(argv):
  del argv
  if _MEMORY_PROBE.value:
    print(json.dumps(memory_probe(_MEMORY_PROBE.value, _MEMORY_N.value,
                                  _DIM.value)))
    return
  if not _OUT.value:
    cli.fail(_PROG, "--out is required (a folder for results.json).")
  if _REPEATS.value < 5:
    cli.fail(_PROG, "--repeats must be >= 5.")
  unknown = set(_PARTS.value) - set(PARTS)
  if unknown:
    cli.fail(_PROG, f"unknown --parts {sorted(unknown)}; know {PARTS}.")
  cli.check_output_folder(_PROG, "--out", _OUT.value)
  fs.makedirs(_OUT.value)
  mode = QUICK if _QUICK.value else FULL
  ints = lambda values: [int(v) for v in values]  # noqa: E731
  sizes = ints(_SIZES.value or mode["sizes"])
  repeats = _REPEATS.value
  mesh = sharding.make_mesh()
  machine = _machine()
  print(f"Machine: {machine}", flush=True)
  results = {"machine": machine, "quick": _QUICK.value, "repeats": repeats,
             "dim": _DIM.value, "budget": _BUDGET.value,
             "coreset_size": _CORESET.value,
             "annotated_fraction": _ANNOTATED.value}
  results_path = os.path.join(_OUT.value, "results.json")

  def save_so_far():
    # Rewritten after each part, so a run that is stopped keeps what it measured.
    results["targets"] = _targets(results)
    results["machine"]["loadavg_after"] = _machine()["loadavg"]
    fs.write_text(results_path, json.dumps(results, indent=2))
    print(f"Wrote {results_path}", flush=True)

  if "rates" in _PARTS.value:
    rates = [kernel_rates(n, _DIM.value, mesh, repeats)
             for n in ints(_RATE_SIZES.value or mode["rate_sizes"])]
    _print_rates(rates, repeats)
    results["kernel_rates"] = rates
    save_so_far()
  rows = None
  if "rounds" in _PARTS.value:
    rows = round_costs(sizes, dim=_DIM.value, budget=_BUDGET.value,
                       coreset_size=_CORESET.value,
                       annotated_fraction=_ANNOTATED.value,
                       uncertainty_cap=_UNC_CAP.value, mesh=mesh,
                       repeats=repeats)
    slopes = {name: _fit_slope(row) for name, row in rows.items()}
    _print_rounds(rows, slopes, sizes, repeats)
    results["seconds_per_round"] = {k: {str(n): t for n, t in v.items()}
                                    for k, v in rows.items()}
    results["loglog_slope"] = slopes
    save_so_far()
  if "greedy" in _PARTS.value:
    step = greedy_step(_STEP_N.value or mode["step_n"], _STEP_DIM.value, mesh,
                       repeats)
    _print_step(step)
    results["greedy_step"] = step
    save_so_far()
  if "memory" in _PARTS.value:
    memory = peak_memory(_MEMORY_N.value or mode["memory_n"], _DIM.value)
    _print_memory(memory)
    results["peak_memory"] = memory
    save_so_far()
  if "compiles" in _PARTS.value:
    compiles = compile_counts(mesh, _DIM.value, 8 if _QUICK.value else 1)
    print(f"\nCompiles per mmal call, N/budget/annotated within one bucket: "
          f"{[c['compiles'] for c in compiles['calls']]}")
    results["compile_counts"] = compiles
    save_so_far()
  if rows is not None:
    _plot(rows, results["loglog_slope"],
          os.path.join(_OUT.value, "acquisition_scaling.png"))
    print(f"Wrote {_OUT.value}/acquisition_scaling.png")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser(_PROG))
