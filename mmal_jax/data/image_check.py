"""Undecodable images of lazily decoded sources: checked at load, named mid-run.

Policy (README "Data"). Sources that keep images encoded until the input
pipeline decodes them (COCO with `image_size=0`, webdataset / DataComp
shards, ColorSwap parquet, TFDS) check every image when the pool is built,
before any work, by reading its first and last `ENDS_BYTES` bytes only:
`encoded_problem` accepts the formats the pipeline's decoder reads (JPEG,
PNG, GIF, BMP, WebP, recognised by their signature) whose end marker is there
(JPEG EOI, PNG IEND, GIF trailer, WebP / BMP sizes match the file), which
catches other formats (TIFF, HTML error pages), empty files and truncated
downloads. An image that fails is left out of the pool with its captions
(COCO, TFDS: the image and its captions; webdataset: the sample; ColorSwap:
the group), with a warning naming it (path, `shard.tar#key`, parquet file, row
and id); the pool keeps the names (`UnalignedPool.skipped`) and every metrics
row counts them (`skipped_items`). The check is deterministic, so a rerun
skips the same items and resumes.

An image that passes the check but still cannot be decoded (its middle
damaged) stops the run when it is first decoded: `UndecodableImage` names it
and says to replace it; main.py prints that one line and exits 2, and the
rerun resumes from the last checkpoint once the file is replaced (removing
it instead would change the pool, which a resume refuses).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import struct

from absl import logging
import numpy as np

from mmal_jax.data import pool as pool_lib

ENDS_BYTES = 1024
# How many skipped items are named one per line; the rest are counted.
NAMED_WARNINGS = 20
_THREADS = 16


class UndecodableImage(ValueError):
  """An image the input pipeline cannot decode (names it and the fix)."""


def encoded_problem(head: bytes, tail: bytes, size: int) -> str | None:
  """Why an encoded image cannot be decoded, or None if it looks whole.

  `head` / `tail`: its first / last `ENDS_BYTES` bytes (or fewer), `size` its
  length. Checks the format signature and the end marker only (not the
  compressed data). Cost: O(len(head) + len(tail)).
  """
  if size == 0:
    return "empty file"
  if head.startswith(b"\xff\xd8\xff"):
    # EOI; a few bytes of padding or metadata after it are tolerated.
    return None if b"\xff\xd9" in tail else "truncated JPEG (no end marker)"
  if head.startswith(b"\x89PNG\r\n\x1a\n"):
    return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
  if head[:6] in (b"GIF87a", b"GIF89a"):
    return None if b";" in tail[-16:] else "truncated GIF (no trailer)"
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    declared = struct.unpack("<I", head[4:8])[0] + 8
    return None if size >= declared else (
        f"truncated WebP ({size} of {declared} bytes)")
  if head[:2] == b"BM" and len(head) >= 6:
    declared = struct.unpack("<I", head[2:6])[0]
    return None if size >= declared else (
        f"truncated BMP ({size} of {declared} bytes)")
  if head[:4] in (b"II*\x00", b"MM\x00*"):
    return ("TIFF, which the input pipeline cannot decode (convert it to "
            "JPEG or PNG)")
  return (f"not a JPEG, PNG, GIF, BMP or WebP image (starts with "
          f"{head[:8]!r})")


# Items per task of `find_problems` (one shard open per task for RangeRefs).
_CHUNK = 256


def find_problems(refs) -> dict[int, str]:
  """`{index: problem}` for the items of `refs` (`pool.ItemRefs`) that fail
  `encoded_problem`. Cost: two reads of `ENDS_BYTES` bytes per item
  (`refs.ends`; shard members: `RangeRefs.ends_many`, one open per shard
  and chunk), `_THREADS` at a time; an unreadable item is a problem."""
  def check(lo):
    chunk = range(lo, min(lo + _CHUNK, len(refs)))
    try:
      if isinstance(refs, pool_lib.RangeRefs):
        ends = refs.ends_many(np.arange(chunk.start, chunk.stop), ENDS_BYTES)
        return [encoded_problem(*e) for e in ends]
    except (OSError, ValueError):
      pass  # Item by item below, to name the unreadable one.
    found = []
    for i in chunk:
      try:
        found.append(encoded_problem(*refs.ends(i, ENDS_BYTES)))
      except (OSError, ValueError) as e:
        found.append(f"cannot be read: {e}")
    return found
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    found = [p for chunk in pool.map(check, range(0, len(refs), _CHUNK))
             for p in chunk]
  return {i: p for i, p in enumerate(found) if p is not None}


def warn_skipped(names: list[str], problems: list[str], where: str) -> None:
  """Logs one warning per skipped item (the first `NAMED_WARNINGS`) and a
  count of the rest."""
  for name, problem in list(zip(names, problems))[:NAMED_WARNINGS]:
    logging.warning("Skipping undecodable image %s (%s).", name, problem)
  if len(names) > NAMED_WARNINGS:
    logging.warning("... and %d more undecodable images in %s skipped.",
                    len(names) - NAMED_WARNINGS, where)
  if names:
    logging.warning("%d undecodable image(s) of %s left out of the pool "
                    "(counted as skipped_items in metrics rows).", len(names),
                    where)


def drop_undecodable(pool, where: str, modality: str = "image"):
  """`pool` without the `modality` items failing `find_problems`, their
  partners in the other modalities and, for a grouped pool, the rest of
  their groups; their names are added to `pool.skipped` and logged
  (`warn_skipped`). Returns `pool` itself when every image passes.
  Cost: `find_problems` on the pool's `ItemRefs` (nothing for pixels in
  memory) plus O(N + P) to drop.
  """
  refs = pool.items.get(modality)
  if not isinstance(refs, pool_lib.ItemRefs):
    return pool
  problems = find_problems(refs)
  if not problems:
    return pool
  bad = np.array(sorted(problems), np.int64)
  warn_skipped([refs[i] for i in bad], [problems[i] for i in bad], where)
  drop = {m: np.zeros(n, bool) for m, n in pool.sizes.items()}
  drop[modality][bad] = True
  for other in pool.modalities:
    if other != modality:
      rows = pool.pairs(modality, other)
      drop[other][rows[np.isin(rows[:, 0], bad), 1]] = True
  if pool.groups is not None:
    bad_groups = np.unique(np.concatenate(
        [pool.groups[m][drop[m]] for m in pool.groups]))
    for m, g in pool.groups.items():
      drop[m] |= np.isin(g, bad_groups)
  kept = pool.subset({m: ~d for m, d in drop.items()})
  return dataclasses.replace(
      kept, skipped=pool.skipped + tuple(refs[i] for i in bad))


def first_undecodable(refs, indices) -> tuple[str, str] | None:
  """`(name, error)` of the first item of `refs[indices]` the pipeline's
  decoder (`tf.io.decode_image`) rejects, or None. For the error path of a
  pass that failed: cost one read and decode per item until the bad one."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for i in dict.fromkeys(int(i) for i in np.asarray(indices).reshape(-1)):
    try:
      tf.io.decode_image(refs.read(i), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, OSError, ValueError) as e:
      message = re.sub(r"\{\{.*?\}\}\s*", "", getattr(e, "message", str(e)))
      return refs[i], (message.strip().splitlines() or [""])[0][:200]
  return None


def undecodable_error(name: str, error: str) -> UndecodableImage:
  """The one-line error for an image that failed to decode mid-run."""
  return UndecodableImage(
      f"Cannot decode image {name} ({error}). Replace it with a readable "
      f"image (same name) and rerun the same command: the run resumes from "
      f"its last checkpoint, nothing bought is lost.")
