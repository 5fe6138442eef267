"""What the learner has bought: oracle answers and the annotated set they build.

`AnnotationState` is the single record of annotation. Its source of truth is
the query log (one `Answer` per query, in the order bought); the masks and
revealed pairs are rebuilt from the log, so its JSON is the log alone and
restoring replays (and re-validates) it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from mmal_jax import fs
from mmal_jax import strict_json
from mmal_jax.data.pool import ItemRef, UnalignedPool, check_int, check_modality, check_ref

_JSON_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Answer:
  """The oracle's answer to one query (cost 1).

  Attributes:
    round_index: the acquisition round the query was bought in.
    modality, index: the queried item.
    partners: its partners in the other modalities as `(modality, index)`;
      empty means "no partner".
  """
  round_index: int
  modality: str
  index: int
  partners: tuple[ItemRef, ...] = ()

  def to_json_obj(self) -> dict:
    return {"round": self.round_index, "modality": self.modality, "index": self.index,
            "partners": [[m, i] for m, i in self.partners]}

  @classmethod
  def from_json_obj(cls, obj, round_index: int | None = None) -> Answer:
    """Parses `{"round", "modality", "index", "partners": [[m, i], ...]}`.

    With `round_index`, `"round"` may be left out and must equal it if given.
    Checks the structure only; `check_answer` checks the references.
    """
    keys = ["modality", "index", "partners"] + (["round"] if round_index is None else [])
    if not isinstance(obj, dict) or not set(keys) <= set(obj):
      raise ValueError(f"an answer needs keys {', '.join(keys)}; got {obj!r}.")
    if round_index is not None and obj.get("round", round_index) != round_index:
      raise ValueError(f"answer is for round {obj['round']!r}, this is round {round_index}.")
    partners = obj["partners"]
    if not isinstance(partners, list):
      raise ValueError(f"partners must be a list of [modality, index] pairs, got {partners!r}.")
    for p in partners:
      if not (isinstance(p, list) and len(p) == 2):
        raise ValueError(f"partner {p!r} is not a [modality, index] pair.")
    return cls(obj.get("round", round_index), obj["modality"], obj["index"],
               tuple((m, i) for m, i in partners))


def check_answer(num_items: Mapping[str, int], answer: Answer, what: str) -> Answer:
  """Checks an answer's references; returns it with plain ints.

  Raises ValueError, prefixed with `what`, for a negative or non-int round,
  an unknown modality, an index out of range, a partner in the queried item's
  own modality or a partner listed twice.
  """
  round_index = check_int(f"{what}: round_index", answer.round_index, 0)
  index = check_ref(num_items, answer.modality, answer.index, what)
  partners = []
  for m, i in answer.partners:
    ref = (m, check_ref(num_items, m, i, f"{what}: partner"))
    if m == answer.modality:
      raise ValueError(f"{what}: partner {ref} is in the queried item's own modality.")
    if ref in partners:
      raise ValueError(f"{what}: partner {ref} is listed twice.")
    partners.append(ref)
  return Answer(round_index, answer.modality, index, tuple(partners))


@dataclasses.dataclass
class AnnotationState:
  """Per-modality annotated masks, revealed pairs and the query log.

  Attributes:
    num_items: modality -> pool size; the modality order is the pool's.
    log: every answer bought, in order (its length is the cost spent).
    queried: modality -> `(N_m,)` bool, items that were queried.
    annotated: modality -> `(N_m,)` bool, items queried or revealed as a
      partner; these are no longer candidates for a query.
  """
  num_items: dict[str, int]
  log: list[Answer] = dataclasses.field(default_factory=list)
  queried: dict[str, np.ndarray] = dataclasses.field(init=False, repr=False)
  annotated: dict[str, np.ndarray] = dataclasses.field(init=False, repr=False)
  _pairs: dict[tuple[str, str], dict[tuple[int, int], None]] = dataclasses.field(
      init=False, repr=False)

  def __post_init__(self):
    if not self.num_items:
      raise ValueError("AnnotationState needs at least one modality.")
    if not all(isinstance(m, str) for m in self.num_items):
      raise ValueError(f"num_items keys must be modality names, got {list(self.num_items)}.")
    self.num_items = {m: check_int(f"num_items[{m!r}]", n, 1) for m, n in self.num_items.items()}
    self.queried = {m: np.zeros(n, bool) for m, n in self.num_items.items()}
    self.annotated = {m: np.zeros(n, bool) for m, n in self.num_items.items()}
    self._pairs = {}
    log, self.log = list(self.log), []
    self.apply(log)

  @classmethod
  def for_pool(cls, pool: UnalignedPool) -> AnnotationState:
    """An empty state sized for `pool`."""
    return cls({m: pool.num_items(m) for m in pool.modalities})

  @property
  def cost(self) -> int:
    """Queries bought so far (1 per query)."""
    return len(self.log)

  @property
  def last_round(self) -> int:
    """Round index of the last answer bought, -1 when nothing was bought."""
    return max((a.round_index for a in self.log), default=-1)

  def apply(self, answers: Iterable[Answer]) -> None:
    """Adds answers to the state, all or none.

    Every answer is validated first (`check_answer`, then: query not already
    annotated before this call, no item queried twice); on any error nothing
    changes. Two queries of one
    call may reveal each other (both were chosen before either was answered).
    Cost: O(len(answers) + partners).
    """
    checked, seen = [], set()
    for k, a in enumerate(answers):
      if not isinstance(a, Answer):
        raise TypeError(f"answer {k} is a {type(a).__name__}, not an Answer.")
      what = f"answer {k} ({a.modality!r}, {a.index!r})"
      a = check_answer(self.num_items, a, what)
      if self.annotated[a.modality][a.index]:
        raise ValueError(f"{what}: item is already annotated.")
      if (a.modality, a.index) in seen:
        raise ValueError(f"{what}: item is queried twice.")
      seen.add((a.modality, a.index))
      checked.append(a)
    order = {m: k for k, m in enumerate(self.num_items)}
    for a in checked:
      self.log.append(a)
      self.queried[a.modality][a.index] = True
      self.annotated[a.modality][a.index] = True
      for m, i in a.partners:
        self.annotated[m][i] = True
        key, row = ((a.modality, m), (a.index, i)) if order[a.modality] < order[m] else (
            (m, a.modality), (i, a.index))
        self._pairs.setdefault(key, {})[row] = None

  def pairs(self, a: str = "image", b: str = "text") -> np.ndarray:
    """Revealed pairs as `(P, 2)` int64 rows `(index in a, index in b)`, in reveal order."""
    for m in (a, b):
      check_modality(self.num_items, m, "pairs")
    if (a, b) in self._pairs:
      return np.array(list(self._pairs[(a, b)]), np.int64).reshape(-1, 2)
    return np.array(list(self._pairs.get((b, a), {})), np.int64).reshape(-1, 2)[:, ::-1]

  def paired(self, modality: str) -> np.ndarray:
    """`(N_m,)` bool: items that are one side of a revealed pair (S^m of the spec)."""
    check_modality(self.num_items, modality, "paired")
    mask = np.zeros(self.num_items[modality], bool)
    for other in self.num_items:
      if other != modality:
        mask[self.pairs(modality, other)[:, 0]] = True
    return mask

  def unannotated(self, modality: str, among: Sequence[int] | np.ndarray | None = None
                  ) -> np.ndarray:
    """Sorted int64 indices of items of `modality` not annotated yet.

    With `among` (e.g. a stream buffer), only those items are considered.
    """
    check_modality(self.num_items, modality, "unannotated")
    if among is None:
      return np.flatnonzero(~self.annotated[modality])
    among = np.unique(np.asarray(among, np.int64))
    return among[~self.annotated[modality][among]]

  def to_obj(self) -> dict:
    """The state as a JSON-able object: `{"version", "num_items", "log"}`."""
    return {"version": _JSON_VERSION, "num_items": self.num_items,
            "log": [a.to_json_obj() for a in self.log]}

  def to_json(self) -> str:
    """`to_obj()` as JSON text."""
    return strict_json.dumps(self.to_obj())

  @classmethod
  def from_obj(cls, obj, pool: UnalignedPool | None = None) -> AnnotationState:
    """Restores a state from `to_obj()`, replaying and re-validating its log.

    With `pool`, also checks that the state was made for a pool of the same
    sizes. Raises ValueError for anything else.
    """
    if not isinstance(obj, dict) or obj.get("version") != _JSON_VERSION:
      raise ValueError(f"Annotation state must be a JSON object with version {_JSON_VERSION}.")
    if not isinstance(obj.get("num_items"), dict) or not isinstance(obj.get("log"), list):
      raise ValueError("Annotation state needs a num_items object and a log list.")
    if pool is not None:
      sizes = {m: pool.num_items(m) for m in pool.modalities}
      if obj["num_items"] != sizes:
        raise ValueError(f"Annotation state was made for pool sizes {obj['num_items']}, "
                         f"this pool has {sizes}.")
    return cls(obj["num_items"], [Answer.from_json_obj(a) for a in obj["log"]])

  @classmethod
  def from_json(cls, text: str, pool: UnalignedPool | None = None) -> AnnotationState:
    """Restores a state written by `to_json` (see `from_obj`)."""
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"Annotation state is not valid JSON: {e}") from e
    return cls.from_obj(obj, pool)

  def save(self, path: str | os.PathLike) -> None:
    """Writes `to_json()` to `path` atomically (a crash leaves the old file whole)."""
    fs.write_text(path, self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike, pool: UnalignedPool | None = None) -> AnnotationState:
    """Reads a state saved by `save`; ValueError naming `path` if it cannot."""
    try:
      return cls.from_json(fs.read_text(path), pool)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
      raise ValueError(f"{os.fspath(path)}: {e}") from e

  def is_prefix_of(self, other: AnnotationState) -> bool:
    """True if `other` bought everything this state bought, in the same order."""
    return (self.num_items == other.num_items and
            other.log[:len(self.log)] == self.log)

  def up_to_round(self, round_index: int) -> AnnotationState:
    """The state as it was after round `round_index` (its log prefix)."""
    return AnnotationState(self.num_items, [a for a in self.log
                                            if a.round_index <= round_index])
