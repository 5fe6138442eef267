"""Warm start from one's own pairs (#18 item 1): pre-training pairs held out
of the pool and the eval set, pre-trained on before round 1, resumed exactly
after a kill during pre-training."""
import os

import jax
import numpy as np
import pytest

from mmal_jax import config_lib
from mmal_jax import loop
from mmal_jax import run_state
from mmal_jax.data import sources
from mmal_jax.data.pool import UnalignedPool
from test_loop import _load_config
from test_loop import _override
from test_loop import _write_features


def _data(tmp_path, source="features", **fields):
  """A `config.data` over `test_loop`'s 60 linked feature pairs."""
  data = sources.default_config()
  data.source = source
  data.update({k.split(".", 1)[1]: v
               for k, v in _write_features(tmp_path).items()})
  data.update(fields)
  return data


def _rows(pool, m):
  """Each item's feature row as bytes: items are unique random vectors."""
  return {row.tobytes() for row in np.asarray(pool.items[m])}


def test_pretrain_items_never_enter_the_pool_or_eval_set(tmp_path):
  built = sources.build(_data(tmp_path, pretrain_fraction=0.25))
  for m in ("image", "text"):
    pre = _rows(built.pretrain_pool, m)
    assert not pre & _rows(built.pool, m) and not pre & _rows(
        built.eval_pool, m)
    assert (len(pre) + len(_rows(built.pool, m)) + len(_rows(
        built.eval_pool, m))) == 60
  # A quarter of the 48 pairs left after the 12 eval pairs, with partners.
  assert len(built.pretrain_pool.pairs()) == 12
  assert len(built.pool.pairs()) == 36 and len(built.eval_pool.pairs()) == 12
  again = sources.build(_data(tmp_path, pretrain_fraction=0.25))
  assert _rows(again.pretrain_pool, "image") == _rows(built.pretrain_pool,
                                                      "image")  # Seeded.
  # Named rows of the pairs file: exactly those pairs (not eval ones).
  no_pretrain = sources.build(_data(tmp_path))
  eval_images = _rows(no_pretrain.eval_pool, "image")
  image = np.load(tmp_path / "img.npy")
  rows = [i for i in range(60) if image[i].tobytes() not in eval_images][:5]
  np.save(tmp_path / "pre.npy", np.asarray(rows))
  named = sources.build(_data(tmp_path, pretrain_pairs=str(
      tmp_path / "pre.npy")))
  assert _rows(named.pretrain_pool, "image") == {image[i].tobytes()
                                                 for i in rows}
  assert _rows(named.eval_pool, "image") == eval_images
  bad = [i for i in range(60) if image[i].tobytes() in eval_images][:2]
  np.save(tmp_path / "bad.npy", np.asarray(bad))
  with pytest.raises(config_lib.ConfigError, match=r"names 2 pair row\(s\) "
                     r"whose items are in the held-out eval pairs"):
    sources.build(_data(tmp_path, pretrain_pairs=str(tmp_path / "bad.npy")))


def test_whole_units_are_held_out_of_any_pool(monkeypatch):
  # Image 0 has captions 0 and 1; image i > 0 has caption i + 1.
  pairs = np.array([[0, 0], [0, 1]] + [[i, i + 1] for i in range(1, 10)])
  pool = UnalignedPool(items={"image": np.arange(10.)[:, None],
                              "text": np.arange(11.)[:, None]},
                       links={("image", "text"): pairs})
  eval_pool = pool.subset({"image": [1], "text": [2]})
  data = sources.default_config()
  data.update(source="coco", pretrain_pairs="x")
  read = []

  def rows(path, num_pairs, what, rows_of):
    read.append((path, num_pairs, what, rows_of))
    flags = np.zeros(num_pairs, bool)
    flags[[1, 5]] = True  # Pair (0, 1): all of image 0's unit; pair (4, 5).
    return flags

  monkeypatch.setattr(sources.features, "load_eval_pairs", rows)
  built = sources._hold_out_pretrain(  # pylint: disable=protected-access
      sources.Sources(pool, eval_pool), data)
  assert read == [("x", 11, "pretrain pairs",
                   "the pool's list of true pairs")]
  assert sorted(built.pretrain_pool.items["image"][:, 0]) == [0, 4]
  assert sorted(built.pretrain_pool.items["text"][:, 0]) == [0, 1, 5]
  assert len(built.pretrain_pool.pairs()) == 3
  assert len(built.pool.pairs()) == 8 and built.eval_pool is eval_pool


def test_pretrain_options_are_checked_up_front(tmp_path):
  data = _data(tmp_path, pretrain_fraction=0.2,
               pretrain_pairs=str(tmp_path / "none.npy"))
  found = " ".join(sources.check(data))
  assert "give one of them" in found
  assert "config.data.pretrain_pairs: file not found" in found
  assert "generates its own pre-training set" in " ".join(sources.check(
      _data(tmp_path, source="shapes", pretrain_fraction=0.1)))
  assert "a stream with no pool" in " ".join(sources.check(
      _data(tmp_path, source="datacomp", pretrain_fraction=0.1)))
  assert "must be in [0, 1)" in " ".join(sources.check(_data(
      tmp_path, pretrain_fraction=1.5)))
  config = _load_config("features.py")
  _override(config, {"data.pretrain_fraction": 0.2})
  with pytest.raises(config_lib.ConfigError, match="init.kind='scratch' does "
                     "not do: set --config.init.kind=pretrain"):
    config_lib.validate(config)
  assert config_lib.validate(config_lib.from_file(os.path.join(
      os.path.dirname(__file__), "..", "configs", "features.py"),
                                                  "pretrain")).init.kind == (
                                                      "pretrain")


def test_a_pretraining_set_smaller_than_a_batch_is_named(tmp_path):
  np.savetxt(tmp_path / "one.txt", [59], fmt="%d")
  config = _tiny_features_config(tmp_path, **{
      "data.pretrain_fraction": 0.0,
      "data.pretrain_pairs": str(tmp_path / "one.txt")})
  workdir = str(tmp_path / "one")
  if jax.device_count() == 1:  # One pair fills a batch of one device.
    experiment = loop.Experiment.create(config, workdir)
    assert len(experiment.data.pretrain_pool.pairs()) == 1
    return
  with pytest.raises(config_lib.ConfigError, match=(
      f"The pre-training set holds 1 pairs, fewer than one batch over the "
      f"{jax.device_count()} devices")):
    loop.Experiment.create(config, workdir)
  assert not os.path.exists(workdir)


def _tiny_features_config(tmp_path, **overrides):
  config = _load_config("features.py")
  _override(config, {**_write_features(tmp_path), "feature_dims": (8, 6),
                     "strategies": ("random",), "seeds": (0,), "budget": 8,
                     "num_rounds": 1, "init.kind": "pretrain",
                     "data.pretrain_fraction": 0.5, "pretrain.epochs": 2,
                     "pretrain.batch_size": 8, "train.epochs": 1,
                     "train.batch_size": 8, "train.checkpoint_every": 1,
                     "eval.embed_batch_size": 16, **overrides})
  return config_lib.validate(config)


def test_killed_pretraining_resumes_exactly(tmp_path, monkeypatch):
  config = _tiny_features_config(tmp_path)
  reference = loop.Experiment.create(config, str(tmp_path / "reference"))
  want = jax.tree.map(np.asarray, reference.initial_params(0))

  real_save = run_state.RunCheckpoints.save
  steps = []

  def save_then_die(self, meta, **kw):
    real_save(self, meta, **kw)
    steps.append(meta["train_step"])
    if meta["train_step"] == 2:  # Mid-way through 2 epochs of 3 steps.
      raise KeyboardInterrupt("preempted")

  workdir = str(tmp_path / "killed")
  monkeypatch.setattr(run_state.RunCheckpoints, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    loop.Experiment.create(config, workdir).initial_params(0)
  monkeypatch.setattr(run_state.RunCheckpoints, "save", real_save)
  assert steps == [1, 2]
  assert not os.path.exists(os.path.join(workdir, "pretrained", "params.npz"))
  resumed = loop.Experiment.create(config, workdir)
  trained = []
  real_fit = resumed.towers.fit
  monkeypatch.setattr(resumed.towers, "fit", lambda *a, **k: trained.append(
      k["resume"][0]) or real_fit(*a, **k))
  got = jax.tree.map(np.asarray, resumed.initial_params(0))
  assert trained == [2]  # From the saved step, not from the start.
  jax.tree.map(np.testing.assert_array_equal, got, want)
