"""The cold-start experiment: data, Stage 1, classifier, driver, plot."""
import io
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

from mmal_jax import config_lib
from mmal_jax import fs
from mmal_jax import mmcsal
from mmal_jax import mmssl
from mmal_jax import plots
from mmal_jax import report
from mmal_jax import sharding
from mmal_jax.data import digits
from mmal_jax.data import paired
from mmal_jax.data import shapes

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def load_config(name, *args):
  return config_lib.from_file(str(CONFIGS / f"{name}.py"), *args)


def tiny_config(**data):
  """mmcsal_digits at test size: 2 budgets, 1 seed, short Stage 1."""
  config = load_config("mmcsal_digits")
  config.seeds = (0,)
  config.budgets = (2., 5.)
  config.strategies = ("random", "kmeans", "mmcsal_proto", "mmcsal")
  for name in ("mmcsal_proto", "mmcsal"):
    config.strategy_hparams[name].iterations = 20
  config.model.update(image=dict(kind="mlp", hidden_dims=(32,)),
                      text=dict(kind="mlp", hidden_dims=(32,)), out_dim=16)
  config.stage1.update(epochs=4, warmup_epochs=2, num_prototypes=10,
                       kmeans_iters=10, batch_size=128)
  config.downstream.steps = 50
  config.acquisition.block = 64
  config.data.update(**data)
  return config


# ------------------------------------------------------------------ data


def test_digit_halves_are_the_image():
  pool, labels = digits.load_digits_pairs()
  assert pool.modalities == digits.MODALITIES and pool.sizes == {
      "left": 1797, "right": 1797}
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  images = datasets.load_digits().images / 16.
  left = pool.items["left"].reshape(-1, 8, 4)
  right = pool.items["right"].reshape(-1, 8, 4)
  np.testing.assert_allclose(np.concatenate([left, right], axis=2), images,
                             atol=1e-6)
  assert set(labels.tolist()) == set(range(10))
  np.testing.assert_array_equal(pool.pairs("left", "right")[:, 0],
                                np.arange(1797))


def test_shapes_labels_come_from_the_first_object():
  pool = shapes.make_colorswap(30, seed=1)
  captions = pool.items["text"]
  by_shape = shapes.class_labels(captions)
  by_colour = shapes.class_labels(captions, by="colour")
  for caption, s, c in zip(captions, by_shape, by_colour):
    words = caption.split()
    assert shapes.SHAPES[s] == words[2]
    assert list(shapes.COLOURS)[c] == words[1]
  with pytest.raises(ValueError, match="Not a shapes caption"):
    shapes.class_labels(["a cat"])
  with pytest.raises(ValueError, match="by must be one of"):
    shapes.class_labels(captions, by="size")


def test_drop_items_removes_half_the_images_and_their_links():
  pool = shapes.make_colorswap(40, seed=0)
  dropped = shapes.drop_items(pool, "image", 0.5, seed=3)
  assert dropped.sizes == {"image": 40, "text": 80}
  assert len(dropped.pairs()) == 40
  text = dropped.pairs()[:, 1]
  assert (np.asarray(pool.items["text"])[text] ==
          np.asarray(dropped.items["text"])[text]).all()


def test_split_pairs_keeps_pairs_aligned_and_disjoint():
  pool, labels = digits.load_digits_pairs()
  train, y, test, y_test = paired.split_pairs(pool, labels, 0.25, seed=0)
  assert train.sizes["left"] == len(y) == 1348 and len(y_test) == 449
  full = np.concatenate([pool.items["left"], pool.items["right"]], axis=1)
  rows = {r.tobytes(): i for i, r in enumerate(full)}
  for part, part_labels in ((train, y), (test, y_test)):
    x = np.concatenate([part.items["left"], part.items["right"]], axis=1)
    index = [rows[r.tobytes()] for r in x]
    np.testing.assert_array_equal(labels[index], part_labels)


def _write_npy(path, array):
  buffer = io.BytesIO()
  np.save(buffer, array)
  fs.write_bytes(path, buffer.getvalue())


def _feature_files(root):
  rng = np.random.default_rng(0)
  paths = {}
  for split, n in (("train", 40), ("test", 12)):
    labels = rng.integers(0, 3, n)
    for m, dim in (("audio", 5), ("video", 7)):
      paths[f"{m}_{split}"] = os.path.join(root, f"{m}_{split}.npy")
      _write_npy(paths[f"{m}_{split}"], (labels[:, None] + rng.standard_normal(
          (n, dim))).astype(np.float32))
    paths[f"labels_{split}"] = os.path.join(root, f"labels_{split}.npy")
    _write_npy(paths[f"labels_{split}"], labels)
  return paths


def _features_config(paths, test=True):
  config = load_config("mmcsal_kineticssound")
  config.data.update(
      train_features=(paths["audio_train"], paths["video_train"]),
      train_labels=paths["labels_train"])
  if test:
    config.data.update(
        test_features=(paths["audio_test"], paths["video_test"]),
        test_labels=paths["labels_test"])
  return config


def test_feature_files_local_and_on_gcs(tmp_path, gcs_bucket):
  for root in (str(tmp_path), f"{gcs_bucket}/features"):
    paths = _feature_files(root)
    data = paired.build(_features_config(paths).data)
    assert data.modalities == ("audio", "video")
    assert data.size == 40 and len(data.test_labels) == 12
    assert data.pool.items["video"].shape == (40, 7)
  held_out = paired.build(_features_config(paths, test=False).data)
  assert held_out.size + len(held_out.test_labels) == 40


def test_feature_file_errors_name_the_file(tmp_path):
  paths = _feature_files(str(tmp_path))
  config = _features_config(paths)
  config.data.train_labels = str(tmp_path / "missing.npy")
  with pytest.raises(config_lib.ConfigError, match="labels file not found"):
    paired.build(config.data)
  _write_npy(paths["labels_train"], np.zeros(39, np.int64))
  with pytest.raises(config_lib.ConfigError, match="int labels"):
    paired.build(_features_config(paths).data)
  config = load_config("mmcsal_vggsound")
  with pytest.raises(config_lib.ConfigError, match="train_features"):
    paired.build(config.data)


# ---------------------------------------------------------------- configs


def test_shipped_configs_validate_and_follow_the_protocols():
  digits_config = mmcsal.validate(load_config("mmcsal_digits"))
  assert digits_config.budgets == (1., 2., 5., 10.)
  assert set(digits_config.strategies) == {
      "random", "kcenter", "kmeans", "activeft", "mmcsal_proto",
      "mmcsal_align", "mmcsal"}
  for name in ("mmcsal_shapes", "mmcsal_food101", "mmcsal_kineticssound",
               "mmcsal_vggsound"):
    config = mmcsal.validate(load_config(name))
    assert config.stage1.optim.b2 == 0.95 and config.stage1.tau == 0.07
  food = load_config("mmcsal_food101")
  assert (food.stage1.epochs, food.stage1.warmup_epochs,
          food.stage1.num_prototypes, len(food.seeds)) == (25, 5, 1000, 10)
  vgg = load_config("mmcsal_vggsound")
  assert (vgg.stage1.epochs, vgg.stage1.num_prototypes, len(vgg.seeds)) == (
      45, 5000, 5)
  assert mmcsal.selector_of(food, "mmcsal_proto") == (
      "activeft", True, dict(iterations=300, lr=1e-3, tau=0.07,
                             batch_rows=100_000))
  assert mmcsal.selector_of(food, "mmcsal_align")[:2] == ("mmcsal", False)
  assert mmcsal.selector_of(food, "mmcsal")[:2] == ("mmcsal", True)
  assert mmcsal.selector_of(food, "kcenter") == ("kcenter", False, {})


def test_demo_variants_of_the_first_paper():
  ablation = config_lib.validate(load_config("demo_modality_ablation", "text"))
  assert ablation.strategies == ("mmal",)
  assert ablation.strategy_hparams.mmal.modality == "text"
  with pytest.raises(ValueError, match="modality must be"):
    load_config("demo_modality_ablation", "audio")
  missing = config_lib.validate(load_config("demo_missing_data"))
  assert missing.data.missing_image_fraction == 0.5
  assert {missing.strategy_hparams[s].modality
          for s in missing.strategies} == {"image"}


def test_validate_names_the_problem():
  cases = [
      (lambda c: c.update(strategies=("bald",)), "selector 'bald'"),
      (lambda c: c.update(budgets=(0., 5.)), "percentages in"),
      (lambda c: c.stage1.update(warmup_epochs=40), "warmup_epochs"),
      (lambda c: c.downstream.update(features="pixels"), "downstream"),
      (lambda c: c.data.update(source="shapes"), "use 'stage1'"),
      (lambda c: c.update(kind="pool"), "config.kind"),
  ]
  for change, message in cases:
    config = load_config("mmcsal_digits")
    change(config)
    with pytest.raises(config_lib.ConfigError, match=message):
      mmcsal.validate(config)
  config = load_config("mmcsal_digits")
  config.strategies = ("random,kmeans",)
  assert mmcsal.validate(config).strategies == ("random", "kmeans")


# ------------------------------------------------- Stage 1 and classifier


def test_stage1_trains_both_variants_data_parallel():
  config = tiny_config()
  config.stage1.batch_size = 100  # 8 devices: padded to 104, masked.
  config = mmcsal.validate(config)
  data = paired.build(config.data)
  stage1 = mmssl.Stage1(config, data, sharding.make_mesh())
  # The configured batch on any device count (#17 item 8).
  assert stage1.batch_size == 100 and stage1.per_epoch == data.size // 100
  for prototypes in (False, True):
    result = stage1.fit(prototypes, seed=0)
    assert len(result.losses) == config.stage1.epochs
    # Every step's loss; the epoch losses are each epoch's last step's.
    assert len(result.step_losses) == config.stage1.epochs * stage1.per_epoch
    np.testing.assert_array_equal(
        result.losses, result.step_losses[stage1.per_epoch - 1::
                                          stage1.per_epoch])
    assert np.isfinite(result.losses).all()
    for split, n in (("pool", data.size), ("test", len(data.test_labels))):
      for z in getattr(result, split).values():
        assert z.shape == (n, 16)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1., atol=1e-5)
  cross = stage1.fit(False, seed=0)
  assert cross.losses[-1] < cross.losses[0]
  restored = mmssl.Stage1Result.from_bytes(cross.to_bytes(), data.modalities)
  np.testing.assert_array_equal(restored.pool["left"], cross.pool["left"])
  np.testing.assert_array_equal(restored.step_losses, cross.step_losses)
  init = stage1._init  # pylint: disable=protected-access
  params = init(jax.random.PRNGKey(0))
  protos, assignments, phis = stage1.prototypes(params, seed=0)
  assert protos[0].shape == (10, 16) and assignments[1].shape == (data.size,)
  assert (np.asarray(phis[0]) > 0).all()


def test_classifier_learns_separable_classes():
  rng = np.random.default_rng(0)
  centers = 5 * rng.standard_normal((4, 6))
  y, y_test = rng.integers(0, 4, 40), rng.integers(0, 4, 200)
  x = (centers[y] + rng.standard_normal((40, 6))).astype(np.float32)
  x_test = (centers[y_test] + rng.standard_normal((200, 6))).astype(
      np.float32)
  config = load_config("mmcsal_digits").downstream
  classifier = mmcsal.Classifier(config, 4, max_rows=64)
  assert classifier.accuracy(x, y, x_test, y_test, seed=0) > 95.
  assert classifier.accuracy(x[:4], y[:4], x_test, y_test, seed=0) < 95.
  with pytest.raises(ValueError, match="classifier takes 1 to 64"):
    classifier.accuracy(np.zeros((65, 6), np.float32), np.zeros(65, int),
                        x_test, y_test, seed=0)


def test_overlap_table_is_jaccard_with_random_beside_accuracy(tmp_path):
  picks = {("random", 0): {1, 2, 3, 4}, ("random", 1): {5, 6, 7, 8},
           ("mmcsal", 0): {1, 2, 3, 9}, ("mmcsal", 1): {10, 11, 12, 13}}
  rows = [{"strategy": s, "seed": seed, "round": 1, "accuracy": acc}
          for (s, seed), acc in zip(picks, (50., 60., 70., 90.))]
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
  experiment = types.SimpleNamespace(
      config=ml_collections.ConfigDict(dict(
          strategies=("random", "mmcsal", "kmeans"), seeds=(0, 1),
          budgets=(1.,))),
      metrics_path=str(metrics),
      picks=lambda strategy, seed, round_index: picks.get((strategy, seed)))
  text = mmcsal.ColdStartExperiment.overlap_markdown(experiment)
  jaccard = [3 / 5, 0.]  # {1,2,3} of {1,2,3,4,9}; nothing shared.
  assert (f"| mmcsal | 80.0 ± 10.0 (J {np.mean(jaccard):.2f} ± "
          f"{np.std(jaccard):.2f}) |") in text
  assert "| random | 55.0 ± 5.0 (J 1.00 ± 0.00) |" in text
  assert "kmeans" not in text  # No picks in the workdir.


# ------------------------------------------------------------ end to end


@pytest.mark.slow
def test_run_writes_the_workdir_and_resumes(tmp_path, caplog, monkeypatch):
  caplog.set_level(logging.INFO)
  workdir = str(tmp_path / "run")
  config = mmcsal.validate(tiny_config())
  config.unlock()
  config.report.update(embedding_plot=True, embedding_plot_points=100)
  config.lock()
  drawn = []
  real_figure = mmcsal.plots.stage1_loss_figure
  monkeypatch.setattr(mmcsal.plots, "stage1_loss_figure",
                      lambda losses: drawn.append(losses) or real_figure(losses))
  text = mmcsal.run_cold_start(config, workdir)
  # The Stage-1 loss curves drawn are the losses saved with each variant.
  assert sorted(drawn[0]) == ["cross seed 0", "proto seed 0"]
  for variant in ("cross", "proto"):
    with np.load(os.path.join(workdir, "stage1", f"{variant}_seed_0.npz")) as f:
      np.testing.assert_array_equal(drawn[0][f"{variant} seed 0"],
                                    f["step_losses"])
      assert len(f["step_losses"]) > config.stage1.epochs
      # And in TensorBoard, step by step.
      events, = (tmp_path / "run" / "tensorboard" /
                 f"stage1_{variant}_seed_0").glob("events.out.*")
      logged = {e.step: v.simple_value for e in event_file_loader.
                LegacyEventFileLoader(str(events)).Load()
                for v in e.summary.value if v.tag == "stage1/loss"}
      np.testing.assert_allclose(
          [logged[k] for k in sorted(logged)], f["step_losses"], rtol=1e-6)
      assert sorted(logged) == list(range(1, len(f["step_losses"]) + 1))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert len(rows) == 4 * 2
  by_key = {(r["strategy"], r["round"]): r for r in rows}
  n = 1438
  for (strategy, round_index), row in by_key.items():
    budget = round(config.budgets[round_index - 1] / 100 * n)
    assert row["queries"] == budget and row["seed"] == 0
    assert abs(row["percent"] - 100 * budget / n) < 1e-9
    assert 0 <= row["accuracy"] <= 100 and row["classes_covered"] <= 10
    picks = json.loads(open(os.path.join(
        workdir, "runs", strategy, "seed_0",
        f"round_{round_index}.json")).read())["picks"]
    assert len(set(picks)) == budget
  for name in ("results.md", "al_curves.png", "embedding.png",
               "stage1/cross_seed_0.npz", "stage1/proto_seed_0.npz",
               "config.json", "stage1_loss.png", "seconds_per_round.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert "## accuracy" in text and "Modality gap" in text and "| w/ |" in text
  assert "## Accuracy and overlap with random's picks" in text
  assert "Progress: 8/8 selections, ETA 0:00:00" in caplog.text
  # A line per selection, per Stage-1 embedding pass, and training lines
  # with the throughput (#19 item 2).
  assert re.search(r"\[kmeans seed 0\] selected 29 of 1438 pairs in "
                   r"\d+\.\ds", caplog.text), caplog.text
  assert re.search(r"Stage 1 \(proto\): embedded 1438 pool \+ 359 test "
                   r"pairs in \d+\.\ds", caplog.text), caplog.text
  assert re.search(r"Stage 1 \(proto\) epoch 4/4 step \d+/\d+ loss "
                   r"\d+\.\d+ \(\S+, [\d.]+ examples/s \([\d.]+/device\), "
                   r"[\d.]+ steps/s, ETA", caplog.text), caplog.text
  for strategy in config.strategies:
    events, = (tmp_path / "run" / "tensorboard" / f"{strategy}_seed_0").glob(
        "events.out.*")
    accuracy = {e.step: v.simple_value for e in event_file_loader.
                LegacyEventFileLoader(str(events)).Load()
                for v in e.summary.value if v.tag == "accuracy"}
    assert len(accuracy) == len(config.budgets)
    assert accuracy == pytest.approx({
        r["queries"]: r["accuracy"] for r in rows
        if r["strategy"] == strategy}, rel=1e-6)
  assert open(os.path.join(workdir, "results.md")).read() == text
  # Rerunning the same config adds nothing; another config is refused.
  assert mmcsal.run_cold_start(config, workdir) == (
      f"Nothing left to do: all 4 runs of {workdir} are finished.\n\n" + text)
  assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == 8
  # #17 item 13: a torn last metrics line is redone without being appended
  # onto (every later rerun still reads the file), a torn Stage-1 file is
  # trained again.
  metrics = os.path.join(workdir, "metrics.jsonl")
  full = open(metrics).read()
  open(metrics, "w").write(full[:-40])
  npz = os.path.join(workdir, "stage1", "proto_seed_0.npz")
  data = open(npz, "rb").read()
  open(npz, "wb").write(data[:len(data) // 2])
  mmcsal.run_cold_start(config, workdir)
  mmcsal.run_cold_start(config, workdir)
  assert open(metrics).read().endswith("\n")
  drop = lambda rows: sorted(
      ({k: v for k, v in r.items() if k not in report.TIMING_KEYS}
       for r in rows), key=lambda r: (r["strategy"], r["round"]))
  assert drop(report.read_rows(metrics)) == drop(rows)
  assert open(npz, "rb").read()[:100] == data[:100]  # Rewritten whole.
  assert len(open(npz, "rb").read()) == len(data)
  other = mmcsal.validate(tiny_config(seed=1))
  with pytest.raises(config_lib.ConfigError, match="different config"):
    mmcsal.run_cold_start(other, workdir)


@pytest.mark.skipif(jax.device_count() > 1, reason="1-device pass only: the "
                    "command line refuses before any device work (CI time)")
def test_cli_dispatches_cold_start_configs(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  run = subprocess.run(
      [sys.executable, "-m", "mmal_jax.main", "--config",
       str(CONFIGS / "mmcsal_digits.py"), "--workdir", str(tmp_path / "w"),
       "--config.strategies=random,bald"], env=env, capture_output=True,
      text=True, cwd=CONFIGS.parent)
  assert run.returncode == 2
  assert "selector 'bald'" in run.stderr.splitlines()[-1]
  assert not (tmp_path / "w").exists()


def test_embedding_plot_writes_a_png(tmp_path):
  z = np.random.default_rng(0).standard_normal((60, 5))
  path = str(tmp_path / "sub" / "embedding.png")
  plots.embedding_plot(z, {"mmal": [1, 2, 3], "uncertainty": [4, 50]}, path,
                       labels=np.arange(60) % 3, title="t")
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match=r"picked\['mmal'\] has indices"):
    plots.embedding_plot(z, {"mmal": [60]}, path)
