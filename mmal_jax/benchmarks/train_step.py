r"""Throughput of the jit-compiled, data-parallel SigLIP training step.

  python -m mmal_jax.benchmarks.train_step                       # CPU default
  python -m mmal_jax.benchmarks.train_step --variant B/16 --text_variant B \
      --res 224 --batch 256 --text_len 64 --vocab_size 32000 --dtype bfloat16

Random inputs, batch sharded over every device (`mmal_jax.sharding`). Prints
one table row (examples/s, step ms, compile s, ...) and with `--out DIR` writes
`DIR/train_step.json`. FLOPs per step come from XLA's cost analysis of the
compiled (per-device) program; achieved TFLOP/s are per device and the peak
fraction uses `--peak_tflops` or the table below (dense bf16, per device).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from mmal_jax import optim
from mmal_jax import sharding
from mmal_jax import train_step
from mmal_jax.models import presets
from mmal_jax.models import two_towers

# Dense bfloat16 peak TFLOP/s per device, matched against `device_kind`.
PEAK_BF16_TFLOPS = {
    "H200": 989., "H100": 989., "A100": 312., "L4": 121., "A10G": 70.,
    "TPU v6 lite": 918., "TPU v5p": 459., "TPU v5 lite": 197., "TPU v4": 275.,
}


def peak_tflops(device: jax.Device, dtype: str) -> float | None:
  """Known dense peak of `device` for bfloat16 compute, else None."""
  if dtype != "bfloat16":
    return None
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name.lower() in device.device_kind.lower():
      return peak
  return None


def run(args: argparse.Namespace) -> dict:
  """Builds, compiles and times the step; returns the measurements."""
  mesh = sharding.make_mesh()
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


def table(result: dict) -> str:
  """A Markdown table of `result`."""
  columns = [("device", "{}"), ("num_devices", "{}"), ("model", "{}"),
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
  parser.add_argument("--remat_policy", default="none")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="per-device peak for the fraction (default: table)")
  parser.add_argument("--out", default=None, help="directory for JSON output")
  args = parser.parse_args()

  result = run(args)
  print(table(result))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
