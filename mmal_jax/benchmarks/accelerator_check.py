r"""One command that checks issue 16's targets on the accelerator at hand.

  python -m mmal_jax.benchmarks.accelerator_check --out DIR [--quick]

Parts, in order, each printing progress as it goes and its targets with
value and PASS / MISS, then rewriting DIR/accelerator_check.json (through
`mmal_jax.fs`, so DIR may be gs://); at the end, rows in the schema of
`benchmarks.compare` go to DIR/compare.jsonl (for `compare --plot`). The
parts that run in subprocesses come first, before this process starts its
accelerator client (JAX's GPU client takes 75% of the device's memory as it
starts, which would leave a child the rest):

1. tests: the kernel tests' device subset (`pytest -k --tests_k` over
   `DEVICE_TEST_FILES`; on a GPU the sharded Pallas tests compile the
   Triton loop form), in a subprocess; PASS when they all pass on this
   backend.
2. memory: the largest N per modality whose `mmal` round (cache rebuilt)
   fits one device. Each of `--memory_sizes` (N = 2^20 and 2^22) runs one
   round in a fresh process that reports its device's peak bytes in use
   (`memory_stats`; CPU: resident set above the runtime's); a line through
   them (bytes = fixed + per-row x padded rows: pools, per-row vectors and
   the cache grow with N, tiles do not) gives the largest N whose padded
   pool fits this device's limit, an 80 GB and a 141 GB device at JAX's
   default GPU memory fraction. A round at the largest N for this device
   then runs, as the check of that figure (devices with memory stats only).
3. train: the train-step benchmark (`benchmarks.train_step`) in a fresh
   process at `--train_flags` (default: ViT-B/16 + text B, res 224, batch
   256 per device, 64 tokens, bfloat16): MFU and the time from that
   process' start to its first step.
4. kernels: top-2 margins and the min-distance kernel (the cache build) at
   Q = N = `--kernel_n`, D = `--dim`, at the API's defaults, against a
   `jnp.dot` of `--dot_n`^3 and a read-only `jnp.max` pass over the pool,
   measured in the same repeats (interleaved). Greedy k-center at N =
   `--greedy_n`: one pass per pick and the default picks per pass, per pick,
   against that read floor.
5. round: an `mmal` round with the min-distance cache rebuilt, two
   modalities of N in `--round_sizes` each, 1% annotated, budget 256,
   coreset 1024; against its matrix products' time at the `jnp.dot` rate.

With `--profile yes` (the default) every timed contender of parts 3-5 is
also traced for 3 calls (`benchmarks.profile`, jax.profiler) into
DIR/profiles/NAME.trace.json.gz (open at ui.perfetto.dev), and one line
per contender gives its busiest lane's busy share of the wall time and top
ops: the evidence of what limits a MISS (also in the JSON, "profiles").

Pools are generated on the devices in the kernels' layout (no host copy),
in bfloat16 on accelerators and float32 on CPU (`--dtype`). Timed
comparisons interleave their contenders, repeat `--repeats` (>= 5) times and
report median [min, max]; ratios are taken within each repeat. `--quick`
runs toy sizes in seconds (a check that everything runs, not a measurement).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mmal_jax import cli
from mmal_jax import fs
from mmal_jax import sharding
from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition import strategies
from mmal_jax.benchmarks import compare
from mmal_jax.benchmarks import profile as profile_lib
from mmal_jax.benchmarks import timing

PARTS = ("tests", "memory", "train", "kernels", "round")
RESULTS_FILE = "accelerator_check.json"
PROFILES_DIR = "profiles"
# The kernel tests that compare picks and distances with the references.
DEVICE_TESTS = ("matches_numpy or exact or ties or products or same_picks "
                "or mmal_matches or uncertainty or through_pallas")
DEVICE_TEST_FILES = ("test_acquisition_kernels.py", "test_strategies.py",
                     "test_pallas_kernels.py")
FULL = dict(kernel_n=131_072, dim=768, dot_n=8192, greedy_n=12_800_000,
            round_sizes=(1_000_000, 4_000_000),
            memory_sizes=(1 << 20, 1 << 22),
            train_flags=("--variant=B/16 --text_variant=B --res=224 "
                         "--batch={batch} --text_len=64 --vocab_size=32000 "
                         "--steps=10 --warmup=2"))
QUICK = dict(kernel_n=1024, dim=64, dot_n=512, greedy_n=20_000,
             round_sizes=(2_000, 4_000), memory_sizes=(1 << 14, 1 << 16),
             train_flags=("--variant=mu/8 --text_variant=mu --res=16 "
                          "--batch={batch} --text_len=8 --steps=2 "
                          "--warmup=1"))
ANNOTATED_FRACTION = 0.01
BUDGET = 256
CORESET_SIZE = 1024

TARGET_RATE_VS_DOT = 0.9
TARGET_ONE_PASS_VS_FLOOR = 1.1
TARGET_DEFAULT_VS_FLOOR = 0.35
TARGET_ROUND_VS_MATMUL = 1.5
TARGET_MFU = 0.45
TARGET_FIRST_STEP_S = 45.0
# Annotated items per modality in a memory probe: the round's memory does
# not grow with them, its time does (the cache rebuild).
MEMORY_PROBE_ANNOTATED = 64
# JAX's GPU allocator takes this fraction of a device's memory unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
JAX_GPU_MEMORY_FRACTION = 0.75
DEVICE_MEMORY_BYTES = {"80 GB device": 80e9, "141 GB device": 141e9}
# Pools of up to 2^(this - 1) rows per modality are considered.
_MAX_LOG2_ROWS = 40


def _progress(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _target(results: dict, name: str, value, ok) -> None:
  results["targets"].append(timing.target(name, value, ok))


def _write(out: str, results: dict) -> None:
  fs.write_text(os.path.join(out, RESULTS_FILE), json.dumps(results, indent=2))


# Rows generated per step of `random_pool`: its float32 temporaries stay
# small next to a pool of millions of rows.
_GENERATE_ROWS = 1 << 16


def random_pool(n: int, dim: int, dtype, mesh, seed: int
                ) -> layout_lib.ShardedRows:
  """`n` unit-norm Gaussian rows generated on the devices, already in the
  kernels' layout (padding rows zero), laid out without a copy. Each device
  writes its own rows, `_GENERATE_ROWS` at a time. Cost: one write of the
  pool."""
  pool = layout_lib.pool_layout(n, mesh, layout_lib.DEFAULT_BLOCK, dim, dtype)
  local_rows = pool.padded_rows // mesh.size
  step = min(local_rows, _GENERATE_ROWS)  # Powers of two: step divides.
  spec = sharding.row_spec()

  def local(key):
    first = layout_lib.first_global_row(local_rows)

    def body(c, out):
      x = jax.random.normal(jax.random.fold_in(key, first + c * step),
                            (step, dim), jnp.float32)
      x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True))
      real = first + c * step + jnp.arange(step) < n
      x = jnp.where(real[:, None], x, 0.).astype(dtype)
      return jax.lax.dynamic_update_slice_in_dim(out, x, c * step, 0)

    return jax.lax.fori_loop(0, local_rows // step, body,
                             jnp.zeros((local_rows, dim), dtype))

  generate = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(),
                                   out_specs=spec, check_vma=False))
  rows = generate(jax.random.PRNGKey(seed))
  return layout_lib.shard_rows(rows, mesh, num_rows=n)


@jax.jit
def _read_pass(rows):
  return jnp.max(rows)


@jax.jit
def _dot(a, b):
  return jnp.dot(a, b.T, preferred_element_type=jnp.float32)


def run_tests(expression: str) -> dict:
  """Part 1: the device subset of the kernel tests, in a subprocess."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  files = [os.path.join(root, "tests", name) for name in DEVICE_TEST_FILES]
  if not all(os.path.exists(f) for f in files):
    return {"ran": False, "passed": None, "summary": "tests/ not found"}
  start = time.perf_counter()
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
       expression, *files], cwd=root, text=True, capture_output=True,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join(
          [root] + [p for p in [os.environ.get("PYTHONPATH")] if p])))
  lines = result.stdout.strip().splitlines()
  return {"ran": True, "passed": result.returncode == 0,
          "summary": lines[-1] if lines else result.stderr[-500:],
          "seconds": time.perf_counter() - start}


def kernel_rates(n: int, dim: int, dot_n: int, greedy_n: int, dtype, mesh,
                 repeats: int, pallas: bool = False,
                 profile_dir: str | None = None) -> dict:
  """Part 4: kernel rates and greedy picks against jnp.dot and a read pass;
  with `pallas`, the kernels' Pallas forms too (`impl="pallas"`; one that
  fails to compile is reported with its error, not timed); with
  `profile_dir`, a profile of every contender (`profile.record`). Each
  half's arrays are freed before the next is made."""
  rates = matmul_rates(n, dim, dot_n, dtype, mesh, repeats, pallas,
                       profile_dir)
  return {**rates, "greedy": greedy_rates(greedy_n, dim, dtype, mesh,
                                          repeats, profile_dir)}


def matmul_rates(n: int, dim: int, dot_n: int, dtype, mesh, repeats: int,
                 pallas: bool, profile_dir: str | None = None) -> dict:
  """Top-2 margins and min-distance at Q = N = `n` (TFLOP/s, and as a
  fraction of `jnp.dot` on `dot_n`^2 x `dim` within each repeat), and a
  read-only pass over the keys (GB/s), interleaved. Memory: two pools of
  n x dim."""
  keys = random_pool(n, dim, dtype, mesh, 0)
  queries = kernels.gather_rows(random_pool(n, dim, jnp.float32, mesh, 1),
                                np.arange(n))
  valid = layout_lib.shard_mask(np.ones(n, np.bool_), keys.layout)
  a = jnp.ones((dot_n, dim), dtype)
  contenders = {
      "top2_margin": lambda: kernels.top2_margin_sharded(queries, keys, valid),
      "min_distance": lambda: kernels.min_distance_sharded(keys, queries)}
  pallas_errors = {}
  if pallas:
    for name, fn in (
        ("top2_margin_pallas", lambda: kernels.top2_margin_sharded(
            queries, keys, valid, impl="pallas")),
        ("min_distance_pallas", lambda: kernels.min_distance_sharded(
            keys, queries, impl="pallas"))):
      try:
        jax.block_until_ready(fn())
        contenders[name] = fn
      except Exception as e:  # pylint: disable=broad-except
        pallas_errors[name] = f"{type(e).__name__}: {str(e)[:500]}"
        _progress(f"{name} failed: {pallas_errors[name][:200]}")
  kernel_names = list(contenders)
  flops = {name: 2. * n * n * dim for name in kernel_names}
  flops["jnp.dot"] = 2. * dot_n * dot_n * dim
  _progress(f"kernels: Q = N = {n:,}, D = {dim}, {jnp.dtype(dtype).name}, "
            f"jnp.dot {dot_n}^2 x {dim}")
  contenders.update({"jnp.dot": lambda: _dot(a, a),
                     "read_pass": lambda: _read_pass(keys.rows)})
  times = timing.interleaved(contenders, repeats)
  tflops = {name: timing.stats(
      [flops[name] / t / 1e12 for t in times[name]]) for name in flops}
  vs_dot = {name: timing.ratios(
      times["jnp.dot"], [t * flops["jnp.dot"] / flops[name]
                         for t in times[name]])
            for name in kernel_names}
  pool_bytes = keys.rows.size * keys.rows.dtype.itemsize
  read_gb_s = timing.stats(
      [pool_bytes / t / 1e9 for t in times["read_pass"]])
  return {"n": n, "dim": dim, "dtype": jnp.dtype(dtype).name, "dot_n": dot_n,
          "tflops": tflops, "rate_vs_dot": vs_dot, "read_gb_s": read_gb_s,
          "pallas_errors": pallas_errors,
          "profiles": profile_lib.record(contenders, profile_dir)}


def greedy_rates(greedy_n: int, dim: int, dtype, mesh, repeats: int,
                 profile_dir: str | None = None) -> dict:
  """Greedy k-center at N = `greedy_n`: seconds per pick with one pass per
  pick and with the default picks per pass (each from the difference of
  two pick counts, so the setup cancels), against a read-only pass over the
  pool (the floor), within each repeat. Memory: one pool of n x dim."""
  _progress(f"greedy k-center: N = {greedy_n:,}, D = {dim}")
  pool = random_pool(greedy_n, dim, dtype, mesh, 2)
  eligible = layout_lib.shard_mask(np.ones(greedy_n, np.bool_), pool.layout)
  init = kernels.min_distance_sharded(pool, kernels.gather_rows(pool, [0]))
  per_pass = kernels.resolve_picks_per_pass(kernels.DEFAULT_PICKS_PER_PASS,
                                            pool)
  # Pick counts in one power-of-two bucket: the same compiled programs.
  few, many = 33, 64
  batch_few, batch_many = 16 * per_pass + 1, 32 * per_pass

  def picks(k, p):
    return lambda: kernels.kcenter_greedy_sharded(
        pool, k, eligible=eligible, init_dist=init, picks_per_pass=p)

  contenders = {
      "one_few": picks(few, 1), "one_many": picks(many, 1),
      "default_few": picks(batch_few, per_pass),
      "default_many": picks(batch_many, per_pass),
      "read_pass": lambda: _read_pass(pool.rows)}
  times = timing.interleaved(contenders, repeats)
  one = [(b - a) / (many - few)
         for a, b in zip(times["one_few"], times["one_many"])]
  default = [(b - a) / (batch_many - batch_few)
             for a, b in zip(times["default_few"], times["default_many"])]
  return {
      "n": greedy_n, "picks_per_pass": per_pass,
      "block": kernels.pool_block(layout_lib.DEFAULT_BLOCK, pool),
      "one_pass_per_pick_s": timing.stats(one),
      "default_per_pick_s": timing.stats(default),
      "read_floor_s": timing.stats(times["read_pass"]),
      "one_pass_vs_floor": timing.ratios(one, times["read_pass"]),
      "default_vs_floor": timing.ratios(default, times["read_pass"]),
      "profiles": profile_lib.record({
          f"greedy_{name}": contenders[name] for name in (
              "one_many", "default_many", "read_pass")}, profile_dir)}


def round_matmul_flops(n: int, dim: int) -> float:
  """Matrix-product flops of one `mmal` round with the cache rebuilt, two
  modalities of n: the rebuild (2 n |S| D each, |S| = 1% annotated), the
  coreset's picks (2 n D each) and its margins against the other modality
  (2 n D per coreset item)."""
  annotated = max(1, round(ANNOTATED_FRACTION * n))
  return 2. * dim * (2 * n * annotated + n * CORESET_SIZE + CORESET_SIZE * n)


def round_inputs(n: int, dim: int, dtype, mesh, num_annotated: int
                 ) -> tuple[dict, dict]:
  """Two laid-out pools of `n` rows (`random_pool`, seeds 0 and 1) and
  `num_annotated` random annotated items of each, as `strategies.mmal`
  takes them."""
  rng = np.random.default_rng(n)
  embeddings, annotated = {}, {}
  for s, m in enumerate(("image", "text")):
    embeddings[m] = random_pool(n, dim, dtype, mesh, s).rows
    annotated[m] = np.zeros(n, np.bool_)
    annotated[m][rng.choice(n, num_annotated, replace=False)] = True
  return embeddings, annotated


def mmal_round(embeddings, annotated, dtype):
  """One `mmal` round with the min-distance cache rebuilt (budget 256,
  coreset 1024)."""
  cache = strategies.build_min_distance_cache(embeddings, annotated,
                                              feature_dtype=dtype)
  return strategies.mmal(embeddings, annotated, budget=BUDGET, seed=0,
                         min_dist=cache, coreset_size=CORESET_SIZE,
                         feature_dtype=dtype)


def round_cost(sizes, dim: int, dtype, mesh, repeats: int,
               dot_tflops: float | None, profile_dir: str | None = None
               ) -> dict:
  """Part 5: seconds per `mmal` round with the cache rebuilt, per size (one
  size's pools are freed before the next is made); with `profile_dir`, a
  profile of the round at each size (`profile.record`)."""
  return {str(n): _round_seconds(n, dim, dtype, mesh, repeats, dot_tflops,
                                 profile_dir)
          for n in sizes}


def _round_seconds(n: int, dim: int, dtype, mesh, repeats: int,
                   dot_tflops: float | None, profile_dir: str | None) -> dict:
  _progress(f"mmal round with cache rebuild: N = {n:,} per modality")
  embeddings, annotated = round_inputs(
      n, dim, dtype, mesh, max(1, round(ANNOTATED_FRACTION * n)))
  contenders = {"round": lambda: mmal_round(embeddings, annotated, dtype)}
  seconds = timing.interleaved(contenders, repeats)["round"]
  flops = round_matmul_flops(n, dim)
  matmul_s = flops / (dot_tflops * 1e12) if dot_tflops else None
  return {"seconds": timing.stats(seconds),
          "matmul_flops": flops, "matmul_s_at_dot_rate": matmul_s,
          "vs_matmul": (timing.stats(
              [s / matmul_s for s in seconds]) if matmul_s else None),
          "profiles": profile_lib.record(
              {f"mmal_round_{n}": contenders["round"]}, profile_dir)}


def memory_probe(n: int, dim: int, dtype) -> dict:
  """Part 2's probe, run in a fresh process: one `mmal` round with the cache
  rebuilt on two pools of `n` rows, and its device's peak bytes in use
  (`memory_stats`; without them, the peak resident set above the runtime's
  own, source "host RSS")."""
  mesh = sharding.make_mesh()
  device = mesh.devices.flat[0]
  runtime = timing.resident_bytes("VmRSS")
  embeddings, annotated = round_inputs(n, dim, dtype, mesh,
                                       min(n, MEMORY_PROBE_ANNOTATED))
  mmal_round(embeddings, annotated, dtype)
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak, limit, source = (stats["peak_bytes_in_use"],
                           stats.get("bytes_limit"), "device")
  else:
    high = timing.resident_bytes("VmHWM")
    peak = None if high is None else high - runtime
    limit, source = None, "host RSS"
  return {"n": n, "padded_rows": int(embeddings["image"].shape[0]),
          "peak_bytes": peak, "limit_bytes": limit, "source": source,
          "device_count": mesh.size, "dtype": jnp.dtype(dtype).name,
          "padded_rows_of_pow2": [layout_lib.pool_layout(
              1 << j, mesh, layout_lib.DEFAULT_BLOCK, dim, dtype).padded_rows
                                  for j in range(_MAX_LOG2_ROWS)]}


def run_memory_probe(n: int, dim: int, dtype: str | None) -> dict:
  """`memory_probe` in a subprocess (a fresh peak; dtype None: the
  backend's default); a probe that fails, out of memory say, returns its
  last error line as "error"."""
  result = subprocess.run(
      [sys.executable, "-m", "mmal_jax.benchmarks.accelerator_check",
       f"--memory_probe={n}", f"--dim={dim}"] +
      ([f"--dtype={dtype}"] if dtype else []),
      text=True, capture_output=True,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
  if result.returncode == 0:
    return json.loads(result.stdout.strip().splitlines()[-1])
  errors = [line for line in result.stderr.splitlines() if "Error" in line]
  return {"n": n, "error": (errors or result.stderr.splitlines() or
                            [f"exit {result.returncode}"])[-1][:500]}


def largest_fitting_rows(budget_bytes: float, fixed_bytes: float,
                         bytes_per_row: float, padded_rows_of_pow2
                         ) -> int | None:
  """The largest padded pool size `p` (one of `padded_rows_of_pow2`, the
  padded rows of a pool of 2^j rows, by j) with `fixed + bytes_per_row * p
  <= budget`; None if none does. Every N up to `p` pads to at most `p`
  rows, so `p` is the largest N that fits. Pure: O(len)."""
  fitting = [p for p in padded_rows_of_pow2
             if fixed_bytes + bytes_per_row * p <= budget_bytes]
  return max(fitting, default=None)


def round_memory(sizes, dim: int, dtype: str | None) -> dict:
  """Part 2: peak device bytes of a round at each of `sizes` (each in a
  fresh process), the line through them, and the largest N per modality
  that fits each budget; then a round at this device's largest N. Starts
  no accelerator client in this process."""
  probes = []
  for n in sizes:
    _progress(f"memory probe: one mmal round at N = {n:,} per modality, "
              "in a fresh process")
    probes.append(run_memory_probe(n, dim, dtype))
    shown = {k: v for k, v in probes[-1].items()
             if k != "padded_rows_of_pow2"}
    _progress(f"  {shown}")
  usable = [p for p in probes if p.get("peak_bytes") is not None]
  out = {"probes": probes}
  if len(usable) < 2:
    return out
  per_row, fixed = np.polyfit([p["padded_rows"] for p in usable],
                              [p["peak_bytes"] for p in usable], 1)
  out.update(source=usable[0]["source"], fixed_bytes=float(fixed),
             bytes_per_padded_row=float(per_row), dtype=usable[0]["dtype"],
             device_count=usable[0]["device_count"])
  if per_row <= 0 or out["source"] != "device":
    return out  # A host's resident set says nothing of a device's bytes.
  budgets = {f"{name} x {JAX_GPU_MEMORY_FRACTION}": size *
             JAX_GPU_MEMORY_FRACTION
             for name, size in DEVICE_MEMORY_BYTES.items()}
  limit = usable[-1]["limit_bytes"]
  if limit:
    budgets["this device's limit"] = limit
  out["budgets"] = budgets
  out["largest_n"] = {
      name: largest_fitting_rows(b, fixed, per_row,
                                 usable[-1]["padded_rows_of_pow2"])
      for name, b in budgets.items()}
  largest = out["largest_n"].get("this device's limit")
  if largest:
    _progress(f"memory check: one mmal round at the largest N for this "
              f"device, {largest:,} per modality")
    check = run_memory_probe(largest, dim, dtype)
    out["check"] = {k: v for k, v in check.items()
                    if k != "padded_rows_of_pow2"}
    out["check_fits"] = ("error" not in check and
                         check["peak_bytes"] <= limit)
  return out


def train_step(flags: list[str], profile_dir: str | None = None) -> dict:
  """Part 3: `benchmarks.train_step` on `flags` in a fresh process (its
  output streamed as it comes), so its time to the first step counts from
  a process start; with `profile_dir`, its profile of 3 steps there."""
  profile = [f"--profile_dir={profile_dir}"] if profile_dir else []
  with tempfile.TemporaryDirectory() as tmp:
    compare.run_python("-m", compare.TRAIN_STEP, *flags, *profile,
                       "--memory_variants=", f"--out={tmp}", stream=True)
    return json.loads(fs.read_text(os.path.join(tmp, "train_step.json")))


def default_dtype(platform: str) -> str:
  """The pools' and train step's dtype unless `--dtype` says: bfloat16 on
  accelerators, float32 on CPU."""
  return "float32" if platform == "cpu" else "bfloat16"


def devices_in_subprocess() -> dict:
  """platform, device_kind and device_count, read by a short-lived
  process, so that this one has not started its accelerator client yet."""
  return json.loads(compare.run_python(
      "-c", "import jax, json; d = jax.devices()[0]; print(json.dumps({"
      "'platform': d.platform, 'device_kind': d.device_kind, "
      "'device_count': jax.device_count()}))").strip().splitlines()[-1])


def compare_rows(results: dict, machine: dict) -> list[dict]:
  """`results` as rows of `benchmarks.compare` (its compare.jsonl schema),
  against `machine`'s peaks (`compare.probe`)."""
  rows = []
  rates = results.get("kernels")
  if rates:
    peak = compare._total_peak(machine, "peak_tflops")  # pylint: disable=protected-access
    for name in rates["tflops"]:
      tflops = rates["tflops"][name]["median"]
      n = rates["dot_n"] if name == "jnp.dot" else rates["n"]
      rows.append(compare._row(  # pylint: disable=protected-access
          machine, f"accelerator_check/{name}", n=n, d=rates["dim"],
          dtype=rates["dtype"], seconds=2. * n * n * rates["dim"] / (
              tflops * 1e12), achieved=tflops,
          unit="TFLOP/s", peak=peak,
          fraction_of_peak=tflops / peak if peak else None))
    greedy = rates["greedy"]
    for name in ("one_pass_per_pick_s", "default_per_pick_s"):
      rows.append(compare._row(  # pylint: disable=protected-access
          machine, f"accelerator_check/greedy_{name[:-2]}", n=greedy["n"],
          d=rates["dim"], dtype=rates["dtype"],
          seconds=greedy[name]["median"]))
  for n, r in (results.get("round") or {}).items():
    rows.append(compare._row(  # pylint: disable=protected-access
        machine, "accelerator_check/mmal_round_rebuild", n=int(n),
        d=results["dim"], dtype=results["dtype"],
        seconds=r["seconds"]["median"]))
  if results.get("train"):
    rows += compare.train_step_rows(results["train"], machine)
  return rows


def _sizes(text: str) -> tuple[int, ...]:
  """`--*_sizes`: comma-separated whole numbers >= 1."""
  try:
    sizes = tuple(int(n) for n in text.split(","))
  except ValueError:
    sizes = ()
  if not sizes or min(sizes) < 1:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a comma-separated list of whole numbers >= 1")
  return sizes


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=cli.output_folder,
                      help="folder of accelerator_check.json (local or gs://)")
  parser.add_argument("--quick", action="store_true",
                      help="toy sizes: checks that everything runs")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated, of {PARTS}")
  parser.add_argument("--repeats", type=int, default=5,
                      help="interleaved repeats (>= 5)")
  parser.add_argument("--dtype", default=None,
                      choices=["float32", "bfloat16"],
                      help="pool and train dtype (default: bfloat16 on "
                      "accelerators, float32 on CPU)")
  parser.add_argument("--pallas", default=None, choices=["yes", "no"],
                      help="also time the Pallas kernels (default: yes on "
                      "accelerators; CPU runs them interpreted)")
  parser.add_argument("--profile", default="yes", choices=["yes", "no"],
                      help="trace each timed contender (jax.profiler) into "
                      "DIR/profiles/NAME.trace.json.gz and print its "
                      "busiest lane and top ops: what limits a MISS")
  parser.add_argument("--tests_k", default=DEVICE_TESTS,
                      help="pytest -k expression of the device tests")
  for name in ("kernel_n", "dim", "dot_n", "greedy_n"):
    parser.add_argument(f"--{name}", type=int, default=None)
  parser.add_argument("--round_sizes", type=_sizes, default=None,
                      help="comma-separated N per modality")
  parser.add_argument("--memory_sizes", type=_sizes, default=None,
                      help="comma-separated N per modality of the memory "
                      "probes (at least two)")
  parser.add_argument("--memory_probe", type=int, default=None,
                      help="internal: run one memory probe at this N and "
                      "print it as JSON")
  parser.add_argument("--train_flags", default=None,
                      help="flags of benchmarks.train_step ({batch}: 256 "
                      "per device; quick: 8)")
  args = parser.parse_args(argv)
  if args.out is None and args.memory_probe is None:
    parser.error("--out is required")
  if args.memory_sizes and len(args.memory_sizes) < 2:
    parser.error("--memory_sizes needs at least two sizes (a line through "
                 "their peaks)")
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown:
    parser.error(f"unknown --parts {sorted(unknown)}; know {PARTS}")
  if args.repeats < 5:
    parser.error("--repeats must be >= 5")
  return args


def main(argv=None):
  args = parse_args(argv)
  mode = QUICK if args.quick else FULL
  dim = args.dim or mode["dim"]
  if args.memory_probe is not None:
    print(json.dumps(memory_probe(args.memory_probe, dim, args.dtype or
                                  default_dtype(jax.devices()[0].platform))))
    return
  parts = args.parts.split(",")
  fs.makedirs(args.out)
  profile_dir = (os.path.join(args.out, PROFILES_DIR)
                 if args.profile == "yes" else None)
  # The parts run in subprocesses come first, before this process starts
  # its accelerator client: JAX's GPU client takes 75% of the device's
  # memory as it starts, which would leave a child the rest.
  devices = devices_in_subprocess()
  dtype = args.dtype or default_dtype(devices["platform"])
  results = {
      **devices, "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "loadavg": os.getloadavg(), "quick": args.quick, "dtype": dtype,
      "repeats": args.repeats, "dim": dim, "targets": []}
  _progress(f"Accelerator check on {devices['device_count']} x "
            f"{devices['device_kind']} ({devices['platform']}), jax "
            f"{jax.__version__}, {dtype}, load {results['loadavg']}")
  if args.quick:
    _progress("--quick: toy sizes; the verdicts below are not measurements")
  if "tests" in parts:
    _progress(f"kernel tests, -k {args.tests_k!r}")
    tests = run_tests(args.tests_k)
    _progress(f"tests: {tests['summary']}")
    results["tests"] = tests
    _target(results, "kernel tests pass on this device", None,
            tests["passed"])
    _write(args.out, results)
  if "memory" in parts:
    sizes = args.memory_sizes or mode["memory_sizes"]
    memory = round_memory(sizes, dim, dtype)
    results["memory"] = memory
    if "bytes_per_padded_row" in memory:
      print(f"  round peak = {memory['fixed_bytes'] / 1e9:.3g} GB + "
            f"{memory['bytes_per_padded_row']:.0f} B x padded rows per "
            f"modality ({memory['source']}, {memory['device_count']} "
            f"device(s), {dtype}, D = {dim})")
    for name, n in (memory.get("largest_n") or {}).items():
      shown = "none" if n is None else f"{n:,}"
      print(f"  largest N per modality, {name} "
            f"({memory['budgets'][name] / 1e9:.1f} GB): {shown}")
    largest = (memory.get("largest_n") or {}).get("this device's limit")
    _target(results, "mmal round fits this device at the largest N "
            "predicted for it", largest, memory.get("check_fits"))
    _write(args.out, results)
  if "train" in parts:
    batch = devices["device_count"] * (8 if args.quick else 256)
    flags = shlex.split((args.train_flags or mode["train_flags"]).format(
        batch=batch)) + [f"--dtype={dtype}"]
    _progress(f"train step: {' '.join(flags)}")
    step = train_step(flags, profile_dir)
    results["train"] = step
    mfu = step.get("mfu", step.get("peak_fraction"))
    _target(results, f"train step fraction of peak >= {TARGET_MFU}", mfu,
            None if mfu is None else mfu >= TARGET_MFU)
    _target(results, f"train step: first step within {TARGET_FIRST_STEP_S}"
            " s of its process' start", step["first_step_s"],
            step["first_step_s"] <= TARGET_FIRST_STEP_S)
    _write(args.out, results)
  mesh = sharding.make_mesh()
  dot_tflops = None
  if "kernels" in parts:
    pallas = (devices["platform"] != "cpu" if args.pallas is None
              else args.pallas == "yes")
    rates = kernel_rates(args.kernel_n or mode["kernel_n"], dim,
                         args.dot_n or mode["dot_n"],
                         args.greedy_n or mode["greedy_n"], dtype, mesh,
                         args.repeats, pallas, profile_dir)
    results["kernels"] = rates
    dot_tflops = rates["tflops"]["jnp.dot"]["median"]
    fmt = timing.fmt
    for name, s in rates["tflops"].items():
      print(f"  {name:14s} {fmt(s, digits=2)} TFLOP/s")
    print(f"  read pass      {fmt(rates['read_gb_s'])} GB/s")
    greedy = rates["greedy"]
    print(f"  greedy per pick: one pass "
          f"{fmt(greedy['one_pass_per_pick_s'], 1e3, 3)} ms, default "
          f"({greedy['picks_per_pass']} per pass) "
          f"{fmt(greedy['default_per_pick_s'], 1e3, 3)} ms, read floor "
          f"{fmt(greedy['read_floor_s'], 1e3, 3)} ms")
    for name in rates["rate_vs_dot"]:
      ratio = rates["rate_vs_dot"][name]["median"]
      _target(results, f"{name} rate / jnp.dot rate >= {TARGET_RATE_VS_DOT}",
              ratio, ratio >= TARGET_RATE_VS_DOT)
    one = greedy["one_pass_vs_floor"]["median"]
    _target(results, f"greedy one pass per pick / read floor <= "
            f"{TARGET_ONE_PASS_VS_FLOOR}", one,
            one <= TARGET_ONE_PASS_VS_FLOOR)
    default = greedy["default_vs_floor"]["median"]
    _target(results, f"greedy default per pick / read floor <= "
            f"{TARGET_DEFAULT_VS_FLOOR}", default,
            default <= TARGET_DEFAULT_VS_FLOOR)
    _write(args.out, results)
  if "round" in parts:
    sizes = args.round_sizes or mode["round_sizes"]
    rounds = round_cost(sizes, dim, dtype, mesh, args.repeats, dot_tflops,
                        profile_dir)
    results["round"] = rounds
    for n, r in rounds.items():
      print(f"  N = {int(n):,}: "
            f"{timing.fmt(r['seconds'], digits=3)} s per round")
    largest = rounds[str(max(sizes))]["vs_matmul"]
    _target(results, f"mmal round (cache rebuilt, N = {max(sizes):,}) / "
            f"matmul time at the jnp.dot rate <= {TARGET_ROUND_VS_MATMUL}",
            largest and largest["median"],
            None if largest is None
            else largest["median"] <= TARGET_ROUND_VS_MATMUL)
    _write(args.out, results)
  machine = compare.probe(args.quick, dtype)
  machine.update(quick=args.quick, date=results["date"])
  rows = compare_rows(results, machine)
  compare.append_rows(os.path.join(args.out, compare.ROWS_FILE), rows)
  _progress(f"appended {len(rows)} rows to "
            f"{os.path.join(args.out, compare.ROWS_FILE)} "
            f"(python -m mmal_jax.benchmarks.compare --plot --out DIR)")
  print("\nTargets:")
  for t in results["targets"]:
    shown = "-" if t["value"] is None else f"{t['value']:.3g}"
    print(f"  [{t['verdict']}] {t['target']}: {shown}")
  _progress(f"wrote {os.path.join(args.out, RESULTS_FILE)}")


if __name__ == "__main__":
  main()
