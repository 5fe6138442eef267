"""SimulatedOracle and FileOracle (pause, resume, bad answers files)."""
import json
import os
import threading
import time

import numpy as np
import pytest

from mmal_jax.data.annotation import Answer, AnnotationState
from mmal_jax.data.oracle import AwaitingAnnotations, FileOracle, SimulatedOracle
from mmal_jax.data.pool import UnalignedPool


def make_pool():
  """3 images, 5 captions: image 0 -> texts 0, 1; image 1 -> 2; image 2 -> none;
  texts 3 and 4 have no image."""
  return UnalignedPool(items={"image": np.zeros((3, 4, 4, 3), np.uint8),
                              "text": ["a cat", "a small cat", "a dog", "a bird", "a tree"]},
                       links={("image", "text"): [(0, 0), (0, 1), (1, 2)]})


QUERIES = [("image", 0), ("text", 2), ("image", 2)]
GOOD_LINES = [
    {"modality": "text", "index": 2, "partners": [["image", 1]]},
    {"modality": "image", "index": 0, "partners": [["text", 0], ["text", 1]], "round": 0},
    {"modality": "image", "index": 2, "partners": [], "annotator": "ann-7"},
]


def write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def test_simulated_oracle_answers_from_matching_and_counts_cost():
  oracle = SimulatedOracle(make_pool())
  answers = oracle.answer(0, QUERIES)
  assert answers == [Answer(0, "image", 0, (("text", 0), ("text", 1))),
                     Answer(0, "text", 2, (("image", 1),)),
                     Answer(0, "image", 2, ())]
  oracle.answer(1, [("text", np.int64(4))])
  assert oracle.cost == 4


@pytest.mark.parametrize("round_index, queries, match", [
    (0, [], "no queries"),
    (0, [("audio", 0)], "unknown modality 'audio'"),
    (0, [("text", 5)], "text index 5 is outside"),
    (0, [("text", 1), ("text", 1)], "queried twice"),
    (0, [("text",)], r"\(modality, index\) pair"),
    (-1, [("text", 1)], "round_index"),
])
def test_oracles_reject_bad_queries(tmp_path, round_index, queries, match):
  for oracle in (SimulatedOracle(make_pool()), FileOracle(tmp_path, make_pool())):
    with pytest.raises(ValueError, match=match):
      oracle.answer(round_index, queries)
    assert oracle.cost == 0
  assert not (tmp_path / "queries").exists()


def test_file_oracle_pause_then_resume(tmp_path):
  pool = make_pool()
  oracle = FileOracle(tmp_path, pool)
  with pytest.raises(AwaitingAnnotations) as info:
    oracle.answer(0, QUERIES)
  assert info.value.round_index == 0
  assert info.value.answers_path == str(tmp_path / "answers" / "round_0.jsonl")
  assert info.value.queries_path == str(tmp_path / "queries" / "round_0.jsonl")
  lines = [json.loads(x) for x in (tmp_path / "queries" / "round_0.jsonl").read_text().splitlines()]
  assert lines == [
      {"round": 0, "query": 0, "modality": "image", "index": 0},
      {"round": 0, "query": 1, "modality": "text", "index": 2, "item": "a dog"},
      {"round": 0, "query": 2, "modality": "image", "index": 2}]
  assert oracle.cost == 0
  assert oracle.pending_queries(0) == QUERIES
  assert oracle.pending_queries(1) is None

  # The annotator answers; a rerun (new oracle, same queries) picks up.
  write_lines(info.value.answers_path, GOOD_LINES[:2] + [""] + GOOD_LINES[2:])
  resumed = FileOracle(tmp_path, pool)
  answers = resumed.answer(0, QUERIES)
  assert answers == SimulatedOracle(pool).answer(0, QUERIES)
  assert resumed.cost == 3


def test_file_oracle_rerun_keeps_queries_file_and_rejects_other_queries(tmp_path):
  oracle = FileOracle(tmp_path, make_pool())
  with pytest.raises(AwaitingAnnotations):
    oracle.answer(3, QUERIES)
  path = tmp_path / "queries" / "round_3.jsonl"
  stat = path.stat()
  content = path.read_text()
  time.sleep(0.01)
  with pytest.raises(AwaitingAnnotations):
    oracle.answer(3, QUERIES[::-1])            # same set, other order: kept as is
  assert path.read_text() == content and path.stat().st_mtime_ns == stat.st_mtime_ns
  with pytest.raises(ValueError, match="different query set for round 3"):
    oracle.answer(3, QUERIES[:2])
  with pytest.raises(ValueError, match="different query set"):
    oracle.answer(3, QUERIES[:2] + [("text", 3)])


@pytest.mark.parametrize("edit, named", [
    # 13.11: lines appended (round 2 bought 12 of a budget of 8).
    (lambda lines: lines + [{"modality": "text", "index": 3},
                            {"modality": "text", "index": 4}], ":4: "),
    # A line naming another item (e.g. one bought in an earlier round).
    (lambda lines: lines[:1] + [{"modality": "text", "index": 0}]
     + lines[2:], ":2: "),
    (lambda lines: lines + lines[:1], ":4: ('image', 0) is listed again "
     "(first at line 1)"),
    (lambda lines: lines[:2], ".jsonl lists 2 of the 3 queries"),
])
def test_file_oracle_names_the_line_of_an_edited_queries_file(
    tmp_path, edit, named):
  """#17 item 11: the queries file is the run's own output, checked against
  the queries the run recorded; the first line that differs is named."""
  oracle = FileOracle(tmp_path, make_pool())
  with pytest.raises(AwaitingAnnotations):
    oracle.answer(1, QUERIES)
  path = oracle.queries_path(1)
  lines = [json.loads(x) for x in open(path).read().splitlines()]
  write_lines(path, edit(lines))
  write_lines(oracle.answers_path(1), GOOD_LINES)
  with pytest.raises(ValueError) as error:
    oracle.answer(1, QUERIES)
  message = str(error.value)
  assert message.startswith(path) and named in message, message
  assert "delete it and rerun" in message and "\n" not in message


def test_file_oracle_polls_until_answers_appear(tmp_path):
  oracle = FileOracle(tmp_path, make_pool(), timeout_s=20.0, poll_interval_s=0.02)
  answers_path = tmp_path / "answers" / "round_0.jsonl"

  def annotate():
    while not (tmp_path / "queries" / "round_0.jsonl").exists():
      time.sleep(0.01)
    tmp = tmp_path / "draft.jsonl"
    write_lines(str(tmp), GOOD_LINES)
    os.makedirs(answers_path.parent, exist_ok=True)
    os.replace(tmp, answers_path)

  thread = threading.Thread(target=annotate)
  thread.start()
  answers = oracle.answer(0, QUERIES)
  thread.join()
  assert [a.partners for a in answers] == [(("text", 0), ("text", 1)), (("image", 1),), ()]


def test_file_oracle_times_out(tmp_path):
  oracle = FileOracle(tmp_path, make_pool(), timeout_s=0.1, poll_interval_s=0.02)
  start = time.monotonic()
  with pytest.raises(AwaitingAnnotations, match="awaits annotations"):
    oracle.answer(0, QUERIES)
  assert time.monotonic() - start >= 0.1


@pytest.mark.parametrize("lines, match", [
    (GOOD_LINES[:2] + ["{not json"], r"round_0.jsonl:3: not valid JSON"),
    (GOOD_LINES[:2], r"1 of 3 queries are not answered, e.g. \[\('image', 2\)\]"),
    (GOOD_LINES + [GOOD_LINES[0]], r":4: answers \('text', 2\) again \(first at line 1\)"),
    (GOOD_LINES + [{"modality": "text", "index": 3, "partners": []}],
     r":4: answers \('text', 3\), which was not queried"),
    (GOOD_LINES[:2] + [{"modality": "audio", "index": 2, "partners": []}],
     ":3: unknown modality 'audio'"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": 7, "partners": []}],
     ":3: image index 7 is outside"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": 2, "partners": [["text", 9]]}],
     ":3: partner: text index 9 is outside"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": 2, "partners": [["image", 1]]}],
     ":3: partner .* own modality"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": 2, "partners": [["text", 3], ["text", 3]]}],
     ":3: partner .* listed twice"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": 2, "partners": "none"}],
     ":3: partners must be a list"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": 2, "partners": [3]}],
     r":3: partner 3 is not a \[modality, index\] pair"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": "2", "partners": []}],
     ":3: index must be an int"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": 2}], ":3: an answer needs keys modality, index, partners"),
    (GOOD_LINES[:2] + [{"modality": "image", "index": 2, "partners": [], "round": 1}],
     ":3: answer is for round 1"),
])
def test_file_oracle_bad_answers(tmp_path, lines, match):
  oracle = FileOracle(tmp_path, make_pool())
  write_lines(oracle.answers_path(0), lines)
  with pytest.raises(ValueError, match=match):
    oracle.answer(0, QUERIES)
  assert oracle.cost == 0


def test_loop_saves_state_on_pause_and_loses_nothing(tmp_path):
  """The pattern the AL loop follows: save state every round, exit on a pause."""
  pool = make_pool()
  state_path = tmp_path / "annotation.json"
  state = AnnotationState.for_pool(pool)
  state.apply(SimulatedOracle(pool).answer(0, [("text", 3)]))
  state.save(state_path)
  oracle = FileOracle(tmp_path, pool)
  with pytest.raises(AwaitingAnnotations) as info:
    oracle.answer(1, QUERIES)
  # Rerun: restore, answer, apply.
  write_lines(info.value.answers_path,
              [{k: v for k, v in line.items() if k != "round"} for line in GOOD_LINES])
  state = AnnotationState.load(state_path, pool)
  state.apply(FileOracle(tmp_path, pool).answer(1, QUERIES))
  assert state.cost == 4
  np.testing.assert_array_equal(state.pairs(), [[0, 0], [0, 1], [1, 2]])
  assert state.queried["text"][3]
