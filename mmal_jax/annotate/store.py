"""One round's answers on the annotation page, and what they measured.

The page's record of round T is `WORKDIR/annotate/round_T.json`, rewritten
whole and atomically (`fs.write_text`) after every confirmed answer and every
undo, so a kill of the server at any moment loses no confirmed answer and
leaves no half-written file:

  {"round": T, "queries": [[modality, index], ...],
   "answers": {"<query position>": ANSWER, ...},
   "undone": [ANSWER + {"undone_at": unix time}, ...],
   "submitted_at": unix time or null}

  ANSWER = {"id": str, "partners": [[modality, index], ...] ([] = none),
            "time_s": seconds the person spent on the query,
            "rank": 1-based rank of the chosen partner in the query's ranked
                    matches (null: "none", or not among them),
            "shown": how many matches the page showed (the page's top K),
            "true_rank": the same for the partners the dataset itself
                         records (null: none recorded, or not ranked),
            "true_partners": how many partners the dataset records,
            "via": "ranking" (the shown top K) | "more" (further down the
                   ranking) | "search" (caption filter) | "similar"
                   (browse by similarity) | "none",
            "input": "click" | "key", "client": the browser tab's id,
            "at": unix time}

Every query answered, `submit()` writes the file oracle's
`WORKDIR/answers/round_T.jsonl` atomically, one line per query in query order
(`{"round", "modality", "index", "partners"}`, the format the run reads), and
the run continues with `python -m mmal_jax.main` as before. The answers of a
query change only by compare-and-set under one lock (`answer` fails on an
answered query, `undo` only removes the answer it names), so two browsers
never produce two answers for one query. `summary` and `markdown` turn the
records of a workdir into the run report's table.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import uuid

import numpy as np

from mmal_jax import fs
from mmal_jax import strict_json
from mmal_jax.data.annotation import Answer, check_answer

VIAS = ("ranking", "more", "search", "similar", "none")
INPUTS = ("click", "key")


class Conflict(Exception):
  """A change refused: the query was answered meanwhile, the answer to undo
  is not the current one, the round is submitted or not complete. `answer`
  holds the query's current answer, if any."""

  def __init__(self, message: str, answer: dict | None = None):
    super().__init__(message)
    self.answer = answer


def record_path(workdir: str, round_index: int) -> str:
  return os.path.join(workdir, "annotate", f"round_{round_index}.json")


def answers_path(workdir: str, round_index: int) -> str:
  """The file oracle's answers file (`data.oracle.FileOracle`)."""
  return os.path.join(workdir, "answers", f"round_{round_index}.jsonl")


class RoundStore:
  """The answers of one round being annotated (thread-safe).

  Args:
    workdir: the run's workdir (local or gs://).
    round_index: T.
    queries: the round's queries `(modality, index)`, in query order.
    num_items: modality -> pool size (answers are checked as the run will).
    rank_of: `(query position, partners) -> rank or None` (the ranking
      file's `Ranking.rank_of`; None without one).
    true_partners: `(modality, index) -> partners` known to the dataset
      (`UnalignedPool.partners`), or None.

  Raises ValueError naming the record file if it is unreadable or belongs to
  other queries.
  """

  def __init__(self, workdir: str, round_index: int, queries, num_items,
               rank_of=None, true_partners=None):
    self.workdir = workdir
    self.round_index = round_index
    self.queries = [(str(m), int(i)) for m, i in queries]
    self.num_items = dict(num_items)
    self._rank_of = rank_of
    self._true_partners = true_partners
    self._lock = threading.Lock()
    self.path = record_path(workdir, round_index)
    self.answers_path = answers_path(workdir, round_index)
    self.answers: dict[int, dict] = {}
    self.undone: list[dict] = []
    self.submitted_at = None
    self.version = 0
    if fs.exists(self.path):
      self._load()

  def _load(self) -> None:
    try:
      record = json.loads(fs.read_text(self.path))
      saved = [(m, i) for m, i in record["queries"]]
      answers = {int(k): v for k, v in record["answers"].items()}
      undone = list(record["undone"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{self.path} cannot be read ({e}). It holds the "
                       f"page's answers of round {self.round_index}: restore "
                       f"it, or delete it to answer the round again.") from e
    if saved != self.queries:
      raise ValueError(f"{self.path} holds answers to other queries than "
                       f"round {self.round_index}'s queries file: move it "
                       f"away to answer this round anew.")
    self.answers, self.undone = answers, undone
    self.submitted_at = record.get("submitted_at")

  # ------------------------------------------------------------------

  @property
  def submitted(self) -> bool:
    return self.submitted_at is not None or fs.exists(self.answers_path)

  @property
  def complete(self) -> bool:
    return len(self.answers) == len(self.queries)

  def _save(self) -> None:
    self.version += 1
    fs.write_text(self.path, strict_json.dumps({
        "round": self.round_index, "queries": [list(q) for q in self.queries],
        "answers": {str(k): v for k, v in sorted(self.answers.items())},
        "undone": self.undone, "submitted_at": self.submitted_at}))

  def _check_open(self, query: int) -> None:
    if not (isinstance(query, int) and 0 <= query < len(self.queries)):
      raise ValueError(f"query must be a position in 0..{len(self.queries) - 1}"
                       f", got {query!r}.")
    if self.submitted:
      raise Conflict(f"Round {self.round_index} is submitted "
                     f"({self.answers_path}); nothing can change now.",
                     self.answers.get(query))

  def answer(self, query: int, partners, *, time_s: float, via: str,
             input: str = "click", client: str = "", shown: int = 0) -> dict:
    """Records the answer to query `query` if it has none (compare-and-set).

    Returns the stored answer. Raises Conflict if the query is answered
    already (the stored answer attached) or the round is submitted,
    ValueError for partners the run would refuse or bad fields. Cost: one
    atomic write of the round's record.
    """
    if via not in VIAS or input not in INPUTS:
      raise ValueError(f"via must be one of {VIAS} and input one of {INPUTS}.")
    if not (isinstance(time_s, (int, float)) and math.isfinite(time_s)
            and time_s >= 0):
      raise ValueError(f"time_s must be a non-negative number, got {time_s!r}.")
    with self._lock:
      self._check_open(query)
      modality, index = self.queries[query]
      checked = check_answer(self.num_items, Answer(
          self.round_index, modality, index,
          tuple((m, i) for m, i in partners)), f"query {query}")
      if query in self.answers:
        raise Conflict(f"Query {query} is answered already.",
                       self.answers[query])
      partners = [list(p) for p in checked.partners]
      if (via == "none") != (not partners):
        raise ValueError("via 'none' goes with no partners, and only it.")
      truth = (self._true_partners(modality, index)
               if self._true_partners else ())
      rank = self._rank_of(query, checked.partners) if self._rank_of else None
      true_rank = (self._rank_of(query, truth)
                   if self._rank_of and truth else None)
      entry = {"id": uuid.uuid4().hex[:12], "partners": partners,
               "time_s": round(float(time_s), 3), "rank": rank,
               "shown": int(shown), "true_rank": true_rank,
               "true_partners": len(truth), "via": via,
               "input": input, "client": str(client)[:64], "at": time.time()}
      self.answers[query] = entry
      self._save()
      return entry

  def undo(self, query: int, answer_id: str) -> None:
    """Removes query `query`'s answer if it is still the one `answer_id`
    names (compare-and-set). Raises Conflict otherwise or when the round is
    submitted."""
    with self._lock:
      self._check_open(query)
      current = self.answers.get(query)
      if current is None or current["id"] != answer_id:
        raise Conflict(f"Query {query}'s answer changed meanwhile; not "
                       f"undone.", current)
      del self.answers[query]
      self.undone.append(dict(current, undone_at=time.time()))
      self._save()

  def submit(self) -> str:
    """Writes the run's answers file (atomically) once every query is
    answered; returns its path. Raises Conflict if a query is unanswered or
    an answers file is there already (written by hand or by another
    server)."""
    with self._lock:
      if self.submitted:
        raise Conflict(f"{self.answers_path} exists already: round "
                       f"{self.round_index} is submitted.")
      missing = [k for k in range(len(self.queries)) if k not in self.answers]
      if missing:
        raise Conflict(f"{len(missing)} of {len(self.queries)} queries are "
                       f"not answered (first: {missing[0]}).")
      fs.write_text(self.answers_path, "".join(
          strict_json.dumps({"round": self.round_index, "modality": m, "index": i,
                      "partners": self.answers[k]["partners"]}) + "\n"
          for k, (m, i) in enumerate(self.queries)))
      self.submitted_at = time.time()
      self._save()
      return self.answers_path


# ----------------------------------------------------------------------
# Measurements.


def _records(workdir: str) -> list[dict]:
  folder = os.path.join(workdir, "annotate")
  if not fs.isdir(folder):
    return []
  out = []
  for name in fs.glob(folder, "round_*.json"):
    if re.fullmatch(r"round_\d+\.json", os.path.basename(name)):
      try:
        out.append(json.loads(fs.read_text(name)))
      except (OSError, UnicodeDecodeError, ValueError):
        continue  # The report leaves out what it cannot read.
  return sorted(out, key=lambda r: r.get("round", 0))


def _share(hits: int, total: int) -> str:
  return f"{hits}/{total} ({100 * hits / total:.0f}%)" if total else "-"


def summary(record: dict) -> dict:
  """One round's measurements: answered and queried counts, seconds per
  answer (median, mean), partners chosen within the shown top K (of the
  answers naming a partner), found below it (more, search, similarity),
  "none" answers,
  undos, and the dataset's true partner within the top K (where known)."""
  answers = list(record["answers"].values())
  times = [a["time_s"] for a in answers]
  chosen = [a for a in answers if a["partners"]]
  known = [a for a in answers if a.get("true_partners")]
  return {
      "round": record["round"], "queries": len(record["queries"]),
      "answered": len(answers),
      "median_s": float(np.median(times)) if times else None,
      "mean_s": float(np.mean(times)) if times else None,
      "chosen": len(chosen),
      "in_top_k": sum(a["rank"] is not None and a["rank"] <= a["shown"]
                      for a in chosen),
      "searched": sum(a["via"] in ("more", "search", "similar")
                      for a in answers),
      "none": sum(a["via"] == "none" for a in answers),
      "undos": len(record["undone"]),
      "true_known": len(known),
      "true_in_top_k": sum(a["true_rank"] is not None and
                           a["true_rank"] <= a["shown"] for a in known),
      "submitted": record.get("submitted_at") is not None}


def markdown(workdir: str) -> list[str]:
  """Markdown lines of the report's "Annotation in the browser" table, one
  row per round answered on the page; empty when none was."""
  rows = [summary(r) for r in _records(workdir)]
  if not rows:
    return []
  lines = [
      "## Annotation in the browser", "",
      "Rounds answered on the page (`python -m mmal_jax.annotate`): seconds "
      "a person spent per answer; how often the partner they chose was among "
      "the top K matches the page showed (ranked by the towers that acquired "
      "the round), how often they found it below (further down the "
      "ranking, by caption search or by similarity), answered \"none\", or "
      "undid; and, where the dataset knows the true partner, how often it "
      "was in that top K.", "",
      "| round | answered | s / answer (median, mean) | chosen partner in "
      "top K | found below it | none | undos | true partner in top K |",
      "|---|---|---|---|---|---|---|---|"]
  for s in rows:
    seconds = ("-" if s["median_s"] is None else
               f"{s['median_s']:.1f}, {s['mean_s']:.1f}")
    lines.append(
        f"| {s['round']} | {s['answered']}/{s['queries']}"
        f"{'' if s['submitted'] else ' (open)'} | {seconds} | "
        f"{_share(s['in_top_k'], s['chosen'])} | {s['searched']} | "
        f"{s['none']} | {s['undos']} | "
        f"{_share(s['true_in_top_k'], s['true_known'])} |")
  return lines + [""]
