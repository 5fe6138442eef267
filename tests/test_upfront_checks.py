"""Up-front checks that used to pass and fail later (#17 items 3, 4): each
is refused by `Experiment.create` before config.json is written, and the
corrected config then starts in the same workdir."""
import os
import pathlib

import numpy as np
import pytest

from mmal_jax import config_lib
from mmal_jax import loop
from mmal_jax.models import presets

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def features_config(tmp_path, num_pairs, **overrides):
  """configs/features.py on `num_pairs` random (8-d, 6-d) feature rows."""
  rng = np.random.default_rng(0)
  np.save(tmp_path / "img.npy", rng.normal(size=(num_pairs, 8)))
  np.save(tmp_path / "txt.npy", rng.normal(size=(num_pairs, 6)))
  np.save(tmp_path / "pairs.npy", np.stack([np.arange(num_pairs)] * 2, 1))
  config = config_lib.from_file(str(CONFIGS / "features.py"))
  config.data.update(image_features=str(tmp_path / "img.npy"),
                     text_features=str(tmp_path / "txt.npy"),
                     pairs=str(tmp_path / "pairs.npy"))
  config.feature_dims = (8, 6)
  config.update(dict(strategies=("random",), seeds=(0,), budget=1,
                     num_rounds=1))
  config.train.batch_size = 1
  config.eval.embed_batch_size = 4
  for key, value in overrides.items():
    target, *path = key.split(".")
    node = config
    for part in [target] + path[:-1]:
      node = node[part]
    node[path[-1] if path else target] = value
  return config


def refused_without_trace(config, workdir, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    loop.Experiment.create(config_lib.normalize(config), workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_an_eval_split_too_small_for_the_metrics_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  # 5 pairs, 20% held out: one pair, and the modality gap needs two.
  refused_without_trace(
      features_config(tmp_path, 5, **{"data.eval_fraction": 0.2}), workdir,
      r"held-out pool holds 1 image item\(s\); the per-round metrics "
      r"\(modality gap\) need at least 2")
  loop.Experiment.create(config_lib.normalize(features_config(
      tmp_path, 5, **{"data.eval_fraction": 0.4})), workdir)
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_image_towers_on_feature_rows_are_refused(tmp_path):
  workdir = str(tmp_path / "run")
  config = features_config(tmp_path, 10)
  config_lib.use_preset(config, presets.tiny("siglip"))
  refused_without_trace(
      config, workdir, r"config.data.source='features' gives image feature "
      r"rows, but config.model.image_model='vit' takes images")
  loop.Experiment.create(config_lib.normalize(features_config(tmp_path, 10)),
                         workdir)
  assert os.path.exists(os.path.join(workdir, "config.json"))
  # And feature towers on a source of images and captions.
  shapes = features_config(tmp_path, 10, **{"data.source": "shapes"})
  assert any("config.model.image_model='feature_tower' takes feature rows, "
             "but config.data.source='shapes' gives images" in p
             for p in config_lib.problems(shapes))


def test_the_cold_start_names_every_problem_before_writing(tmp_path):
  """#19: the cold start checks up front as the unaligned loop does (one
  `experiment.workdir_problems`): a bad value, a missing feature file and a
  workdir under a file are named together in one error, nothing is written,
  and the corrected config then starts."""
  from mmal_jax import mmcsal  # pylint: disable=g-import-not-at-top
  import test_mmcsal  # pylint: disable=g-import-not-at-top
  paths = test_mmcsal._feature_files(str(tmp_path))  # pylint: disable=protected-access
  (tmp_path / "a_file").write_text("")
  config = test_mmcsal._features_config(paths)  # pylint: disable=protected-access
  config.budgets = (0., 5.)
  config.data.train_labels = str(tmp_path / "missing.npy")
  with pytest.raises(config_lib.ConfigError) as error:
    mmcsal.ColdStartExperiment.create(mmcsal.normalize(config),
                                      str(tmp_path / "a_file" / "run"))
  message = str(error.value)
  assert message.startswith("3 problems: "), message
  for part in ("config.budgets must be percentages in (0, 100]",
               f"labels file not found: {tmp_path / 'missing.npy'}",
               "--workdir "):
    assert part in message, message
  workdir = tmp_path / "run"
  config = mmcsal.normalize(test_mmcsal._features_config(paths))  # pylint: disable=protected-access
  config.unlock()
  config.stage1.num_prototypes = 41  # More than the 40 pairs.
  with pytest.raises(config_lib.ConfigError, match="more than the 40 pairs"):
    mmcsal.ColdStartExperiment.create(config, str(workdir))
  assert not workdir.exists()
  config.stage1.num_prototypes = 10
  mmcsal.ColdStartExperiment.create(config, str(workdir))
  assert (workdir / "config.json").exists()
  from mmal_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir_lock.release(str(workdir))
