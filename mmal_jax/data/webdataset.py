"""DataComp / img2dataset webdataset shards: pools and a stream of buffers.

A shard is a `.tar` whose members are grouped into samples by key (the member
name up to the first `.` of its base name): `{key}.jpg` (or `.jpeg`, `.png`,
`.webp`) the image, `{key}.txt` its caption, other members (`{key}.json`)
ignored. A sample with both is a matched image-caption pair; one with only
an image or only a caption is a lone item (missing data). Images are never
read while scanning: the pool keeps `RangeRefs` (shard, byte offset, size),
about 20 bytes per image plus its key, and `data.pipeline` reads the bytes
when it embeds or trains. Captions are read (they are small).

The stream (`WebDatasetStream`) is the paper's streaming regime: buffer t
holds the stream's samples `[t * size, (t + 1) * size)`, a sample being a
matched unit. The stream is the shards in a seeded order (`seed`), samples in
file order within a shard. A buffer is built from the one or two shards it
overlaps (scanned when first needed, the last two scans kept), never from a
list of the whole dataset; buffer t is found without reading earlier shards
when each shard has img2dataset's `{shard}_stats.json` (`successes` = its
number of samples), else the shards before it are scanned once (headers only)
to count. A buffer is an `UnalignedPool` of its own items, captions in a
seeded scrambled order, with its hidden matching for the oracle.
Every file is read through `mmal_jax.fs` (local or `gs://`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import tarfile
from typing import Iterator, Sequence

import numpy as np

from mmal_jax import fs
from mmal_jax.data import image_check
from mmal_jax.data.pool import RangeRefs, UnalignedPool, check_int

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass(frozen=True)
class Shard:
  """The samples of one shard, in file order.

  `offset[i]`, `size[i]`: the image member's bytes (size -1: no image);
  `texts[i]`: the caption (None: no caption).
  """
  path: str
  keys: tuple[str, ...]
  offset: np.ndarray
  size: np.ndarray
  texts: tuple[str | None, ...]

  def __len__(self):
    return len(self.keys)


def _split_name(name: str) -> tuple[str, str]:
  folder, base = os.path.split(name)
  key, _, ext = base.partition(".")
  return os.path.join(folder, key), ext.lower()


def scan_shard(path: str) -> Shard:
  """Reads a shard's member headers and captions (not its images).

  Raises FileNotFoundError for a missing shard, ValueError naming the shard
  for an unreadable tar, a caption that is not UTF-8, or a key with two
  images or two captions. Cost: one pass over the headers plus the captions'
  bytes (seeks over the images).
  """
  samples = collections.OrderedDict()
  try:
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, ext = _split_name(member.name)
        sample = samples.setdefault(key, {})
        if ext in IMAGE_EXTENSIONS or ext == "txt":
          field = "text" if ext == "txt" else "image"
          if field in sample:
            raise ValueError(f"shard {path}: sample {key!r} has two "
                             f"{field}s.")
          if field == "image":
            sample[field] = (member.offset_data, member.size)
          else:
            sample[field] = tar.extractfile(member).read().decode(
                "utf-8").strip()
  except FileNotFoundError:
    raise FileNotFoundError(f"webdataset shard not found: {path}") from None
  except (tarfile.TarError, UnicodeDecodeError, OSError) as e:
    raise ValueError(f"Cannot read webdataset shard {path}: {e}") from e
  samples = {k: s for k, s in samples.items() if s}
  images = [s.get("image", (0, -1)) for s in samples.values()]
  return Shard(path, tuple(samples),
               np.array([o for o, _ in images], np.int64).reshape(-1),
               np.array([n for _, n in images], np.int64).reshape(-1),
               tuple(s.get("text") for s in samples.values()))


def shard_paths(directory: str, pattern: str = "*.tar") -> list[str]:
  """The shards in `directory` (sorted). Raises FileNotFoundError if none."""
  paths = fs.glob(directory, pattern) if fs.isdir(directory) else []
  if not paths:
    raise FileNotFoundError(f"No webdataset shards ({pattern}) in {directory}.")
  return paths


def to_pool(shards: Sequence[Shard], ranges: Sequence[tuple[int, int]] = (),
            scramble_seed: int | None = None) -> UnalignedPool:
  """A pool of `shards[k]`'s samples `[lo, hi)` for `(lo, hi) = ranges[k]`
  (default: all). Images are `RangeRefs`, captions a tuple, in sample order;
  with `scramble_seed` the captions are put in a seeded random order.
  A sample whose image fails `image_check.encoded_problem` is left out
  (named in `pool.skipped` and a warning). Cost: two small reads per image.
  """
  ranges = list(ranges) or [(0, len(s)) for s in shards]
  files = tuple(s.path for s in shards)
  file_index, offset, size, keys, texts, image_of_text = [], [], [], [], [], []
  for k, (shard, (lo, hi)) in enumerate(zip(shards, ranges)):
    for i in range(lo, hi):
      image = -1
      if shard.size[i] >= 0:
        image = len(keys)
        file_index.append(k)
        offset.append(shard.offset[i])
        size.append(shard.size[i])
        keys.append(shard.keys[i])
      if shard.texts[i] is not None:
        texts.append(shard.texts[i])
        image_of_text.append(image)
  if not keys or not texts:
    raise ValueError(f"Shards {list(files)[:3]} hold {len(keys)} images and "
                     f"{len(texts)} captions; a pool needs both.")
  order = np.arange(len(texts))
  if scramble_seed is not None:
    order = np.random.default_rng(scramble_seed).permutation(len(texts))
  image_of_text = np.asarray(image_of_text)[order]
  linked = np.flatnonzero(image_of_text >= 0)
  pool = UnalignedPool(
      items={"image": RangeRefs(files, file_index, offset, size, keys),
             "text": tuple(texts[i] for i in order)},
      links={("image", "text"): np.stack([image_of_text[linked], linked], 1)})
  return image_check.drop_undecodable(pool, f"shards {list(files)[:3]}")


def load_shards(paths: Sequence[str]) -> UnalignedPool:
  """Every sample of `paths` as one pool (e.g. a held-out set of shards)."""
  return to_pool([scan_shard(p) for p in paths])


def _stats_count(path: str) -> int | None:
  stats = os.path.splitext(path)[0] + "_stats.json"
  if not fs.isfile(stats):
    return None
  try:
    count = json.loads(fs.read_text(stats))["successes"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{stats} has no 'successes' count: {e}") from e
  return check_int(f"{stats} 'successes'", count, 0)


class WebDatasetStream:
  """A stream of buffers over webdataset shards (see the module docstring)."""

  def __init__(self, paths: Sequence[str], seed: int):
    if not paths:
      raise ValueError("A webdataset stream needs at least one shard.")
    order = np.random.default_rng(seed).permutation(len(paths))
    self.paths = [paths[i] for i in order]

  @functools.lru_cache(maxsize=2)
  def shard(self, k: int) -> Shard:
    """Shard k of the stream order, scanned; checks its stats count."""
    shard = scan_shard(self.paths[k])
    expected = _stats_count(self.paths[k])
    if expected is not None and expected != len(shard):
      raise ValueError(f"{self.paths[k]} holds {len(shard)} samples but its "
                       f"_stats.json says {expected}.")
    return shard

  @functools.cached_property
  def counts(self) -> np.ndarray:
    """Samples per shard in stream order (stats files, else header scans)."""
    counts = []
    for k, path in enumerate(self.paths):
      count = _stats_count(path)
      counts.append(len(self.shard(k)) if count is None else count)
    return np.array(counts, np.int64)

  @property
  def num_units(self) -> int:
    """Samples (matched units) in the whole stream."""
    return int(self.counts.sum())

  def num_buffers(self, buffer_size: int) -> int:
    check_int("buffer_size", buffer_size, 1)
    return -(-self.num_units // buffer_size)

  def buffer(self, t: int, buffer_size: int, seed: int) -> UnalignedPool:
    """Buffer t: the stream's samples `[t * size, (t + 1) * size)` as a pool,
    captions scrambled with `(seed, t)`. Reads only the shards it overlaps."""
    check_int("t", t, 0)
    if t >= self.num_buffers(buffer_size):
      raise ValueError(f"Buffer {t} is past the stream's "
                       f"{self.num_buffers(buffer_size)} buffers of "
                       f"{buffer_size}.")
    lo, hi = t * buffer_size, min((t + 1) * buffer_size, self.num_units)
    starts = np.concatenate([[0], np.cumsum(self.counts)])
    shards, ranges = [], []
    for k in range(len(self.paths)):
      a, b = max(lo, starts[k]), min(hi, starts[k + 1])
      if a < b:
        shards.append(self.shard(k))
        ranges.append((int(a - starts[k]), int(b - starts[k])))
    scramble = int(np.random.SeedSequence([seed, t]).generate_state(1)[0])
    return to_pool(shards, ranges, scramble_seed=scramble)

  def buffers(self, buffer_size: int, seed: int, start: int = 0
              ) -> Iterator[UnalignedPool]:
    """Buffers `start, start + 1, ...` to the end of the stream."""
    for t in range(start, self.num_buffers(buffer_size)):
      yield self.buffer(t, buffer_size, seed)
