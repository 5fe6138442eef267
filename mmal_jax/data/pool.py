"""The unaligned pool: per-modality items and the hidden cross-modal matching.

A pool holds, for each modality (`"image"`, `"text"`, ...), a sequence of items
and, hidden from the learner, a partner relation between items of different
modalities. The relation is stored as `links[(a, b)]`: an `(P, 2)` int64 array
of `(index in a, index in b)` rows, one per ground-truth pair. It covers
one-to-one matchings (ColorSwap), one-to-many (COCO: an image and its ~5
captions) and items without any partner (missing data).

Items of one modality are one of:
* a numpy array whose leading axis indexes the items (rendered uint8 images
  `(N, H, W, 3)`, float feature rows `(N, D)`): held in memory;
* a tuple (captions as `str`, image paths as `str`, or images of varying size
  as uint8 `(H, W, 3)` arrays);
* `ItemRefs`: references to encoded items stored elsewhere, not pixels, so
  that a pool of millions of images fits in host memory. `FileRefs` (one file
  per item: a root and `(N,)` names, ~1 byte per character), `RangeRefs`
  (byte ranges of shard files, e.g. the members of webdataset `.tar` shards:
  20 bytes per item plus the key) and `BytesRefs` (encoded bytes held in
  memory, for small sets such as ColorSwap). `data.pipeline` decodes them.
Everything the learner keeps about a pool (the annotated set, stream buffers)
refers to items by `(modality, index)`, so it can be saved as JSON and
restored against a pool rebuilt from the same source.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Iterator, Mapping, Sequence, Union

import numpy as np

from mmal_jax import fs


class ItemRefs:
  """References to `len(self)` encoded items stored outside the pool.

  `refs[i]` is a one-line description of item i (a path, `shard.tar#key`),
  `read(i)` its encoded bytes (e.g. a JPEG), `take(indices)` the references of
  a subset in that order. Subclasses hold flat numpy arrays only.
  """

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, i) -> str:
    raise NotImplementedError

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))

  def read(self, i: int) -> bytes:
    raise NotImplementedError

  def ends(self, i: int, n: int) -> tuple[bytes, bytes, int]:
    """`(first n bytes, last n bytes, size)` of item i (`data.image_check`).
    Reads the whole item unless a subclass reads only the ends."""
    data = self.read(i)
    return data[:n], data[-n:], len(data)

  def take(self, indices) -> ItemRefs:
    raise NotImplementedError


def _as_bytes_array(name: str, values) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {values.shape}.")
  if values.dtype.kind == "U" or values.dtype.kind == "O":
    values = np.array([str(v).encode("utf-8") for v in values], np.bytes_)
  if values.dtype.kind != "S":
    raise ValueError(f"{name} must hold strings, got {values.dtype}.")
  return values


@dataclasses.dataclass(frozen=True, eq=False)
class FileRefs(ItemRefs):
  """One file per item: item i is `os.path.join(root, names[i])`.

  `names` is stored as a bytes array (UTF-8), about one byte per character.
  `root` may be a local folder or a `gs://` URL (read through `mmal_jax.fs`).
  """
  root: str
  names: np.ndarray

  def __post_init__(self):
    object.__setattr__(self, "root", os.fspath(self.root))
    object.__setattr__(self, "names", _as_bytes_array("FileRefs.names",
                                                      self.names))

  def __len__(self):
    return len(self.names)

  def __getitem__(self, i):
    return os.path.join(self.root, self.names[i].decode("utf-8"))

  def read(self, i):
    return fs.read_bytes(self[i])

  def ends(self, i, n):
    with fs.open(self[i], "rb") as f:
      head = f.read(n)
      size = f.seek(0, os.SEEK_END)
      f.seek(max(size - n, 0))
      return head, f.read(n), size

  def take(self, indices):
    return FileRefs(self.root, self.names[np.asarray(indices, np.int64)])


@dataclasses.dataclass(frozen=True, eq=False)
class BytesRefs(ItemRefs):
  """Encoded items held in memory: `data[i]` is item i's bytes.

  For small sets (ColorSwap's 2000 images, a stream buffer); `names[i]`
  (optional) describes item i.
  """
  data: np.ndarray
  names: np.ndarray | None = None

  def __post_init__(self):
    data = np.asarray(self.data, object)
    if data.ndim != 1 or not all(isinstance(x, bytes) for x in data):
      raise ValueError("BytesRefs.data must be a 1-D sequence of bytes.")
    object.__setattr__(self, "data", data)
    if self.names is not None:
      names = _as_bytes_array("BytesRefs.names", self.names)
      if names.shape != data.shape:
        raise ValueError(f"BytesRefs.names has {names.size} entries for "
                         f"{data.size} items.")
      object.__setattr__(self, "names", names)

  def __len__(self):
    return len(self.data)

  def __getitem__(self, i):
    if self.names is not None:
      return self.names[i].decode("utf-8")
    return f"<{len(self.data[i])} bytes>"

  def read(self, i):
    return self.data[i]

  def take(self, indices):
    indices = np.asarray(indices, np.int64)
    return BytesRefs(self.data[indices],
                     None if self.names is None else self.names[indices])


_open_files = threading.local()


def _open_cached(path: str):
  """An open binary file per (thread, path), kept for the next range read."""
  cache = getattr(_open_files, "cache", None)
  if cache is None:
    cache = _open_files.cache = {}
  if path not in cache:
    if len(cache) >= 8:
      cache.pop(next(iter(cache))).close()
    cache[path] = fs.open(path, "rb")
  return cache[path]


@dataclasses.dataclass(frozen=True, eq=False)
class RangeRefs(ItemRefs):
  """Items stored as byte ranges of shard files (e.g. `.tar` members).

  Item i is `length[i]` bytes at `offset[i]` of `files[file_index[i]]`;
  `keys[i]` names it (`files[...]#key`). Reads go through `mmal_jax.fs`
  (local or `gs://`), one open file per thread and shard.
  """
  files: tuple[str, ...]
  file_index: np.ndarray
  offset: np.ndarray
  length: np.ndarray
  keys: np.ndarray

  def __post_init__(self):
    object.__setattr__(self, "files", tuple(os.fspath(f) for f in self.files))
    n = None
    for name, dtype in (("file_index", np.int32), ("offset", np.int64),
                        ("length", np.int64)):
      value = np.asarray(getattr(self, name))
      if value.ndim != 1 or (value.size and value.dtype.kind not in "iu"):
        raise ValueError(f"RangeRefs.{name} must be a 1-D int array.")
      if n is not None and value.size != n:
        raise ValueError("RangeRefs arrays differ in length.")
      n = value.size
      object.__setattr__(self, name, value.astype(dtype))
    keys = _as_bytes_array("RangeRefs.keys", self.keys)
    if keys.size != n:
      raise ValueError("RangeRefs arrays differ in length.")
    object.__setattr__(self, "keys", keys)
    if n and not 0 <= self.file_index.min() <= self.file_index.max() < len(
        self.files):
      raise ValueError("RangeRefs.file_index points outside files.")

  def __len__(self):
    return len(self.keys)

  def __getitem__(self, i):
    return f"{self.files[self.file_index[i]]}#{self.keys[i].decode('utf-8')}"

  def read(self, i):
    f = _open_cached(self.files[self.file_index[i]])
    f.seek(int(self.offset[i]))
    data = f.read(int(self.length[i]))
    if len(data) != self.length[i]:
      raise ValueError(f"{self[i]}: file ends after {len(data)} of "
                       f"{int(self.length[i])} bytes.")
    return data

  def read_many(self, indices, max_span: int = 16 << 20) -> list[bytes]:
    """The bytes of items `indices`, in order, reading each run of them
    that lies in one file within `max_span` bytes (e.g. consecutive members
    of a shard) with one read of that span: one GET on `gs://` per run
    instead of one per item. Cost: one open and one read per run, of the
    span's bytes (members in between included)."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    out, i = [], 0
    while i < len(indices):
      file = self.file_index[indices[i]]
      start = int(self.offset[indices[i]])
      stop = start + int(self.length[indices[i]])
      j = i + 1
      while j < len(indices):
        k = indices[j]
        end = max(stop, int(self.offset[k] + self.length[k]))
        if (self.file_index[k] != file or self.offset[k] < start
            or end - start > max_span):
          break
        stop, j = end, j + 1
      # Opened and closed per run (one metadata request on gs://): a file
      # left open in a finished tf.data thread leaves gcsfs' read-ahead
      # tasks pending.
      with fs.open(self.files[file], "rb") as f:
        f.seek(start)
        data = f.read(stop - start)
      if len(data) != stop - start:
        raise ValueError(f"{self[indices[i]]}: file ends after "
                         f"{start + len(data)} of {stop} bytes.")
      for k in indices[i:j]:
        lo = int(self.offset[k]) - start
        out.append(data[lo:lo + int(self.length[k])])
      i = j
    return out

  def ends(self, i, n):
    return self.ends_many([i], n)[0]

  def ends_many(self, indices, n) -> list[tuple[bytes, bytes, int]]:
    """`ends(i, n)` of items `indices`, each shard opened once per run of
    its items (and closed: see `read_many`). Cost: two reads of `n` bytes
    per item."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    out, i = [], 0
    while i < len(indices):
      file = self.file_index[indices[i]]
      j = i + 1
      while j < len(indices) and self.file_index[indices[j]] == file:
        j += 1
      with fs.open(self.files[file], "rb") as f:
        for k in indices[i:j]:
          offset, size = int(self.offset[k]), int(self.length[k])
          f.seek(offset)
          head = f.read(min(n, size))
          f.seek(offset + max(size - n, 0))
          out.append((head, f.read(min(n, size)), size))
      i = j
    return out

  def take(self, indices):
    indices = np.asarray(indices, np.int64)
    return RangeRefs(self.files, self.file_index[indices],
                     self.offset[indices], self.length[indices],
                     self.keys[indices])


Items = Union[np.ndarray, tuple, ItemRefs]
ItemRef = tuple[str, int]


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(name: str, value, minimum: int) -> int:
  """Returns `value` as an int, or raises ValueError unless it is an int >= `minimum`."""
  if not _is_int(value) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def check_modality(num_items: Mapping[str, int], modality, what: str) -> None:
  """Raises ValueError unless `modality` is a key of `num_items`."""
  if not isinstance(modality, str) or modality not in num_items:
    raise ValueError(f"{what}: unknown modality {modality!r}; known: {list(num_items)}.")


def check_ref(num_items: Mapping[str, int], modality, index, what: str) -> int:
  """Returns `index` as an int, or raises ValueError unless `(modality, index)` is an item."""
  check_modality(num_items, modality, what)
  if not _is_int(index):
    raise ValueError(f"{what}: index must be an int, got {index!r}.")
  if not 0 <= index < num_items[modality]:
    raise ValueError(f"{what}: {modality} index {int(index)} is outside "
                     f"[0, {num_items[modality]}).")
  return int(index)


def _as_items(modality: str, items) -> Items:
  if isinstance(items, ItemRefs):
    return items
  if isinstance(items, np.ndarray):
    if items.ndim == 0:
      raise ValueError(f"items[{modality!r}] is a 0-d array; the leading axis must index items.")
    if items.dtype.kind in "US":
      return tuple(str(x) for x in items)
    if items.dtype.kind == "O":
      return tuple(items)
    return items
  if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
    raise TypeError(f"items[{modality!r}] must be a numpy array or a sequence of items, "
                    f"got {type(items).__name__}.")
  return tuple(items)


def as_index_rows(name: str, rows) -> np.ndarray:
  """`rows` as an int64 `(P, 2)` array (P may be 0); raises naming `name` otherwise."""
  rows = np.asarray(rows)
  if rows.size == 0:
    return np.zeros((0, 2), np.int64)
  if rows.ndim != 2 or rows.shape[1] != 2 or rows.dtype.kind not in "iu":
    raise ValueError(f"{name} must be an int (P, 2) array, got {rows.dtype} {rows.shape}.")
  return rows.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class UnalignedPool:
  """Items per modality plus the hidden matching between them.

  Attributes:
    items: modality name -> items (numpy array with items on axis 0, tuple,
      or `ItemRefs`).
      The mapping's order is the modality order used everywhere (links, JSON).
    links: `(a, b)` modality pair -> `(P, 2)` int64 rows `(i_a, i_b)`: the
      ground-truth pairs. Keys are stored in modality order (`a` before `b`);
      rows are sorted and unique. Items in no row have no partner in that
      modality.
    groups: optional modality -> `(N_m,)` int64 group id per item (ColorSwap
      groups of 2 images + 2 captions); ids are compared, never renumbered.
    skipped: names of the source's items left out of the pool because they
      cannot be decoded (`data.image_check`).
  """
  items: Mapping[str, Items]
  links: Mapping[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)
  groups: Mapping[str, np.ndarray] | None = None
  skipped: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.items:
      raise ValueError("A pool needs at least one modality.")
    items = {}
    for m, x in self.items.items():
      if not isinstance(m, str) or not m:
        raise ValueError(f"Modality names must be non-empty strings, got {m!r}.")
      x = _as_items(m, x)
      if len(x) == 0:
        raise ValueError(f"Modality {m!r} has no items (empty pool).")
      items[m] = x
    order = {m: k for k, m in enumerate(items)}
    links = {}
    for key, rows in self.links.items():
      if not (isinstance(key, tuple) and len(key) == 2):
        raise ValueError(f"links keys must be (modality, modality) tuples, got {key!r}.")
      a, b = key
      for m in key:
        if m not in order:
          raise ValueError(f"links[{key!r}] names unknown modality {m!r}; "
                           f"known: {list(items)}.")
      if a == b:
        raise ValueError(f"links[{key!r}] links a modality to itself.")
      rows = as_index_rows(f"links[{key!r}]", rows)
      if order[a] > order[b]:
        a, b, rows = b, a, rows[:, ::-1]
      if (a, b) in links:
        raise ValueError(f"links holds both ({a!r}, {b!r}) and its reverse.")
      for col, m in enumerate((a, b)):
        bad = (rows[:, col] < 0) | (rows[:, col] >= len(items[m]))
        if bad.any():
          r = int(np.argmax(bad))
          raise ValueError(f"links[{key!r}] row {r} has {m} index {int(rows[r, col])}, "
                           f"outside [0, {len(items[m])}).")
      unique, counts = np.unique(rows, axis=0, return_counts=True)
      if (counts > 1).any():
        dup = unique[np.argmax(counts > 1)]
        raise ValueError(f"links[{key!r}] repeats the pair {tuple(int(v) for v in dup)}.")
      links[(a, b)] = unique.reshape(-1, 2)
    groups = None
    if self.groups is not None:
      groups = {}
      for m, g in self.groups.items():
        if m not in order:
          raise ValueError(f"groups names unknown modality {m!r}; known: {list(items)}.")
        g = np.asarray(g)
        if g.shape != (len(items[m]),) or g.dtype.kind not in "iu":
          raise ValueError(f"groups[{m!r}] must be an integer array of shape "
                           f"({len(items[m])},), got {g.dtype} {g.shape}.")
        groups[m] = g.astype(np.int64)
    object.__setattr__(self, "items", items)
    object.__setattr__(self, "links", links)
    object.__setattr__(self, "groups", groups)
    object.__setattr__(self, "skipped", tuple(self.skipped))

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(self.items)

  @property
  def sizes(self) -> dict[str, int]:
    """Modality -> number of items."""
    return {m: len(x) for m, x in self.items.items()}

  def num_items(self, modality: str) -> int:
    """Number of items of `modality`."""
    check_modality(self.items, modality, "num_items")
    return len(self.items[modality])

  def pairs(self, a: str = "image", b: str = "text") -> np.ndarray:
    """All ground-truth pairs as `(P, 2)` int64 rows `(index in a, index in b)`, sorted."""
    check_modality(self.items, a, "pairs")
    check_modality(self.items, b, "pairs")
    if (a, b) in self.links:
      return self.links[(a, b)]
    if (b, a) in self.links:
      rows = self.links[(b, a)][:, ::-1]
      return rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    return np.zeros((0, 2), np.int64)

  @functools.cached_property
  def _adjacency(self) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(m, other) -> CSR (indptr (N_m + 1,), partner indices). Built once: O(P log P)."""
    adjacency = {}
    for a in self.items:
      for b in self.items:
        if a == b:
          continue
        rows = self.pairs(a, b)
        counts = np.bincount(rows[:, 0], minlength=len(self.items[a]))
        indptr = np.concatenate([[0], np.cumsum(counts)])
        adjacency[(a, b)] = (indptr, rows[:, 1])
    return adjacency

  def partners(self, modality: str, index: int) -> tuple[ItemRef, ...]:
    """Partners of one item in every other modality, as `(modality, index)` refs.

    Empty when the item has no partner. Cost: O(number of partners).
    """
    index = check_ref(self.sizes, modality, index, "partners")
    refs = []
    for other in self.items:
      if other != modality:
        indptr, nbrs = self._adjacency[(modality, other)]
        refs.extend((other, int(j)) for j in nbrs[indptr[index]:indptr[index + 1]])
    return tuple(refs)

  def num_partners(self, modality: str, other: str) -> np.ndarray:
    """`(N_modality,)` int64: how many partners each item has in `other`."""
    check_modality(self.items, modality, "num_partners")
    check_modality(self.items, other, "num_partners")
    indptr, _ = self._adjacency[(modality, other)]
    return np.diff(indptr)

  def partner_array(self, modality: str, other: str) -> np.ndarray:
    """`(N_modality,)` int64: the single partner in `other` of each item, -1 if none.

    For many-to-one relations such as COCO's caption -> image. Raises if an item
    has several partners in `other`.
    """
    check_modality(self.items, modality, "partner_array")
    check_modality(self.items, other, "partner_array")
    indptr, nbrs = self._adjacency[(modality, other)]
    counts = np.diff(indptr)
    if (counts > 1).any():
      i = int(np.argmax(counts > 1))
      raise ValueError(f"{modality} item {i} has {int(counts[i])} partners in {other}; "
                       "partner_array needs at most one per item.")
    out = np.full(len(counts), -1, np.int64)
    out[counts == 1] = nbrs
    return out

  def take(self, modality: str, indices) -> Items:
    """Items of `modality` at `indices`: an array slice, a tuple for tuple
    items, `ItemRefs` of the same kind for references."""
    check_modality(self.items, modality, "take")
    x = self.items[modality]
    indices = np.asarray(indices, np.int64)
    if isinstance(x, ItemRefs):
      return x.take(indices)
    if isinstance(x, np.ndarray):
      return x[indices]
    return tuple(x[int(i)] for i in indices)

  def subset(self, keep: Mapping[str, Sequence[int] | np.ndarray]) -> UnalignedPool:
    """The pool restricted to the kept items; other modalities are kept whole.

    `keep[m]` is a bool mask `(N_m,)` or integer indices. Kept items keep their
    relative order and are renumbered 0..; links with a dropped end are dropped
    (their partners become partner-less: the paper's missing-data setting).
    Cost: O(N + P).
    """
    for m in keep:
      check_modality(self.items, m, "subset")
    new_index, items, groups = {}, {}, None
    for m in self.items:
      n = len(self.items[m])
      k = np.asarray(keep.get(m, np.ones(n, bool)))
      if k.dtype == bool:
        if k.shape != (n,):
          raise ValueError(f"keep[{m!r}] mask has shape {k.shape}, expected ({n},).")
        k = np.flatnonzero(k)
      elif k.size and k.dtype.kind not in "iu":
        raise ValueError(f"keep[{m!r}] must be a bool mask or integer indices, got {k.dtype}.")
      k = np.unique(k.astype(np.int64))
      if k.size and (k[0] < 0 or k[-1] >= n):
        raise IndexError(f"keep[{m!r}] has indices outside [0, {n}).")
      remap = np.full(n, -1, np.int64)
      remap[k] = np.arange(k.size)
      new_index[m] = remap
      items[m] = self.take(m, k)
    links = {}
    for (a, b), rows in self.links.items():
      rows = np.stack([new_index[a][rows[:, 0]], new_index[b][rows[:, 1]]], axis=1)
      links[(a, b)] = rows[(rows >= 0).all(axis=1)]
    if self.groups is not None:
      groups = {m: g[new_index[m] >= 0] for m, g in self.groups.items()}
    return UnalignedPool(items=items, links=links, groups=groups,
                         skipped=self.skipped)


def group_layout(pool: UnalignedPool, a: str = "image",
                 b: str = "text") -> tuple[np.ndarray, np.ndarray]:
  """Index layout of a grouped pool for the group metrics.

  Returns `(a_index, b_index)`, both `(G, k)` int64, one row per group (in
  increasing group id): row g lists the group's `a` items in index order and,
  column by column, each one's partner in `b` (so column j of the two arrays is
  a ground-truth pair). Every group must have k items of each modality, matched
  one-to-one inside the group. Cost: O(N log N).
  """
  if pool.groups is None or a not in pool.groups or b not in pool.groups:
    raise ValueError(f"group_layout needs group ids for {a!r} and {b!r}; this pool has "
                     f"{None if pool.groups is None else list(pool.groups)}.")
  ga, gb = pool.groups[a], pool.groups[b]
  ids, counts = np.unique(ga, return_counts=True)
  b_ids, b_counts = np.unique(gb, return_counts=True)
  k = int(counts[0])
  if (counts != k).any() or not np.array_equal(ids, b_ids) or (b_counts != k).any():
    raise ValueError(f"Every group must hold the same number k of {a} and of {b} items; "
                     f"got {counts.min()}..{counts.max()} {a} and "
                     f"{b_counts.min()}..{b_counts.max()} {b} items per group.")
  a_index = np.lexsort((np.arange(ga.size), ga)).reshape(-1, k)
  b_index = pool.partner_array(a, b)[a_index]
  if (b_index < 0).any() or (gb[b_index] != ga[a_index]).any():
    raise ValueError(f"Every {a} item needs its {b} partner inside its own group.")
  return a_index, b_index


def split_groups(pool: UnalignedPool, num_eval_groups: int,
                 seed: int) -> tuple[UnalignedPool, UnalignedPool]:
  """Splits a grouped pool into (train pool, held-out eval pool) by whole groups.

  `num_eval_groups` groups, drawn uniformly with `seed`, go to the eval pool,
  the rest to the train pool. Every modality needs group ids. Cost: O(N).
  """
  if pool.groups is None or set(pool.groups) != set(pool.modalities):
    raise ValueError("split_groups needs group ids for every modality of the pool.")
  ids = np.unique(np.concatenate(list(pool.groups.values())))
  if not 0 < num_eval_groups < ids.size:
    raise ValueError(f"num_eval_groups={num_eval_groups} must be in [1, {ids.size - 1}] "
                     f"for a pool of {ids.size} groups.")
  eval_ids = np.random.default_rng(seed).choice(ids, size=num_eval_groups, replace=False)
  in_eval = {m: np.isin(g, eval_ids) for m, g in pool.groups.items()}
  train = pool.subset({m: ~mask for m, mask in in_eval.items()})
  held_out = pool.subset(in_eval)
  return train, held_out


def matching_components(pool: UnalignedPool) -> dict[str, np.ndarray]:
  """Connected components of the hidden matching: modality -> `(N_m,)` int64 ids.

  Items are linked by ground-truth pairs; an item with no partner is its own
  component. Ids are 0..C-1 in order of each component's first item (modality
  order, then index). Cost: O(P * diameter) by min-label propagation; the
  diameter is 2 for one-to-many matchings.
  """
  offsets, n = {}, 0
  for m in pool.modalities:
    offsets[m] = n
    n += pool.num_items(m)
  label = np.arange(n)
  ends = [(rows[:, 0] + offsets[a], rows[:, 1] + offsets[b])
          for (a, b), rows in pool.links.items()]
  if ends:
    u = np.concatenate([e[0] for e in ends])
    v = np.concatenate([e[1] for e in ends])
    while True:
      low = np.minimum(label[u], label[v])
      new = label.copy()
      np.minimum.at(new, u, low)
      np.minimum.at(new, v, low)
      new = new[new]
      if np.array_equal(new, label):
        break
      label = new
  _, dense = np.unique(label, return_inverse=True)
  return {m: dense[offsets[m]:offsets[m] + pool.num_items(m)] for m in pool.modalities}


def unit_items(pool: UnalignedPool, pairs: np.ndarray,
               chosen: np.ndarray) -> dict[str, np.ndarray]:
  """`{m: (N_m,) bool}`: every item of the matched units (connected
  components of the matching, e.g. an image with all its captions) that hold
  the `chosen` rows of `pairs` (`(P, 2)` image, text indices of `pool`).

  Used to hold a set of known pairs out of a pool whole: no item of a held
  out unit stays behind without its partners. Cost: `matching_components`,
  then O(N + P).
  """
  component = matching_components(pool)
  ids = np.unique(component["image"][pairs[np.asarray(chosen, bool), 0]])
  return {m: np.isin(c, ids) for m, c in component.items()}


def first_pair_of_units(pool: UnalignedPool,
                        pairs: np.ndarray) -> np.ndarray:
  """`(P,)` bool: the first row of `pairs` (`(P, 2)` image, text indices of
  `pool`) in each matched unit, so that drawing rows among them draws units.
  Cost: `matching_components`, then O(P log P)."""
  component = matching_components(pool)["image"][pairs[:, 0]]
  first = np.zeros(len(pairs), bool)
  first[np.unique(component, return_index=True)[1]] = True
  return first


def count_units(component: dict[str, np.ndarray]) -> int:
  """Number of units (components) in `matching_components`' output. O(N)."""
  return 1 + max(int(c.max()) for c in component.values())


def num_stream_buffers(num_units: int, buffer_size: int) -> int:
  """How many buffers `stream_buffers` yields (the last may be short)."""
  return -(-num_units // buffer_size)


def stream_buffers(pool: UnalignedPool, buffer_size: int,
                   seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields the stream's disjoint buffers, one per round, as sorted item indices.

  A buffer is `buffer_size` *units*: a unit is a connected component of the
  hidden matching (an image with its caption(s); a lone partner-less item), so a
  buffer of 1024 over a one-to-one pool holds 1024 images and 1024 texts, their
  partners among them but scrambled (as when a stream of pairs arrives
  unaligned). Units are shuffled with `seed`; every item appears in exactly one
  buffer; the last buffer may hold fewer units. Items that are not queried in
  their round never come back; items already annotated (revealed as a partner
  earlier) may still appear and should be filtered by the caller, e.g. with
  `AnnotationState.unannotated(m, among=buffer[m])`.

  Yields dicts modality -> sorted int64 indices (possibly empty for a
  modality). Deterministic given (pool, buffer_size, seed); resume at round t
  with `itertools.islice(stream_buffers(...), t, None)`. Cost: O(N log N) once.
  """
  check_int("buffer_size", buffer_size, 1)
  component = matching_components(pool)
  num_units = count_units(component)
  rank = np.empty(num_units, np.int64)
  rank[np.random.default_rng(seed).permutation(num_units)] = np.arange(num_units)
  num_buffers = num_stream_buffers(num_units, buffer_size)
  members = {}
  for m, c in component.items():
    buffer_of = rank[c] // buffer_size
    order = np.argsort(buffer_of, kind="stable")  # stable: indices ascend per buffer
    members[m] = (order, np.searchsorted(buffer_of[order], np.arange(num_buffers + 1)))
  return ({m: order[bounds[t]:bounds[t + 1]] for m, (order, bounds) in members.items()}
          for t in range(num_buffers))
