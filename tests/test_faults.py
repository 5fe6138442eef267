"""Faults in a run's own files: damaged between runs, or SIGKILL mid-run.

Issue 13 (items 1-8) and 10 section 2. Every case ends in the same result as
one uninterrupted run (annotated sets, snapshots, metrics rows minus
timings, final parameters) or in a one-line error naming the file, with
every bought pair kept.
"""
import json
import logging
import os
import pathlib
import shutil
import socket

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

from mmal_jax import config_lib
from mmal_jax import loop
from mmal_jax import mmcsal
from mmal_jax import report
from mmal_jax import run_state
from mmal_jax import train
from mmal_jax.data import AnnotationState
from mmal_jax.data.annotation import Answer
from mmal_jax.models import checkpoint
from test_cli_errors import main_env
from test_cli_errors import run_main
from test_cli_errors import write_config
from test_loop import tiny_config
import test_mmcsal

# One strategy; a train checkpoint every step (rounds of 2 and 4 steps).
OVERRIDES = {"strategies": ("mmal",), "train.checkpoint_every": 1}
TIMINGS = report.TIMING_KEYS
RUN = os.path.join("runs", "mmal", "seed_0")


def _config():
  return tiny_config(**OVERRIDES)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the module's config."""
  workdir = str(tmp_path_factory.mktemp("faults") / "reference")
  loop.run_experiment(_config(), workdir)
  return workdir


def outcome(workdir) -> dict:
  """What a run produced: rows minus timings, annotation files, params."""
  rows = sorted(report.read_rows(os.path.join(workdir, "metrics.jsonl")),
                key=lambda r: r["round"])
  run = os.path.join(workdir, RUN)
  files = {name: open(os.path.join(run, name)).read() for name in (
      "annotation.json", "annotated/round_1.json", "annotated/round_2.json")}
  ckpt = run_state.RunCheckpoints(os.path.join(run, "ckpt"))
  step = ckpt.steps()[-1]
  meta = ckpt.restore_meta(step)
  params = ckpt.restore_arrays(step, "params", None)
  ckpt.close()
  return {"rows": [{k: v for k, v in r.items() if k not in TIMINGS}
                   for r in rows],
          "files": files, "meta": (meta["round"], meta["phase"]),
          "params": jax.tree.map(np.asarray, params)}


def assert_same(workdir, reference):
  got, want = outcome(workdir), outcome(reference)
  assert got["rows"] == want["rows"]
  assert got["files"] == want["files"]
  assert got["meta"] == want["meta"] == (2, "evaluated")
  jax.tree.map(np.testing.assert_array_equal, got["params"], want["params"])
  bought = json.loads(got["files"]["annotation.json"])["log"]
  refs = [(a["modality"], a["index"]) for a in bought]
  assert len(refs) == len(set(refs)) == 16  # None twice, none lost.


def _copy(reference, tmp_path, name):
  workdir = str(tmp_path / name)
  shutil.copytree(reference, workdir)
  return workdir


def _one_line_naming(error, path):
  message = str(error.value)
  assert "\n" not in message and path in message, message


def test_torn_files_are_rebuilt(reference, tmp_path):
  """13.1 pretrained/params.npz, 13.3 metrics.jsonl, 13.4 annotation.json
  and 13.8 a snapshot, torn or garbage: rebuilt; same result."""
  workdir = _copy(reference, tmp_path, "torn")
  npz = os.path.join(workdir, "pretrained", "params.npz")
  data = open(npz, "rb").read()
  open(npz, "wb").write(data[:len(data) // 2])
  metrics = os.path.join(workdir, "metrics.jsonl")
  text = open(metrics).read()
  open(metrics, "w").write(text[:len(text) - 100])  # Mid-way in round 2's row.
  open(os.path.join(workdir, RUN, "annotation.json"), "w").write('{"ver')
  open(os.path.join(workdir, RUN, "annotated", "round_1.json"), "w").write(
      "\x00garbage")
  loop.run_experiment(_config(), workdir)
  assert_same(workdir, reference)
  want = checkpoint.read(os.path.join(reference, "pretrained", "params.npz"))
  got = checkpoint.read(npz)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bad_metrics_line_is_named(reference, tmp_path):
  """13.3: a damaged line that is not the last one stops with file:line."""
  workdir = _copy(reference, tmp_path, "metrics")
  metrics = os.path.join(workdir, "metrics.jsonl")
  lines = open(metrics).read().splitlines(keepends=True)
  lines[1] = lines[1][:40] + "\n"
  open(metrics, "w").write("".join(lines))
  with pytest.raises(report.MetricsFileError) as error:
    loop.run_experiment(_config(), workdir)
  _one_line_naming(error, f"{metrics}:2")
  assert open(metrics).read() == "".join(lines)  # Left for the user to fix.


def test_shortened_annotation_never_loses_paid_pairs(reference, tmp_path):
  """13.5: a valid annotation.json without round 2 is restored from the
  checkpoint; with no other record of round 2, the run stops naming it."""
  workdir = _copy(reference, tmp_path, "short")
  run = os.path.join(workdir, RUN)
  shutil.copy(os.path.join(run, "annotated", "round_1.json"),
              os.path.join(run, "annotation.json"))
  loop.run_experiment(_config(), workdir)
  assert_same(workdir, reference)

  shutil.copy(os.path.join(run, "annotated", "round_1.json"),
              os.path.join(run, "annotation.json"))
  os.remove(os.path.join(run, "annotated", "round_2.json"))
  shutil.rmtree(os.path.join(run, "ckpt"))
  metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
  with pytest.raises(run_state.RunStateError) as error:
    loop.run_experiment(_config(), workdir)
  _one_line_naming(error, os.path.join(workdir, "metrics.jsonl"))
  assert "16 queries" in str(error.value) and "only 8" in str(error.value)
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics


def test_annotation_with_more_answers_than_queried_is_refused(reference,
                                                              tmp_path):
  """#17 item 12: answers added to annotation.json (to a round the
  checkpoint holds, or beyond a round's budget) stop the run naming it,
  instead of rows claiming pairs the model never trained on."""
  workdir = _copy(reference, tmp_path, "more")
  path = os.path.join(workdir, RUN, "annotation.json")
  kept = open(path).read()
  state = AnnotationState.from_json(kept)
  free = [i for i in range(len(state.annotated["text"]))
          if not state.annotated["text"][i]]
  for round_index, named in ((2, "2 answers to rounds [2] that the "
                                 "checkpoint"),
                             (3, "round 3: 9 answers for a budget of 8")):
    edited = AnnotationState.from_json(kept)
    count = 2 if round_index == 2 else 9
    edited.apply([Answer(round_index, "text", i) for i in free[:count]])
    open(path, "w").write(edited.to_json())
    with pytest.raises(run_state.RunStateError) as error:
      loop.run_experiment(_config(), workdir)
    _one_line_naming(error, path)
    assert "more answers than run [mmal seed 0] queried" in str(error.value)
    assert named in str(error.value), str(error.value)
    assert open(path).read() == edited.to_json()  # Left for the user.
  open(path, "w").write(kept)


def test_damaged_checkpoint_falls_back(reference, tmp_path, monkeypatch):
  """13.6: a finished run reruns without restoring arrays; a damaged latest
  step falls back to the one before and ends the same."""
  workdir = _copy(reference, tmp_path, "ckpt")

  def no_arrays(*args, **kwargs):
    raise AssertionError("a finished run restored its arrays")

  with monkeypatch.context() as patch:
    patch.setattr(run_state.RunCheckpoints, "restore_arrays", no_arrays)
    text = loop.run_experiment(_config(), workdir)
  assert text.startswith("Nothing left to do")

  ckpt = os.path.join(workdir, RUN, "ckpt")
  evaluated = run_state.step_folder(ckpt, run_state.step_number(2, "evaluated"))
  os.remove(os.path.join(evaluated, "meta", "metadata"))  # Its JSON gone.
  loop.run_experiment(_config(), workdir)  # From round 2's training step 4.
  assert_same(workdir, reference)

  shutil.rmtree(evaluated)
  step_4 = run_state.step_folder(ckpt, run_state.step_number(2, "training", 4))
  shutil.rmtree(os.path.join(step_4, "train", "d"))  # Its arrays gone.
  loop.run_experiment(_config(), workdir)  # From step 3: trains step 4.
  assert_same(workdir, reference)


def test_truncated_config_json_is_one_line(reference, tmp_path):
  """13.7."""
  workdir = _copy(reference, tmp_path, "config")
  path = os.path.join(workdir, "config.json")
  open(path, "w").write(open(path).read()[:50])
  with pytest.raises(config_lib.ConfigError) as error:
    loop.run_experiment(_config(), workdir)
  _one_line_naming(error, path)


def test_nan_loss_stops_naming_the_step_and_keeps_pairs(tmp_path):
  """#8.18: a diverged loss names the round, step and field to change."""
  workdir = str(tmp_path / "nan")
  config = tiny_config(strategies=("mmal",), **{"init.kind": "scratch",
                                                "optim.lr": 1e30})
  with pytest.raises(train.TrainingDiverged, match=(
      r"^\[mmal seed 0\] round 1/2 step [12]/2: the loss is nan\. Lower "
      r"config\.optim\.lr \(now 1e\+30\).*kept")):
    loop.run_experiment(config, workdir)
  state = AnnotationState.load(os.path.join(workdir, RUN, "annotation.json"))
  assert state.cost == 8  # Round 1's queries are kept.
  config = tiny_config(strategies=("mmal",), **{"pretrain.lr": 1e30})
  with pytest.raises(train.TrainingDiverged, match=(
      r"^\[pretrain\] step [1-3]/3: the loss is nan\. Lower "
      r"config\.pretrain\.lr \(now 1e\+30\)")):
    loop.run_experiment(config, str(tmp_path / "nan_pretrain"))


@pytest.mark.slow
def test_sigkill_anywhere_resumes_exactly(reference, tmp_path, caplog):
  """10.2 / 13.2: SIGKILL at every named point of a run (`faults.point`),
  one after the other in one workdir; the end is the uninterrupted run's."""
  if jax.device_count() > 1:
    pytest.skip("Kill points are device-count independent; the 1-device "
                "pass runs this (test_device_independence covers meshes).")
  config = write_config(tmp_path / "config.py", f"**{OVERRIDES!r}")
  workdir = str(tmp_path / "killed")
  env = main_env()
  kills = (
      "pretrain_checkpoint:2",  # Pre-training's step 2 save just issued.
      "acquired:1",            # Round 1 bought, not saved yet.
      "annotation_written:1",  # annotation.json written, its snapshot not.
      "round_end:1",           # Round 1 done.
      "checkpoint_saved:2",    # Round 2 step 1's async save just issued.
      "train_checkpoint:2",    # Round 2 mid-training (after step 2 or 3).
      # #17 item 6: SIGTERM with the next training step's save in flight,
      # Ctrl-C after round 2: one line, 143 / 130, the save committed.
      "checkpoint_saved:1:TERM",
      "round_end:1:INT",
      "report:1",              # Every round done, no results.md yet.
  )
  ckpt = os.path.join(workdir, RUN, "ckpt")

  def committed_steps():
    checkpoints = run_state.RunCheckpoints(ckpt)
    steps = checkpoints.steps()
    checkpoints.close()
    return steps

  for kill in kills:
    steps = committed_steps() if kill.endswith("TERM") else None
    rc, _, stderr = run_main({kill: ["--config", config, "--workdir",
                                     workdir]},
                             env={**env, "MMAL_KILL_AT": kill})[kill]
    if kill.endswith(("TERM", "INT")):
      name, status = (("SIGTERM", 143) if kill.endswith("TERM")
                      else ("SIGINT", 130))
      assert rc == status, (kill, stderr[-3000:])
      assert "Traceback" not in stderr, stderr
      assert stderr.strip().splitlines()[-1].startswith(
          f"mmal_jax.main: stopped by {name}: "), stderr[-3000:]
      assert not os.path.exists(os.path.join(workdir, "lock"))  # Released.
      if steps is not None:  # The save in flight at SIGTERM committed.
        after = committed_steps()
        assert after[-1] > steps[-1] and after[-1] % run_state.STRIDE not in (
            0, run_state.EVALUATED), (steps, after)
      continue
    assert rc == -9, (kill, stderr[-3000:])
    if kill == "annotation_written:1":
      assert not os.path.exists(os.path.join(workdir, RUN, "annotated"))
    if kill == "pretrain_checkpoint:2":
      assert not os.path.exists(os.path.join(workdir, "pretrained",
                                             "params.npz"))
  assert not os.path.exists(os.path.join(workdir, "results.md"))
  # #17 item 5: the SIGKILLed process left its lock; a dead pid on this host
  # makes it stale, so the resume breaks it at once and releases its own.
  lock = json.loads(open(os.path.join(workdir, "lock")).read())
  assert lock["host"] == socket.gethostname() and lock["pid"] != os.getpid()
  with caplog.at_level(logging.WARNING):
    text = loop.run_experiment(_config(), workdir)  # The same run, resumed.
  assert "Breaking the stale lock" in caplog.text
  assert not os.path.exists(os.path.join(workdir, "lock"))
  assert text.startswith("Nothing left to do")
  assert os.path.exists(os.path.join(workdir, "results.md"))
  assert_same(workdir, reference)
  jax.tree.map(np.testing.assert_array_equal, *(checkpoint.read(os.path.join(
      w, "pretrained", "params.npz")) for w in (workdir, reference)))


# test_mmcsal's tiny config with one selector per Stage-1 variant.
COLD_START_STRATEGIES = ("random", "mmcsal")


def _cold_start_config():
  config = test_mmcsal.tiny_config()
  config.strategies = COLD_START_STRATEGIES
  config.stage1.checkpoint_every_epochs = 1
  return mmcsal.validate(config)


def cold_start_outcome(workdir) -> dict:
  """What a cold-start run produced: rows minus timings, the picks files,
  the Stage-1 files minus their seconds."""
  rows = report.read_rows(os.path.join(workdir, "metrics.jsonl"))
  picks = {str(p.relative_to(workdir)): p.read_text()
           for p in pathlib.Path(workdir).glob("runs/*/seed_0/round_*.json")}
  stage1 = {}
  for path in pathlib.Path(workdir).glob("stage1/*.npz"):
    with np.load(path) as f:
      stage1[path.name] = {k: f[k] for k in f.files if k != "seconds"}
  return {"rows": [{k: v for k, v in r.items() if k not in TIMINGS}
                   for r in rows], "picks": picks, "stage1": stage1}


def _scalars(folder, tag) -> dict:
  """step -> value of `tag` over every event file in `folder`."""
  return {e.step: v.simple_value for path in sorted(folder.glob(
      "events.out.*")) for e in event_file_loader.LegacyEventFileLoader(
          str(path)).Load() for v in e.summary.value if v.tag == tag}


@pytest.mark.slow
def test_cold_start_sigkill_anywhere_resumes_exactly(tmp_path):
  """#19 item 1: MMCSAL SIGKILLed where it writes its state (mid-Stage-1
  with a checkpoint save in flight, in the warm-up and in the prototype
  phase; a Stage-1 variant saved; a selection's picks saved, its row not;
  a row saved) and SIGTERMed mid-Stage-1, one stop after the other in one
  workdir, ends as an uninterrupted run; TensorBoard holds every row and
  Stage-1 step, and Stage 1's throughput."""
  if jax.device_count() > 1:
    pytest.skip("Kill points are device-count independent; the 1-device "
                "pass runs this.")
  reference = str(tmp_path / "reference")
  mmcsal.run_cold_start(_cold_start_config(), reference)
  config = tmp_path / "cold_start.py"
  config.write_text(
      f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
      f"from test_mmcsal import tiny_config\n\n\ndef get_config():\n"
      f"  config = tiny_config()\n"
      f"  config.strategies = {COLD_START_STRATEGIES!r}\n"
      f"  config.stage1.checkpoint_every_epochs = 1\n  return config\n")
  workdir = str(tmp_path / "killed")
  cross_ckpt = os.path.join(workdir, "stage1", "cross_seed_0_ckpt")

  def committed_steps():
    checkpoints = run_state.RunCheckpoints(cross_ckpt)
    steps = checkpoints.steps()
    checkpoints.close()
    return steps

  # Units in order: random budgets 1, 2 (Stage 1 "cross" first), then
  # mmcsal budgets 1, 2 (Stage 1 "proto" first; 4 epochs, prototypes from
  # the third); counts are per process.
  for kill in ("stage1_checkpoint:2",  # "cross" epoch 2's save in flight.
               "stage1_checkpoint:1:TERM",  # The next save; SIGTERM.
               "picks_written:2",   # random budget 2 picked, no row.
               "stage1_checkpoint:3",  # "proto" after a prototype epoch
                                       # (random budget 2's row saved).
               "round_end:1"):      # mmcsal budget 1's row saved.
    steps = committed_steps() if kill.endswith("TERM") else None
    rc, _, stderr = run_main(
        {kill: ["--config", str(config), "--workdir", workdir]},
        env={**main_env(), "MMAL_KILL_AT": kill})[kill]
    if steps is not None:
      assert rc == 143, (kill, stderr[-3000:])
      assert stderr.strip().splitlines()[-1].startswith(
          "mmal_jax.main: stopped by SIGTERM: "), stderr[-3000:]
      assert not os.path.exists(os.path.join(workdir, "lock"))
      assert committed_steps()[-1] > steps[-1], (steps, committed_steps())
    else:
      assert rc == -9, (kill, stderr[-3000:])
  assert not os.path.exists(os.path.join(workdir, "results.md"))
  assert len(report.read_rows(os.path.join(workdir, "metrics.jsonl"))) == 3
  mmcsal.run_cold_start(_cold_start_config(), workdir)
  got, want = cold_start_outcome(workdir), cold_start_outcome(reference)
  assert got["rows"] == want["rows"] and len(got["rows"]) == 4
  assert got["picks"] == want["picks"] and len(got["picks"]) == 4
  assert sorted(got["stage1"]) == ["cross_seed_0.npz", "proto_seed_0.npz"]
  for name, arrays in want["stage1"].items():
    jax.tree.map(np.testing.assert_array_equal, got["stage1"][name], arrays)
  # Checkpoints live while Stage 1 trains; the .npz replaces them.
  assert sorted(os.listdir(os.path.join(workdir, "stage1"))) == sorted(
      got["stage1"])
  board = tmp_path / "killed" / "tensorboard"
  for row in got["rows"]:
    accuracy = _scalars(board / f"{row['strategy']}_seed_0", "accuracy")
    assert accuracy[row["queries"]] == pytest.approx(row["accuracy"])
  hours = {(r["strategy"], r["round"]): r["device_hours"] for r in
           report.read_rows(os.path.join(workdir, "metrics.jsonl"))}
  for strategy in COLD_START_STRATEGIES:  # Cumulative over a run's rounds.
    assert 0 < hours[strategy, 1] < hours[strategy, 2]
  for name, arrays in got["stage1"].items():
    folder = board / f"stage1_{name[:-4]}"
    losses = _scalars(folder, "stage1/loss")
    assert sorted(losses) == list(range(1, len(arrays["step_losses"]) + 1))
    np.testing.assert_allclose([losses[k] for k in sorted(losses)],
                               arrays["step_losses"], rtol=1e-6)
    assert _scalars(folder, "stage1/examples_per_s_per_device")
  assert os.path.exists(os.path.join(workdir, "results.md"))
