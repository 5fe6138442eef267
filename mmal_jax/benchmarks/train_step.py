r"""Throughput of the jit-compiled, sharded SigLIP training step, and memory.

  python -m mmal_jax.benchmarks.train_step                       # CPU default
  python -m mmal_jax.benchmarks.train_step --variant B/16 --text_variant B \
      --res 224 --batch 256 --text_len 64 --vocab_size 32000 --dtype bfloat16 \
      --mesh_data -1 --mesh_fsdp 8

Random inputs, batch sharded over every device, parameters and optimizer
state over the mesh's `fsdp` axis (`--mesh_data` x `--mesh_fsdp`, -1 = the
rest; `mmal_jax.sharding`). Prints one table row (examples/s, step ms, compile
s, ...) and a memory table: bytes per device of parameters + optimizer state
of the SigLIP B/16, So400m/14 and g/14 presets at fsdp = 1, 8, 256, computed
from `jax.eval_shape` and the sharding rule (no allocation, any fsdp size).
With `--out DIR` (a local path or gs://, through `mmal_jax.fs`) both go to
`DIR/train_step.json`.

Progress lines (seconds since the imports began) mark the one-program state
init, the compile, each warm-up and timed step; the step time is the median
of the timed steps (min and max beside it). FLOPs: model FLOPs counted from
the towers' shapes (`mmal_jax.flops`, forward x3) give model TFLOP/s per
device and MFU against the device's dense bf16 peak (`peaks.PEAKS`, or
`--peak_tflops`); XLA's cost analysis of the compiled per-device program is a
second, labelled figure (it misses cuBLAS custom calls and counts a scanned
layer once). Issue #16's targets (B/16 MFU, time to first step) print with
PASS / MISS, SKIP for other configurations. Compiled programs persist across
runs (`mmal_jax.compile_cache`; `--compilation_cache`).
"""
from __future__ import annotations

import time

_START = time.perf_counter()  # Time to first step counts the imports too.

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax import cli
from mmal_jax import compile_cache
from mmal_jax import flops
from mmal_jax import fs
from mmal_jax import optim
from mmal_jax import sharding
from mmal_jax import train_step
from mmal_jax.benchmarks import peaks
from mmal_jax.benchmarks import profile as profile_lib
from mmal_jax.models import presets
from mmal_jax.models import two_towers
# pylint: enable=g-import-not-at-top,wrong-import-position


def peak_tflops(device: jax.Device, dtype: str) -> float | None:
  """Known dense peak of `device` for bfloat16 compute (`peaks.PEAKS`),
  else None."""
  peak = peaks.device_peak(device.device_kind)
  return peak[0] if peak and dtype == "bfloat16" else None


MEMORY_VARIANTS = ("B/16", "So400m/14", "g/14")
MEMORY_FSDP = (1, 8, 256)


def state_memory(variant: str, fsdp_sizes=MEMORY_FSDP, *, scan: bool = True,
                 res: int = 224, text_len: int = 64) -> dict:
  """Bytes per device of a SigLIP preset's parameters + optimizer state.

  The train state of `presets.siglip(variant)` (same-variant text tower,
  c4_en vocabulary) from `jax.eval_shape`, laid out by `sharding.fsdp_spec`
  at each fsdp size (big_vision's 4 MiB minimum). `scan` stacks the blocks
  (one leaf per parameter kind, as big_vision trains large towers), which
  lets the rule shard arrays that are under 4 MiB per block. No allocation.
  """
  config = presets.siglip(variant, res=res, text_len=text_len, scan=scan)
  model = two_towers.Model(**config.model)
  params = jax.eval_shape(
      model.init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, text_len), jnp.int32))["params"]
  state = train_step.state_shapes(optim.make_optimizer(config.optim, params),
                                  params)
  return {
      "variant": variant, "scan": scan,
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "bytes_per_device": {str(f): sharding.bytes_per_device(state, f)
                           for f in fsdp_sizes},
      "bytes_params_per_device": {str(f): sharding.bytes_per_device(params, f)
                                  for f in fsdp_sizes}}


def memory_table(rows: list[dict]) -> str:
  """Markdown table of `state_memory` rows, GiB per device."""
  sizes = list(rows[0]["bytes_per_device"])
  lines = ["| model | layout | params | " + " | ".join(
      f"fsdp={f} GiB/device" for f in sizes) + " |",
           "|" + "---|" * 3 + "---:|" * len(sizes)]
  for row in rows:
    cells = [f"{row['bytes_per_device'][f] / 2**30:.3f}" for f in sizes]
    lines.append(f"| SigLIP {row['variant']} | "
                 f"{'scan' if row['scan'] else 'unrolled'} | "
                 f"{row['params'] / 1e6:.0f}M | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _progress(message: str) -> None:
  """One progress line, seconds since the benchmark's imports began."""
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


def _timed(fn, *args):
  """(fn(*args) with its outputs ready, seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
  """Builds, compiles and times the step; returns the measurements.

  Prints a progress line per phase and per step. Model FLOPs are counted
  from the towers' shapes (`mmal_jax.flops`): `model_tflops_per_device` and
  `mfu` (against the device's dense bf16 peak) use them; XLA's cost analysis
  of the compiled per-device program is reported beside them as
  `xla_tflops_per_device` (it misses products it cannot see: cuBLAS custom
  calls on GPU, a scanned layer counted once).
  """
  cache = compile_cache.enable(args.compilation_cache)
  mesh = sharding.make_mesh(data=args.mesh_data, fsdp=args.mesh_fsdp)
  device = jax.devices()[0]
  _progress(f"{mesh.size} x {device.device_kind}, mesh "
            f"{mesh.shape[sharding.DATA_AXIS]}x{mesh.shape[sharding.FSDP_AXIS]}"
            f", load average {os.getloadavg()[0]:.2f}, compilation cache "
            f"{cache or 'off'}")
  config = presets.siglip(
      args.variant, text_variant=args.text_variant, res=args.res,
      text_len=args.text_len, vocab_size=args.vocab_size, dtype=args.dtype,
      scan=args.scan, remat_policy=args.remat_policy,
      attention=args.attention)
  model = two_towers.Model(**config.model)
  rng = np.random.default_rng(0)
  host_batch = {
      "image": rng.normal(size=(args.batch, args.res, args.res, 3)).astype(
          np.float32),
      "text": rng.integers(0, args.vocab_size, (args.batch, args.text_len),
                           dtype=np.int32)}
  batch = {k: sharding.put_global(v, sharding.row_sharding(mesh))
           for k, v in host_batch.items()}
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["image"],
                          batch["text"])["params"]
  tx = optim.make_optimizer(config.optim, shapes)
  _progress("initialising parameters + optimizer state (one program)")
  state, init_s = _timed(train_step.init_train_state, model, tx, mesh,
                         jax.random.PRNGKey(0), batch)
  _progress(f"initialised in {init_s:.1f} s; compiling the step")
  step = train_step.make_train_step(model, tx, mesh, loss="siglip",
                                    loss_method=args.loss_method)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  _progress(f"compiled in {compile_s:.1f} s")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.)) if cost else 0.

  first_step_s = None
  for i in range(args.warmup):
    (state, _), seconds = _timed(compiled, state, batch)
    first_step_s = first_step_s or time.perf_counter() - _START
    _progress(f"warm-up step {i + 1}/{args.warmup}: {1e3 * seconds:.1f} ms")
  times = []
  for i in range(args.steps):
    (state, metrics), seconds = _timed(compiled, state, batch)
    first_step_s = first_step_s or time.perf_counter() - _START
    times.append(seconds)
    _progress(f"step {i + 1}/{args.steps}: {1e3 * seconds:.1f} ms")
  step_s = float(np.median(times))
  profile = None
  if args.profile_dir:
    carried = [state]

    def one_step():
      carried[0], step_metrics = compiled(carried[0], batch)
      return step_metrics

    profile = profile_lib.record({"train_step": one_step},
                                 args.profile_dir)["train_step"]
    state = carried[0]  # The step donates its input state.

  counted = flops.train_step_flops(
      config.model.to_dict(), "siglip", args.batch, (args.res, args.res, 3),
      (args.text_len,), locked_tower=config.optim.get("locked_tower"))
  model_tflops = counted["step"] / mesh.size / step_s / 1e12
  xla_tflops = xla_flops / step_s / 1e12 if xla_flops else None
  peak = args.peak_tflops or peak_tflops(device, args.dtype)
  return {
      "device": device.device_kind, "num_devices": mesh.size,
      "mesh": {"data": mesh.shape[sharding.DATA_AXIS],
               "fsdp": mesh.shape[sharding.FSDP_AXIS]},
      "loadavg": list(os.getloadavg()), "jax": jax.__version__,
      "compilation_cache": cache,
      "state_bytes_per_device": _device0_bytes(state),
      "model": f"ViT-{args.variant} + text {args.text_variant}",
      "res": args.res, "batch": args.batch, "text_len": args.text_len,
      "dtype": args.dtype, "loss_method": args.loss_method,
      "scan": args.scan, "remat_policy": args.remat_policy,
      "attention": args.attention,
      "init_s": init_s, "compile_s": compile_s,
      "first_step_s": first_step_s,
      "step_ms": 1e3 * step_s,
      "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
      "examples_per_s": args.batch / step_s,
      "model_gflop_per_step": counted["step"] / 1e9,
      "model_gflop_forward_per_example": {
          "image": counted["image_forward"] / 1e9,
          "text": counted["text_forward"] / 1e9},
      "model_tflops_per_device": model_tflops,
      "peak_tflops": peak,
      "mfu": model_tflops / peak if peak else None,
      "xla_gflop_per_step_per_device": xla_flops / 1e9,
      "xla_tflops_per_device": xla_tflops,
      "loss": float(metrics["loss"]),
      "profile": profile,
  }


# Issue #16's targets for SigLIP B/16 + B text, 224 px, bf16, on an
# H100/H200-class GPU.
TARGET_MFU = 0.45
TARGET_FIRST_STEP_S = 45.


def targets(result: dict) -> list[tuple[str, str, str]]:
  """(target, value, PASS / MISS / SKIP) rows; SKIP where the run is not
  the B/16 bf16 configuration on a device with a known peak."""
  applies = (result["model"] == "ViT-B/16 + text B" and result["res"] == 224
             and result["dtype"] == "bfloat16" and result["mfu"] is not None)
  mfu, first = result["mfu"], result["first_step_s"]
  return [
      (f"B/16 step MFU >= {TARGET_MFU:.0%} (model FLOPs)",
       "n/a" if mfu is None else f"{mfu:.1%}",
       "SKIP" if not applies else "PASS" if mfu >= TARGET_MFU else "MISS"),
      (f"B/16 first step within {TARGET_FIRST_STEP_S:.0f} s of start",
       f"{first:.1f} s",
       "SKIP" if not applies else
       "PASS" if first <= TARGET_FIRST_STEP_S else "MISS")]


def _device0_bytes(tree) -> int:
  """Bytes of `tree`'s arrays held by the first local device."""
  device = jax.local_devices()[0]
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree)
             for shard in x.addressable_shards if shard.device == device)


def table(result: dict) -> str:
  """A Markdown table of `result`."""
  result = {**result, "mesh": "{data}x{fsdp}".format(**result["mesh"])}
  columns = [("device", "{}"), ("mesh", "{}"), ("model", "{}"),
             ("res", "{}"), ("batch", "{}"), ("dtype", "{}"),
             ("compile_s", "{:.1f}"), ("first_step_s", "{:.1f}"),
             ("step_ms", "{:.1f}"), ("examples_per_s", "{:.1f}"),
             ("model_tflops_per_device", "{:.3f}"), ("mfu", "{:.1%}"),
             ("xla_tflops_per_device", "{:.3f}")]
  cells = [fmt.format(result[k]) if result[k] is not None else "n/a"
           for k, fmt in columns]
  return "\n".join(["| " + " | ".join(k for k, _ in columns) + " |",
                    "|" + "---|" * len(columns),
                    "| " + " | ".join(cells) + " |"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="Ti/16")
  parser.add_argument("--text_variant", default="Ti")
  parser.add_argument("--res", type=int, default=64)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--text_len", type=int, default=16)
  parser.add_argument("--vocab_size", type=int, default=259)
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--loss_method", default="all_gather",
                      choices=["all_gather", "ring"])
  parser.add_argument("--scan", action="store_true")
  parser.add_argument("--remat_policy", default="nothing_saveable",
                      help="with --scan: a jax.checkpoint_policies name or "
                      "'none' (see models/common.py)")
  parser.add_argument("--attention", default="xla", choices=["xla", "fused"],
                      help="'fused': jax.nn.dot_product_attention (cuDNN "
                      "flash attention where the backend has it)")
  parser.add_argument("--compilation_cache", default=None,
                      help="persistent compilation cache folder, 'off' to "
                      "disable (default: mmal_jax.compile_cache's choice)")
  parser.add_argument("--mesh_data", type=int, default=-1,
                      help="mesh data axis size (-1: the rest)")
  parser.add_argument("--mesh_fsdp", type=int, default=1,
                      help="mesh fsdp axis size (-1: the rest)")
  parser.add_argument("--memory_variants", default=",".join(MEMORY_VARIANTS),
                      help="SigLIP presets of the memory table")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="per-device peak for the fraction (default: table)")
  parser.add_argument("--profile_dir", default=None, type=cli.output_folder,
                      help="trace 3 steps (jax.profiler) into "
                      "DIR/train_step.trace.json.gz and print the busiest "
                      "lane's top ops (local or gs://)")
  parser.add_argument("--out", default=None, type=cli.output_folder,
                      help="directory for JSON output (local or gs://)")
  args = parser.parse_args()

  result = run(args)
  print(table(result))
  print(f"step {result['step_ms']:.1f} ms median of {args.steps} "
        f"(min {result['step_ms_min']:.1f}, max {result['step_ms_max']:.1f});"
        f" model FLOPs {result['model_gflop_per_step']:.4g} GFLOP per step "
        f"(mmal_jax.flops); XLA cost analysis "
        f"{result['xla_gflop_per_step_per_device']:.4g} GFLOP per device "
        f"(second figure: misses custom calls and scanned layers)")
  result["targets"] = [dict(target=t, value=v, verdict=k)
                       for t, v, k in targets(result)]
  print("Targets:")
  for row in result["targets"]:
    print(f"  {row['target']}: {row['value']} {row['verdict']}")
  result["memory"] = [state_memory(v, scan=scan)
                      for v in args.memory_variants.split(",") if v
                      for scan in (True, False)]
  if result["memory"]:
    print("\nParameters + optimizer state per device (from shapes):")
    print(memory_table(result["memory"]))
  if args.out:
    fs.write_text(os.path.join(args.out, "train_step.json"),
                  json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
