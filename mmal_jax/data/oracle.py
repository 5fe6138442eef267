"""Oracles: who answers "what is the partner of this item?" (cost 1 per query).

Every oracle has `answer(round_index, queries) -> list[Answer]` (one answer per
query, in query order) and a `cost` counter. `SimulatedOracle` answers from the
pool's hidden matching; `FileOracle` hands the queries to people through files
in a work directory and resumes when their answers are there.
"""
from __future__ import annotations

import json
import os
import time
from typing import Protocol, Sequence

from mmal_jax import fs
from mmal_jax import strict_json
from mmal_jax.data.annotation import Answer, check_answer
from mmal_jax.data.pool import ItemRef, UnalignedPool, check_int, check_ref


class Oracle(Protocol):
  cost: int

  def answer(self, round_index: int, queries: Sequence[ItemRef]) -> list[Answer]:
    ...


def check_queries(num_items, round_index: int, queries: Sequence[ItemRef]) -> list[ItemRef]:
  """Validates one round's queries; returns them as `(str, int)` tuples.

  Raises ValueError for a negative or non-int round, no queries, unknown
  modalities, indices out of range, or an item queried twice.
  """
  check_int("round_index", round_index, 0)
  if len(queries) == 0:
    raise ValueError(f"Round {round_index} has no queries.")
  out, seen = [], set()
  for k, q in enumerate(queries):
    if not (isinstance(q, (tuple, list)) and len(q) == 2):
      raise ValueError(f"query {k} must be a (modality, index) pair, got {q!r}.")
    ref = (q[0], check_ref(num_items, q[0], q[1], f"query {k}"))
    if ref in seen:
      raise ValueError(f"query {k}: {ref} is queried twice in round {round_index}.")
    seen.add(ref)
    out.append(ref)
  return out


class SimulatedOracle:
  """Answers from the pool's hidden matching: all partners of the queried item."""

  def __init__(self, pool: UnalignedPool):
    self.pool = pool
    self.cost = 0

  def answer(self, round_index: int, queries: Sequence[ItemRef]) -> list[Answer]:
    """One Answer per query. Cost: O(queries + partners)."""
    queries = check_queries(self.pool.sizes, round_index, queries)
    answers = [Answer(int(round_index), m, i, self.pool.partners(m, i)) for m, i in queries]
    self.cost += len(answers)
    return answers


class AnswerFileError(ValueError):
  """A queries or answers file of the file oracle is unreadable or wrong.

  The message names the file and line and says what is wrong.
  """


class AwaitingAnnotations(Exception):
  """The answers of a round are not there yet: save state, exit, rerun later.

  Attributes: round_index, queries_path (to answer), answers_path (to write).
  """

  def __init__(self, round_index: int, queries_path: str, answers_path: str):
    self.round_index = round_index
    self.queries_path = queries_path
    self.answers_path = answers_path
    super().__init__(
        f"Round {round_index} awaits annotations: answer every query of {queries_path} "
        f"by writing {answers_path} (one JSON line per query, see FileOracle), then rerun.")


class FileOracle:
  """Real annotation through files in `workdir`.

  For round T, `answer(T, queries)` writes `workdir/queries/round_T.jsonl`, one
  line per query, in query order:

      {"round": T, "query": k, "modality": "image", "index": 17, "item": "..."}

  (`query` is the position in the round; `item` is present when the pool holds
  the item as a string: the caption, or the image's path). It then waits up to
  `timeout_s` (polling every `poll_interval_s`) for
  `workdir/answers/round_T.jsonl`, one line per query, in any order:

      {"modality": "image", "index": 17, "partners": [["text", 3], ["text", 9]]}

  where `partners` lists the item's partners as [modality, index] (an empty
  list means "no partner"); a `round` key, if present, must be T; other keys
  are ignored; blank lines are skipped. Write the file elsewhere and move it
  into place, so that it is never read half-written. Every query must be
  answered exactly once, with known modalities other than the query's own and
  indices in range; errors name the file and line.

  Without the answers file it raises `AwaitingAnnotations`, so that the loop
  saves its state and exits. On a rerun the queries file is kept as it is if it
  holds the same queries (in any order); a line that is not one of the round's
  queries (as the run recorded them), a repeated or a missing one is an error
  naming the file and line.
  """

  def __init__(self, workdir: str | os.PathLike, pool: UnalignedPool, *,
               timeout_s: float = 0.0, poll_interval_s: float = 1.0):
    if timeout_s < 0 or poll_interval_s <= 0:
      raise ValueError(f"Need timeout_s >= 0 and poll_interval_s > 0, got {timeout_s}, "
                       f"{poll_interval_s}.")
    self.workdir = os.fspath(workdir)
    self.pool = pool
    self.timeout_s = timeout_s
    self.poll_interval_s = poll_interval_s
    self.cost = 0

  def queries_path(self, round_index: int) -> str:
    return os.path.join(self.workdir, "queries", f"round_{round_index}.jsonl")

  def answers_path(self, round_index: int) -> str:
    return os.path.join(self.workdir, "answers", f"round_{round_index}.jsonl")

  def pending_queries(self, round_index: int) -> list[ItemRef] | None:
    """The queries already written for a round (in file order), None if none were."""
    lines = self._query_lines(round_index)
    return None if lines is None else [ref for _, ref in lines]

  def _query_lines(self, round_index: int) -> list[tuple[int, ItemRef]] | None:
    """(line number, query) of a round's queries file, None if there is none."""
    path = self.queries_path(round_index)
    if not fs.exists(path):
      return None
    refs = []
    for lineno, obj in _read_jsonl(path):
      if not isinstance(obj, dict) or "modality" not in obj or "index" not in obj:
        raise AnswerFileError(f"{path}:{lineno}: a query line needs modality and index.")
      try:
        refs.append((lineno, (obj["modality"], check_ref(
            self.pool.sizes, obj["modality"], obj["index"], f"{path}:{lineno}"))))
      except ValueError as e:
        raise AnswerFileError(str(e)) from None
    return refs

  def answer(self, round_index: int, queries: Sequence[ItemRef]) -> list[Answer]:
    """Writes the round's queries (once), then reads its answers or raises.

    Raises AwaitingAnnotations when the answers file does not appear within
    `timeout_s`, AnswerFileError (a ValueError naming file and line) for a
    conflicting queries file or bad answers.
    """
    sizes = self.pool.sizes
    queries = check_queries(sizes, round_index, queries)
    written = self._query_lines(round_index)
    if written is None:
      lines = []
      for k, (m, i) in enumerate(queries):
        line = {"round": round_index, "query": k, "modality": m, "index": i}
        item = self.pool.items[m][i]
        if isinstance(item, str):
          line["item"] = item
        lines.append(strict_json.dumps(line) + "\n")
      fs.write_text(self.queries_path(round_index), "".join(lines))
    else:
      self._check_written(round_index, written, queries)
    path = self.answers_path(round_index)
    deadline = time.monotonic() + self.timeout_s
    while not fs.exists(path):
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        raise AwaitingAnnotations(round_index, self.queries_path(round_index), path)
      time.sleep(min(self.poll_interval_s, remaining))
    answers = _read_answers(path, round_index, queries, sizes)
    self.cost += len(answers)
    return answers


  def _check_written(self, round_index: int,
                     written: list[tuple[int, ItemRef]],
                     queries: list[ItemRef]) -> None:
    """Checks a queries file written earlier against the round's queries
    (the run's record of its acquisition; any order). AnswerFileError names
    the first line that differs. Cost: O(queries)."""
    path = self.queries_path(round_index)
    fix = ("it is the run's own output and a round's queries cannot change: "
           "delete it and rerun to have it written again.")
    asked, seen = set(queries), {}
    for lineno, ref in written:
      if ref not in asked:
        raise AnswerFileError(
            f"{path}:{lineno}: {ref} is not one of the {len(queries)} queries "
            f"the run picked: a different query set for round {round_index}; "
            f"{fix}")
      if ref in seen:
        raise AnswerFileError(
            f"{path}:{lineno}: {ref} is listed again (first at line "
            f"{seen[ref]}); {fix}")
      seen[ref] = lineno
    if len(seen) < len(asked):
      missing = [q for q in queries if q not in seen]
      raise AnswerFileError(
          f"{path} lists {len(seen)} of the {len(queries)} queries the run "
          f"picked (a different query set for round {round_index}; missing "
          f"e.g. {missing[:3]}); {fix}")


def _read_jsonl(path: str):
  """Yields (line number, parsed object) for the non-blank lines of a JSONL file."""
  try:
    lines = fs.read_text(path).splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise AnswerFileError(f"{path}: cannot be read ({e}).") from e
  for lineno, line in enumerate(lines, 1):
    if line.strip():
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise AnswerFileError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None


def _read_answers(path: str, round_index: int, queries: list[ItemRef],
                  num_items) -> list[Answer]:
  """Parses and validates an answers file; returns answers in query order."""
  asked = set(queries)
  found: dict[ItemRef, tuple[int, Answer]] = {}
  for lineno, obj in _read_jsonl(path):
    where = f"{path}:{lineno}"
    try:
      answer = check_answer(num_items, Answer.from_json_obj(obj, round_index),
                            where)
    except ValueError as e:
      message = str(e)
      raise AnswerFileError(message if message.startswith(where)
                            else f"{where}: {message}") from None
    ref = (answer.modality, answer.index)
    if ref not in asked:
      raise AnswerFileError(f"{where}: answers {ref}, which was not queried in "
                            f"round {round_index}.")
    if ref in found:
      raise AnswerFileError(f"{where}: answers {ref} again (first at line "
                            f"{found[ref][0]}).")
    found[ref] = (lineno, answer)
  missing = [q for q in queries if q not in found]
  if missing:
    raise AnswerFileError(f"{path}: {len(missing)} of {len(queries)} queries are not "
                          f"answered, e.g. {missing[:5]}.")
  return [found[q][1] for q in queries]
