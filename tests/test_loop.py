"""End-to-end active-learning runs on tiny data: pool, stream, resume, file oracle, COCO."""
import functools
import json
import logging
import os
import pathlib
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

from mmal_jax import config_lib
from mmal_jax import experiment as experiment_lib
from mmal_jax import faults
from mmal_jax import fs
from mmal_jax import loop
from mmal_jax import report
from mmal_jax import run_state
from mmal_jax import strict_json
from mmal_jax import workdir_lock
from mmal_jax.data import AnnotationState
from mmal_jax.data import AwaitingAnnotations

SHARED = pathlib.Path(os.environ.get(
    "MMAL_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
COCO_MINI = SHARED / "data" / "coco_mini"


def tiny_config(**overrides):
  """Seconds-per-round experiment: 24 groups (48 pairs), 16 px, width 16."""
  config = config_lib.base_config()
  config.data.update(num_groups=24, num_eval_groups=6, image_size=16,
                     pretrain_size=48)
  config.strategies = ("random", "mmal")
  config.seeds = (0,)
  # Budgets and batches of 8 keep every batch divisible by 1 or 8 devices.
  config.budget = 8
  config.num_rounds = 2
  config.strategy_hparams.mmal.coreset_size = 16
  config_lib.use_small_towers(config, width=16, depth=1, patch=8, res=16,
                              text_len=24)
  config.pretrain.update(epochs=1, batch_size=16)
  config.train.update(epochs=2, batch_size=8, checkpoint_every=0)
  config.eval.embed_batch_size = 16
  _override(config, overrides)
  return config_lib.validate(config)


def _override(config, overrides: dict) -> None:
  """Sets dotted `config` fields (`"train.epochs": 2`)."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value


def _load_config(name: str):
  """`configs/<name>`'s `get_config()`."""
  return config_lib.from_file(
      str(pathlib.Path(__file__).resolve().parents[1] / "configs" / name))


def _rows(workdir):
  return report.read_rows(os.path.join(workdir, "metrics.jsonl"))


def _state(workdir, strategy, seed=0):
  return AnnotationState.load(os.path.join(
      workdir, "runs", strategy, f"seed_{seed}", "annotation.json"))


def test_pool_run_writes_every_output(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  workdir = str(tmp_path / "pool")
  drawn = []
  real_plot = loop.plots.embedding_plot
  monkeypatch.setattr(loop.plots, "embedding_plot", lambda z, picked, *a, **k:
                      drawn.append((z, picked)) or real_plot(z, picked, *a, **k))
  real_evaluate = loop.Experiment.evaluate
  # Undefined (NaN) and infinite metrics, as margin/correct is before any
  # pseudo-label is correct.
  monkeypatch.setattr(loop.Experiment, "evaluate", lambda self, *a: {
      **real_evaluate(self, *a), "undefined": float("nan"),
      "unbounded": np.float32("inf")})
  text = loop.run_experiment(tiny_config(**{"report.embedding_plot": True}),
                             workdir)
  rows = _rows(workdir)
  assert len(rows) == 2 * 3  # strategies x rounds 0..2
  for row in rows:
    assert row["queries"] == 8 * row["round"]
    assert row["percent"] == pytest.approx(100 * row["queries"] / 48)
    assert row["skipped_items"] == 0  # Rendered shapes: nothing to decode.
    for key in ("colorswap/group", "groupmatch", "retrieval/i2t_r@1",
                "pseudo_label/mean", "modality_gap/gap"):
      assert np.isfinite(row[key])
    if row["round"]:
      assert row["acquire_s"] > 0 and row["train_s"] > 0
      assert row["train_steps"] == 2 * (row["pairs"] // 8)
      assert sum(row["modality_counts"].values()) == 8
  for name in ("config.json", "results.md", "al_curves.png",
               "modality_queries.png", "seconds_per_round.png",
               "pretrained/params.npz", "embedding.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert "colorswap/group" in text and "savings" in text
  for strategy in ("random", "mmal"):
    state = _state(workdir, strategy)
    assert state.cost == 16 and len(state.pairs()) == 16
    snapshot = os.path.join(workdir, "runs", strategy, "seed_0", "annotated",
                            "round_1.json")
    assert AnnotationState.from_json(open(snapshot).read()).cost == 8
  events = [p for p in (tmp_path / "pool" / "tensorboard").rglob(
      "events.out.*") if p.parent.name != "report"]  # report: results.md.
  assert len(events) == 2
  for path in events:
    tags = {v.tag for e in event_file_loader.LegacyEventFileLoader(
        str(path)).Load() for v in e.summary.value}
    assert {"train/examples_per_s", "train/steps_per_s",
            "train/examples_per_s_per_device", "percent"} <= tags, tags
  for strategy in ("random", "mmal"):
    hours = [r["device_hours"] for r in sorted(
        (r for r in rows if r["strategy"] == strategy),
        key=lambda r: r["round"])]
    assert hours[0] == 0.0 and hours[0] < hours[1] < hours[2]
  log = caplog.text
  assert re.search(r"Progress: 4/4 rounds, ETA 0:00:00", log), log
  assert re.search(r"examples/s \(\d+\.\d/device\), \d+\.\d+ steps/s, "
                   r"ETA \d+:\d\d:\d\d", log)
  assert re.search(r"round 2: embedded \d+ images \+ \d+ texts in", log)
  assert "round 2: mmal picked 8 queries in" in log
  (z, picked), = drawn  # The pool's images; each strategy's bought images.
  assert z.shape[0] == 48
  for strategy in ("random", "mmal"):
    np.testing.assert_array_equal(picked[strategy], np.flatnonzero(
        _state(workdir, strategy).annotated["image"]))
  # Every JSON file the run wrote is strict JSON (no bare NaN/Infinity);
  # undefined metrics are null and read back as None, the rows in the
  # checkpoints' meta equal those of metrics.jsonl.
  written = [p for p in pathlib.Path(workdir).rglob("*.json*")
             if p.suffix in (".json", ".jsonl")]
  assert len(written) >= 6, written
  for path in written:
    for line in (path.read_text().splitlines() if path.suffix == ".jsonl"
                 else [path.read_text()]):
      strict_json.loads(line)
  assert all(r["undefined"] is None and r["unbounded"] is None for r in rows)
  for strategy in ("random", "mmal"):
    checkpoints = run_state.RunCheckpoints(os.path.join(
        workdir, "runs", strategy, "seed_0", "ckpt"))
    meta = checkpoints.restore_meta(checkpoints.steps()[-1])
    checkpoints.close()
    assert meta["rows"] == sorted((r for r in rows if r["strategy"] == strategy),
                                  key=lambda r: r["round"])


def test_preempted_run_resumes_exactly(tmp_path, monkeypatch):
  config = tiny_config(strategies=("mmal",), num_rounds=2,
                       **{"train.checkpoint_every": 1})
  reference = str(tmp_path / "reference")
  loop.run_experiment(config, reference)

  preempted = str(tmp_path / "preempted")
  real_save = run_state.RunCheckpoints.save

  def save_then_die(self, meta, **kw):
    real_save(self, meta, **kw)
    if (meta["round"], meta["phase"], meta["train_step"]) == (
        2, "training", 2):  # Mid-way through round 2's 4 steps.
      raise KeyboardInterrupt("preempted")

  monkeypatch.setattr(run_state.RunCheckpoints, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    loop.run_experiment(config, preempted)
  monkeypatch.setattr(run_state.RunCheckpoints, "save", real_save)
  assert len(_rows(preempted)) == 2  # Rounds 0 and 1 finished.
  # Resumed with other checkpoint and logging cadences (config_lib.
  # RESUMABLE_KEYS; before, refused as a different config): the same run.
  loop.run_experiment(tiny_config(strategies=("mmal",), num_rounds=2, **{
      "train.checkpoint_every": 3, "train.log_every": 2}), preempted)

  want, got = _rows(reference), _rows(preempted)
  assert len(got) == len(want) == 3
  drop = set(report.TIMING_KEYS)
  for a, b in zip(sorted(want, key=lambda r: r["round"]),
                  sorted(got, key=lambda r: r["round"])):
    assert {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop}
  assert _state(reference, "mmal").log == _state(preempted, "mmal").log


# Another process' lock: what `point_that_loses_the_lock` hands the lock to.
LOST_HOLDER = b'{"host": "elsewhere", "pid": 1, "heartbeat": 0.0}'


def point_that_loses_the_lock(workdir: str, passed_after: list):
  """A `faults.point` that, at the first saved checkpoint, hands
  WORKDIR/lock to LOST_HOLDER as a process that broke it as stale would
  (compare-and-delete, then create); it appends "taken over" and then every
  point passed after to `passed_after`."""
  point = faults.point
  lock_path = os.path.join(workdir, "lock")

  def taken_over_at_first_checkpoint(name):
    point(name)
    if passed_after:
      passed_after.append(name)
    elif name == "checkpoint_saved":
      assert fs.remove_if_unchanged(lock_path, fs.read_bytes(lock_path))
      assert fs.create_new(lock_path, LOST_HOLDER)
      passed_after.append("taken over")

  return taken_over_at_first_checkpoint


def test_run_that_lost_its_lock_stops_before_writing(tmp_path, monkeypatch):
  """Another process broke this run's lock (this one was frozen for
  minutes) and took the workdir: this run stops at its next checkpoint,
  with one line, and leaves the new holder's lock alone."""
  workdir = str(tmp_path / "w")
  passed_after = []  # The fault points passed after the takeover.
  monkeypatch.setattr(faults, "point",
                      point_that_loses_the_lock(workdir, passed_after))
  with pytest.raises(workdir_lock.WorkdirLost) as error:
    loop.run_experiment(tiny_config(strategies=("random",)), workdir)
  assert "\n" not in str(error.value)
  assert passed_after[0] == "taken over"
  assert "checkpoint_saved" not in passed_after
  assert fs.read_bytes(os.path.join(workdir, "lock")) == LOST_HOLDER


def test_stream_run_queries_only_its_buffers(tmp_path):
  config = tiny_config(regime="stream", stream_buffer=12, num_rounds=3,
                       strategies=("coreset", "uncertainty"))
  workdir = str(tmp_path / "stream")
  loop.run_experiment(config, workdir)
  for strategy in config.strategies:
    run = loop.Run(loop.Experiment.create(config, workdir), strategy, 0)
    state = _state(workdir, strategy)
    assert state.cost == 24
    for answer in state.log:
      buffer = run.buffers[answer.round_index - 1]
      assert answer.index in buffer[answer.modality]


def test_file_oracle_pauses_and_resumes(tmp_path):
  config = tiny_config(strategies=("mmal",), num_rounds=2,
                       **{"oracle.kind": "file"})
  workdir = tmp_path / "file"
  experiment_pool = loop.Experiment.create(config, str(workdir)).data.pool
  for round_index in (1, 2):
    with pytest.raises(AwaitingAnnotations) as paused:
      loop.run_experiment(config, str(workdir))
    assert paused.value.round_index == round_index
    queries = [json.loads(line) for line in
               open(paused.value.queries_path).read().splitlines()]
    assert len(queries) == 8
    answers = [{"modality": q["modality"], "index": q["index"],
                "partners": [list(p) for p in experiment_pool.partners(
                    q["modality"], q["index"])]} for q in queries]
    os.makedirs(workdir / "answers", exist_ok=True)
    pathlib.Path(paused.value.answers_path).write_text(
        "".join(json.dumps(a) + "\n" for a in answers))
  loop.run_experiment(config, str(workdir))
  assert len(_rows(str(workdir))) == 3
  assert _state(str(workdir), "mmal").cost == 16


def test_bad_inputs_are_named(tmp_path):
  with pytest.raises(ValueError, match="unknown strategy 'bald'"):
    tiny_config(strategies=("bald",))
  with pytest.raises(ValueError, match="config.regime='online'"):
    tiny_config(regime="online")
  with pytest.raises(ValueError, match=r"budget x config.num_rounds = 60 "
                     "queries, but the pool holds 48"):
    loop.Experiment.create(tiny_config(
        budget=30, **{"strategy_hparams.mmal.coreset_size": 60}),
                           str(tmp_path / "big"))
  with pytest.raises(ValueError, match="budget=20 is larger than a stream "
                     "buffer"):
    tiny_config(regime="stream", stream_buffer=10, budget=20)
  with pytest.raises(ValueError, match="The stream has 3 buffers of 20 units, "
                     "fewer than config.num_rounds=4"):
    loop.Experiment.create(tiny_config(regime="stream", stream_buffer=20,
                                       budget=2, num_rounds=4),
                           str(tmp_path / "stream"))
  assert not os.path.exists(tmp_path / "stream" / "config.json")
  with pytest.raises(ValueError, match="needs config.data.train_json"):
    loop.Experiment.create(tiny_config(**{"data.source": "coco",
                                          "init.kind": "scratch"}),
                           str(tmp_path / "coco"))
  with pytest.raises(config_lib.ConfigError,
                     match="3 problems: .*image_features: file not found: "
                     "no/such.npy"):
    features = _load_config("features.py")
    _override(features, {"data.image_features": "no/such.npy",
                         "data.text_features": "x.npy", "data.pairs": "p.npy"})
    loop.Experiment.create(config_lib.validate(features),
                           str(tmp_path / "features"))
  assert not os.path.exists(tmp_path / "features")
  with pytest.raises(config_lib.ConfigError, match="main_metric names "
                     "'colorswap/group', which a 'features' run"):
    tiny_config(**{"data.source": "features", "init.kind": "scratch",
                   "report.main_metric": "colorswap/group"})
  with pytest.raises(config_lib.ConfigError, match="init.kind='pretrain' "
                     "needs a data source with a pre-training set"):
    tiny_config(**{"data.source": "features"})
  config = tiny_config()
  with pytest.raises(AttributeError, match="epoch"):
    config.train.epoch = 3  # Locked: a typo cannot add a field.
  experiment_lib.check_workdir(config, str(tmp_path / "same"))
  other = tiny_config(budget=5)
  with pytest.raises(experiment_lib.ConfigMismatchError,
                     match="differs in: budget"):
    experiment_lib.check_workdir(other, str(tmp_path / "same"))
  # How a run is carried out (config_lib.RESUMABLE_KEYS) may change.
  experiment_lib.check_workdir(tiny_config(**{
      "oracle.timeout_s": 60.0, "train.checkpoint_every": 7,
      "train.log_every": 1}), str(tmp_path / "same"), write=False)
  # A config.json from before config_lib.ADDED_KEYS existed resumes as if
  # it held their old-behaviour values; hparams of strategies that do not
  # run are not compared.
  recorded = json.loads(config.to_json_best_effort(sort_keys=True))
  del recorded["data"]["pretrain_fraction"], recorded["data"]["pretrain_split"]
  del recorded["strategy_hparams"]["mmal"]["distances_on"]
  recorded["strategy_hparams"]["coreset"] = {"not": "run"}
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "config.json").write_text(json.dumps(recorded))
  experiment_lib.check_workdir(config, str(tmp_path / "old"), write=False)
  raw = tiny_config(**{"strategy_hparams.mmal.distances_on": "raw"})
  with pytest.raises(experiment_lib.ConfigMismatchError,
                     match=r"differs in: strategy_hparams\.mmal\.distances_on"):
    experiment_lib.check_workdir(raw, str(tmp_path / "old"), write=False)
  assert "pretrain_fraction" not in (tmp_path / "old" / "config.json"
                                     ).read_text()


def _write_features(folder, num_pairs=60, dims=(8, 6), seed=0):
  """Linked random features: text = image @ W + noise, pairs row i <-> i."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(num_pairs, dims[0])).astype(np.float32)
  text = image @ rng.normal(size=dims) + 0.1 * rng.normal(
      size=(num_pairs, dims[1]))
  np.save(folder / "img.npy", image)
  np.save(folder / "txt.npy", text.astype(np.float32))
  np.save(folder / "pairs.npy", np.stack([np.arange(num_pairs)] * 2, 1))
  return {"data.image_features": str(folder / "img.npy"),
          "data.text_features": str(folder / "txt.npy"),
          "data.pairs": str(folder / "pairs.npy")}


def test_features_config_runs_on_npy_files(tmp_path, monkeypatch):
  config = _load_config("features.py")
  files = _write_features(tmp_path)
  overrides = {**files, "feature_dims": (8, 6), "strategies": ("random",
               "mmal"), "seeds": (0,), "budget": 8, "num_rounds": 2,
               "strategy_hparams.mmal.coreset_size": 16,
               "strategy_hparams.mmal.distances_on": "raw", "train.epochs": 2,
               "train.batch_size": 8, "eval.embed_batch_size": 16,
               # Warm start from a quarter of the pool's pairs.
               "init.kind": "pretrain", "data.pretrain_fraction": 0.25,
               "pretrain.epochs": 1, "pretrain.batch_size": 8}
  _override(config, overrides)
  workdir = str(tmp_path / "run")
  norms = []
  real_mmal = loop.STRATEGIES["mmal"]

  @functools.wraps(real_mmal)
  def mmal(embeddings, annotated, **kw):
    assert kw["distances_on"] == "raw"
    norms.extend(np.linalg.norm(np.asarray(z)[:len(annotated[m])], axis=1)
                 for m, z in embeddings.items())
    return real_mmal(embeddings, annotated, **kw)

  monkeypatch.setitem(loop.STRATEGIES, "mmal", mmal)
  loop.run_experiment(config_lib.validate(config), workdir)
  # distances_on="raw": mmal saw the towers' outputs before normalisation.
  assert len(norms) == 2 * 2 and not np.allclose(np.concatenate(norms), 1.0,
                                                 atol=1e-3)
  rows = _rows(workdir)
  assert sorted((r["strategy"], r["round"]) for r in rows) == [
      (s, t) for s in ("mmal", "random") for t in range(3)]
  assert all("retrieval/t2i_r@1" in r for r in rows)
  assert "retrieval/t2i_r@1" in (tmp_path / "run" / "results.md").read_text()
  assert (tmp_path / "run" / "pretrained" / "params.npz").exists()
  # Each run's final towers, reused as the next experiment's init.checkpoint:
  # they give the run's last metrics.
  final = tmp_path / "run" / "runs" / "mmal" / "seed_0" / "final_params.npz"
  reuse = _load_config("features.py")
  _override(reuse, {**overrides, "init.kind": "checkpoint",
                    "init.checkpoint": str(final),
                    "data.pretrain_fraction": 0.0})
  experiment = loop.Experiment.create(config_lib.validate(reuse),
                                      str(tmp_path / "reuse"))
  last = max((r for r in rows if r["strategy"] == "mmal"),
             key=lambda r: r["round"])
  metrics = experiment.evaluate(experiment.initial_params(0), 2)
  np.testing.assert_equal(metrics, {k: last[k] for k in metrics})
  wrong = _load_config("features.py")
  _override(wrong, {**overrides, "feature_dims": (8, 7)})
  with pytest.raises(config_lib.ConfigError, match="feature_dims gives text "
                     "features of width 7, but the data's are of width 6"):
    loop.Experiment.create(config_lib.validate(wrong), str(tmp_path / "w"))
