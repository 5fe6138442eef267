"""The unaligned pool: per-modality items and the hidden cross-modal matching.

A pool holds, for each modality (`"image"`, `"text"`, ...), a sequence of items
and, hidden from the learner, a partner relation between items of different
modalities. The relation is stored as `links[(a, b)]`: an `(P, 2)` int64 array
of `(index in a, index in b)` rows, one per ground-truth pair. It covers
one-to-one matchings (ColorSwap), one-to-many (COCO: an image and its ~5
captions) and items without any partner (missing data).

Items of one modality are either one numpy array whose leading axis indexes the
items (rendered uint8 images `(N, H, W, 3)`, float feature rows `(N, D)`) or a
tuple (captions as `str`, image paths as `str`, or images of varying size as
uint8 `(H, W, 3)` arrays). Everything the learner keeps about a pool (the
annotated set, stream buffers) refers to items by `(modality, index)`, so it
can be saved as JSON and restored against a pool rebuilt from the same source.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Mapping, Sequence, Union

import numpy as np

Items = Union[np.ndarray, tuple]
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
    items: modality name -> items (numpy array with items on axis 0, or tuple).
      The mapping's order is the modality order used everywhere (links, JSON).
    links: `(a, b)` modality pair -> `(P, 2)` int64 rows `(i_a, i_b)`: the
      ground-truth pairs. Keys are stored in modality order (`a` before `b`);
      rows are sorted and unique. Items in no row have no partner in that
      modality.
    groups: optional modality -> `(N_m,)` int64 group id per item (ColorSwap
      groups of 2 images + 2 captions); ids are compared, never renumbered.
  """
  items: Mapping[str, Items]
  links: Mapping[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)
  groups: Mapping[str, np.ndarray] | None = None

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
    """Items of `modality` at `indices` (an array slice, or a tuple for tuple items)."""
    check_modality(self.items, modality, "take")
    x = self.items[modality]
    indices = np.asarray(indices, np.int64)
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
    return UnalignedPool(items=items, links=links, groups=groups)


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
