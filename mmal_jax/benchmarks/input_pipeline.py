r"""Images/s of the tf.data input pipeline vs the PIL path, on the same JPEGs.

  python -m mmal_jax.benchmarks.input_pipeline            # 256 JPEGs, 7 repeats
  python -m mmal_jax.benchmarks.input_pipeline --images COCO_MINI/val2017
  python -m mmal_jax.benchmarks.input_pipeline --quick    # seconds, for tests

Both contenders turn the same JPEG files (written to a temporary folder:
photo-like content, 256-640 px a side, quality 90; or the files of
`--images`) into float32 `(batch, res, res, 3)` host batches in [-1, 1]:

  pil       `preprocess.item_batches` + `preprocess.prepare_items` (one
            thread: PIL decode, antialiased bilinear resize), today's path;
  pipeline  `data.pipeline.host_batches` with `decode|resize(res)|
            value_range(-1, 1)` (tf.data: parallel decode and resize,
            prefetch), what `train_batches` / `embed_pool` read with.

Each repeat times pil then pipeline over every image (A B A B ...; one
untimed warm-up pass each first); reported: median and min-max images/s over
the repeats, and the median of the per-repeat ratios. The target (pipeline
at least `--target` x the PIL path's images/s) is printed with PASS or MISS.
`--out DIR` writes `DIR/input_pipeline.json`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from mmal_jax import fs
from mmal_jax.data import pipeline
from mmal_jax.data import preprocess
from mmal_jax.data.pool import FileRefs, UnalignedPool


def write_jpegs(folder: str, num: int, seed: int, min_side: int,
                max_side: int) -> list[str]:
  """`num` photo-like JPEGs (smooth colour fields plus fine noise, sides
  uniform in [min_side, max_side]) in `folder`; returns their names."""
  rng = np.random.default_rng(seed)
  names = []
  for k in range(num):
    h, w = rng.integers(min_side, max_side + 1, 2)
    coarse = rng.integers(0, 256, (8, 8, 3), np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC),
                       np.float32)
    image += rng.normal(0, 12, image.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=90)
    names.append(f"{k:05d}.jpg")
    fs.write_bytes(os.path.join(folder, names[-1]), buf.getvalue())
  return names


def _pil(pool, res, batch):
  prepare = lambda m, idx: preprocess.prepare_items(pool, m, idx,
                                                    image_size=res)
  n = 0
  for inputs, valid in preprocess.item_batches(
      "image", np.arange(pool.num_items("image")), batch, prepare):
    assert inputs.shape[1:] == (res, res, 3)
    n += valid
  return n


def _tfdata(pool, res, batch):
  n = 0
  for inputs in pipeline.host_batches(
      pool, "image", np.arange(pool.num_items("image")),
      f"decode|resize({res})|value_range(-1, 1)", batch).as_numpy_iterator():
    assert inputs.shape[1:] == (res, res, 3)
    n += len(inputs)
  return n


CONTENDERS = {"pil": _pil, "pipeline": _tfdata}


def machine() -> dict:
  """The host the figures were measured on."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:  # Not a project path.
      model = next(line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": model, "cpu_count": os.cpu_count(),
          "platform": platform.platform()}


def run(args: argparse.Namespace) -> dict:
  """Times the contenders, interleaved; returns the measurements."""
  with tempfile.TemporaryDirectory() as tmp:
    if args.images:
      folder = args.images
      names = sorted(n for n in fs.listdir(folder)
                     if n.lower().endswith((".jpg", ".jpeg")))[:args.num]
    else:
      folder = tmp
      names = write_jpegs(tmp, args.num, 0, args.min_side, args.max_side)
    pool = UnalignedPool(items={"image": FileRefs(folder, names)})
    sizes = [Image.open(os.path.join(folder, n)).size for n in names[:64]]
    for fn in CONTENDERS.values():   # Warm-up: imports, tracing, file cache.
      fn(pool, args.res, args.batch)
    rates = {name: [] for name in CONTENDERS}
    for _ in range(args.repeats):
      for name, fn in CONTENDERS.items():
        start = time.perf_counter()
        count = fn(pool, args.res, args.batch)
        rates[name].append(count / (time.perf_counter() - start))
  ratios = [p / q for p, q in zip(rates["pipeline"], rates["pil"])]
  return {
      "machine": machine(), "num_images": len(names), "res": args.res,
      "batch": args.batch, "repeats": args.repeats,
      "source": args.images or f"generated {args.min_side}-{args.max_side} px",
      "mean_side_px": float(np.mean(sizes)),
      "images_per_s": {k: {"median": statistics.median(v), "min": min(v),
                           "max": max(v), "all": v} for k, v in rates.items()},
      "ratio": {"median": statistics.median(ratios), "min": min(ratios),
                "max": max(ratios)},
      "target_ratio": args.target,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", default="",
                      help="folder of JPEGs to read instead of generated ones")
  parser.add_argument("--num", type=int, default=256)
  parser.add_argument("--min_side", type=int, default=256)
  parser.add_argument("--max_side", type=int, default=640)
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--target", type=float, default=1.5,
                      help="pipeline / pil images/s to reach")
  parser.add_argument("--quick", action="store_true",
                      help="16 small images, 5 repeats")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  if args.quick:
    args.num, args.min_side, args.max_side = 16, 64, 96
    args.res, args.batch, args.repeats = 32, 8, 5
  result = run(args)
  m = result["machine"]
  print(f"Machine: {m['cpu']}, {m['cpu_count']} cores ({m['platform']})")
  print(f"{result['num_images']} JPEGs ({result['source']}, mean side "
        f"{result['mean_side_px']:.0f} px) -> {args.res} px, batch "
        f"{args.batch}, {args.repeats} repeats, interleaved")
  print(f"{'contender':>10} {'median img/s':>13} {'min':>9} {'max':>9}")
  for name, r in result["images_per_s"].items():
    print(f"{name:>10} {r['median']:>13.1f} {r['min']:>9.1f} {r['max']:>9.1f}")
  ratio = result["ratio"]
  verdict = "PASS" if ratio["median"] >= args.target else "MISS"
  print(f"pipeline / pil: median {ratio['median']:.2f}x (min "
        f"{ratio['min']:.2f}, max {ratio['max']:.2f}); target >= "
        f"{args.target:.2f}x: {verdict}")
  if args.out:
    fs.write_text(os.path.join(args.out, "input_pipeline.json"),
                  json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
