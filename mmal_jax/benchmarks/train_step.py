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
With `--out DIR` both go to `DIR/train_step.json`. FLOPs per step come from
XLA's cost analysis of the compiled (per-device) program; achieved TFLOP/s
are per device and the peak fraction uses `--peak_tflops` or the table below
(dense bf16, per device).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmal_jax import fs
from mmal_jax import optim
from mmal_jax import sharding
from mmal_jax import train_step
from mmal_jax.benchmarks import peaks
from mmal_jax.models import presets
from mmal_jax.models import two_towers

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


def run(args: argparse.Namespace) -> dict:
  """Builds, compiles and times the step; returns the measurements."""
  mesh = sharding.make_mesh(data=args.mesh_data, fsdp=args.mesh_fsdp)
  config = presets.siglip(
      args.variant, text_variant=args.text_variant, res=args.res,
      text_len=args.text_len, vocab_size=args.vocab_size, dtype=args.dtype,
      scan=args.scan, remat_policy=args.remat_policy)
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
  state = train_step.init_train_state(model, tx, mesh, jax.random.PRNGKey(0),
                                      batch)
  step = train_step.make_train_step(model, tx, mesh, loss="siglip",
                                    loss_method=args.loss_method)

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.)) if cost else 0.

  for _ in range(args.warmup):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / args.steps

  device = jax.devices()[0]
  tflops = flops / step_s / 1e12 if flops else None
  peak = args.peak_tflops or peak_tflops(device, args.dtype)
  return {
      "device": device.device_kind, "num_devices": mesh.size,
      "mesh": {"data": mesh.shape[sharding.DATA_AXIS],
               "fsdp": mesh.shape[sharding.FSDP_AXIS]},
      "state_bytes_per_device": _device0_bytes(state),
      "model": f"ViT-{args.variant} + text {args.text_variant}",
      "res": args.res, "batch": args.batch, "text_len": args.text_len,
      "dtype": args.dtype, "loss_method": args.loss_method,
      "compile_s": compile_s, "step_ms": 1e3 * step_s,
      "examples_per_s": args.batch / step_s,
      "gflop_per_step_per_device": flops / 1e9,
      "tflops_per_device": tflops, "peak_tflops": peak,
      "peak_fraction": tflops / peak if tflops and peak else None,
      "loss": float(metrics["loss"]),
  }


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
             ("compile_s", "{:.1f}"), ("step_ms", "{:.1f}"),
             ("examples_per_s", "{:.1f}"), ("tflops_per_device", "{:.3f}"),
             ("peak_fraction", "{:.1%}")]
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
  parser.add_argument("--remat_policy", default="nothing_saveable")
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
  parser.add_argument("--out", default=None, help="directory for JSON output")
  args = parser.parse_args()

  result = run(args)
  print(table(result))
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
