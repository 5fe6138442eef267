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

Buffer reads (webdataset / DataComp): the same JPEGs (with captions) as one
`.tar` shard, read as a stream buffer pool (`webdataset.load_shards`) and
decoded by `pipeline.host_batches`, reading shard members in runs of
`READ_RUN` (one read per run: today's path) and one read per image (the
previous path: `RangeRefs.read` per item), interleaved; from local disk and, with
`--gcs_dir gs://BUCKET/DIR`, from a copy there (written through
`mmal_jax.fs`; real GCS or an emulator: `python tests/gcs_emulator.py start
--port 9023 --in-memory &` then `STORAGE_EMULATOR_HOST=http://127.0.0.1:9023
GOOGLE_CLOUD_PROJECT=test`, bucket created by the benchmark). The target
(runs at least `--buffer_target` x per-image reads from gs://) is printed
with PASS or MISS. Machine and load (`os.getloadavg`) are printed before and
after, progress once per repeat. `--out DIR` (local or gs://) writes
`DIR/input_pipeline.json` through `mmal_jax.fs`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image
import tensorflow as tf

from mmal_jax import cli
from mmal_jax import fs
from mmal_jax.data import pipeline
from mmal_jax.data import preprocess
from mmal_jax.data import webdataset
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
# Buffer contenders: today's `host_batches` (runs of `pipeline.READ_RUN`
# shard members per read) and the previous path (one read per image through
# `RangeRefs.read`, `pipeline.preprocess_fn` per item).
BUFFER_READS = ("runs", "per_image")


def write_shard(path: str, folder: str, names: list[str]) -> None:
  """A webdataset shard at `path` (through `mmal_jax.fs`): `{k}.jpg` the
  file `folder/names[k]`, `{k}.txt` a caption, in order."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for k, name in enumerate(names):
      for ext, data in (("jpg", fs.read_bytes(os.path.join(folder, name))),
                        ("txt", f"image {k}".encode())):
        info = tarfile.TarInfo(f"{k:06d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  fs.write_bytes(path, buf.getvalue())


def _buffer_pass(pool, res, batch, contender):
  """Images/s decoding a buffer pool's images (see `BUFFER_READS`)."""
  start = time.perf_counter()
  if contender == "runs":
    n = _tfdata(pool, res, batch)
  else:
    pp = f"decode|resize({res})|value_range(-1, 1)"
    ds = tf.data.Dataset.from_tensor_slices(
        np.arange(pool.num_items("image"))).map(
            pipeline.preprocess_fn(pool, "image", pp),
            num_parallel_calls=tf.data.AUTOTUNE)
    n = sum(len(x) for x in ds.batch(batch).prefetch(2).as_numpy_iterator())
  return n / (time.perf_counter() - start)


def _make_bucket(url: str) -> None:
  """Creates the bucket of a gs:// URL if it is missing (an emulator)."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  bucket = url[len("gs://"):].split("/")[0]
  filesystem = gcsfs.GCSFileSystem()
  if not filesystem.exists(bucket):
    filesystem.mkdir(bucket)


def _summary(values):
  return {"median": statistics.median(values), "min": min(values),
          "max": max(values), "all": values}


def load() -> list[float]:
  """1, 5 and 15 minute load averages ([] where the OS has none)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


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
    sizes = [Image.open(io.BytesIO(fs.read_bytes(os.path.join(folder, n)))
                        ).size for n in names[:64]]
    for fn in CONTENDERS.values():   # Warm-up: imports, tracing, file cache.
      fn(pool, args.res, args.batch)
    rates = {name: [] for name in CONTENDERS}
    for r in range(args.repeats):
      for name, fn in CONTENDERS.items():
        start = time.perf_counter()
        count = fn(pool, args.res, args.batch)
        rates[name].append(count / (time.perf_counter() - start))
      print(f"  files repeat {r + 1}/{args.repeats}: " + ", ".join(
          f"{n} {v[-1]:.0f} img/s" for n, v in rates.items()), flush=True)
    buffers = {"local": os.path.join(tmp, "shard-000000.tar")}
    if args.gcs_dir:
      _make_bucket(args.gcs_dir)
      buffers["gcs"] = os.path.join(args.gcs_dir, "shard-000000.tar")
    pools = {}
    for where, path in buffers.items():
      write_shard(path, folder, names)
      pools[where] = webdataset.load_shards([path])
    buffer_rates = {f"{w}/{c}": [] for w in pools for c in BUFFER_READS}
    for pool in pools.values():  # Warm-up.
      for contender in BUFFER_READS:
        _buffer_pass(pool, args.res, args.batch, contender)
    for r in range(args.repeats):
      for where, pool in pools.items():
        for contender in BUFFER_READS:
          buffer_rates[f"{where}/{contender}"].append(
              _buffer_pass(pool, args.res, args.batch, contender))
      print(f"  buffer repeat {r + 1}/{args.repeats}: " + ", ".join(
          f"{n} {v[-1]:.0f} img/s" for n, v in buffer_rates.items()),
            flush=True)
  ratios = [p / q for p, q in zip(rates["pipeline"], rates["pil"])]
  buffer_ratios = {w: _summary([a / b for a, b in zip(
      buffer_rates[f"{w}/runs"], buffer_rates[f"{w}/per_image"])])
                   for w in pools}
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
      "buffer_images_per_s": {k: _summary(v) for k, v in
                              buffer_rates.items()},
      "buffer_runs_over_per_image": buffer_ratios,
      "buffer_target_ratio": args.buffer_target,
      "read_run": pipeline.READ_RUN,
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
  parser.add_argument("--gcs_dir", default="",
                      help="gs:// folder to also read the buffer shard from")
  parser.add_argument("--buffer_target", type=float, default=2.0,
                      help="gs:// buffer: runs / per-image reads images/s")
  parser.add_argument("--quick", action="store_true",
                      help="16 small images, 5 repeats")
  parser.add_argument("--out", default=None, type=cli.output_folder,
                      help="folder for input_pipeline.json (local or gs://)")
  args = parser.parse_args(argv)
  if args.quick:
    args.num, args.min_side, args.max_side = 16, 64, 96
    args.res, args.batch, args.repeats = 32, 8, 5
  m, load_before = machine(), load()
  print(f"Machine: {m['cpu']}, {m['cpu_count']} cores ({m['platform']}); "
        f"load {load_before}", flush=True)
  result = run(args)
  result["load_before"], result["load_after"] = load_before, load()
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
  print(f"Buffer (one shard, {result['num_images']} JPEGs), runs of "
        f"{result['read_run']} members per read vs one read per image:")
  for name, r in result["buffer_images_per_s"].items():
    print(f"{name:>18} {r['median']:>9.1f} img/s ({r['min']:.1f}-"
          f"{r['max']:.1f})")
  for where, r in result["buffer_runs_over_per_image"].items():
    line = (f"{where}: runs / per-image median {r['median']:.2f}x "
            f"(min {r['min']:.2f}, max {r['max']:.2f})")
    if where == "gcs":
      verdict = "PASS" if r["median"] >= args.buffer_target else "MISS"
      line += f"; target >= {args.buffer_target:.2f}x: {verdict}"
    print(line)
  print(f"Load after: {result['load_after']}")
  if args.out:
    fs.write_text(os.path.join(args.out, "input_pipeline.json"),
                  json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
