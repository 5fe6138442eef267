"""Every configs/*.py builds, validates and gives a model, optimizer and data plan."""
import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmal_jax import config_lib
from mmal_jax import errors
from mmal_jax import optim
from mmal_jax.data import sources
from mmal_jax.models import two_towers

# Cold-start configs (mmcsal_*.py) have their own checks: tests/test_mmcsal.py.
CONFIGS = sorted(p for p in (pathlib.Path(__file__).parents[1] / "configs")
                 .glob("*.py") if not p.stem.startswith("mmcsal_"))


def load(path):
  return config_lib.from_file(str(path))


def test_there_are_configs():
  names = {p.stem for p in CONFIGS}
  assert {"demo", "colorswap_clip_b32", "colorswap_siglip_b16",
          "colorswap_lit_l14", "coco_stream", "datacomp_stream"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_validates(path):
  config = load(path)
  if config.init.kind == "checkpoint" and not config.init.checkpoint:
    # Configs whose weights are not released name none: the user passes one
    # (their docstring says so), and validation asks for exactly that.
    assert config_lib.problems(config) == [
        "config.init.kind='checkpoint' needs --config.init.checkpoint=PATH "
        "(a big_vision .npz)."]
    config.init.checkpoint = "/path/to/weights.npz"
  config = config_lib.validate(config)
  model = two_towers.Model(**config.model)
  if "feature_dims" in config:
    image, text = (jnp.zeros((1, d)) for d in config.feature_dims)
  else:
    image = jnp.zeros((1, config.res, config.res, 3))
    text = jnp.zeros((1, config.text_len), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, text)
  params = params["params"]
  assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) > 0
  optim.make_optimizer(config.optim, params)
  frozen = jax.tree.leaves(optim.frozen_mask(config.optim, params))
  assert any(frozen) == bool(config.optim.locked_tower)
  assert config.budget * config.num_rounds > 0


def test_paper_protocols():
  demo = config_lib.validate(load(CONFIGS[0].parent / "demo.py"))
  assert demo.data.num_groups * 2 == 1400 and demo.budget == 70
  assert demo.budget * demo.num_rounds == 0.3 * 1400
  assert set(demo.strategies) == {"random", "coreset", "uncertainty", "mmal"}
  assert len(demo.seeds) == 3
  coco = load(CONFIGS[0].parent / "coco_stream.py")
  assert (coco.regime, coco.stream_buffer, coco.budget) == ("stream", 1024, 256)
  assert (coco.train.epochs, coco.train.batch_size) == (10, 256)
  datacomp = load(CONFIGS[0].parent / "datacomp_stream.py")
  assert (datacomp.stream_buffer, datacomp.budget) == (2048, 512)
  assert (datacomp.init.kind, datacomp.train.epochs) == ("scratch", 1)
  lit = load(CONFIGS[0].parent / "colorswap_lit_l14.py")
  assert lit.optim.locked_tower == "img" and lit.train.batch_size == 35


@pytest.mark.parametrize("name, needs", [
    ("colorswap_clip_b32", "config.data.dir."),
    ("datacomp_stream", "config.data.dir, config.data.eval_dir.")])
def test_paper_sources_name_the_data_they_need(name, needs):
  config = load(CONFIGS[0].parent / f"{name}.py")
  with pytest.raises(config_lib.ConfigError, match=f"needs {needs}"):
    sources.build(config.data)
  assert sources.check(config.data) == [
      f"config.data.source={config.data.source!r} needs {needs}"]


def test_unknown_override_key_is_an_error():
  config = config_lib.validate(config_lib.base_config())
  with pytest.raises(AttributeError, match="epoch"):
    config.train.epoch = 3
  with pytest.raises(ValueError, match="config.data.source='imagenet'"):
    bad = config_lib.base_config()
    bad.data.source = "imagenet"
    config_lib.validate(bad)


def test_acquisition_tiles_are_chosen_per_backend_unless_set():
  config = config_lib.base_config()
  assert config.acquisition.block is None
  assert config_lib.tiling(config.acquisition) == {
      "block": "auto", "picks_per_pass": "auto"}
  config.acquisition.block, config.acquisition.picks_per_pass = 8192, 64
  assert config_lib.tiling(config.acquisition) == {
      "block": 8192, "picks_per_pass": 64}
  config.acquisition.block, config.acquisition.picks_per_pass = 4, 0
  found = config_lib.problems(config)
  assert "config.acquisition.block must be an integer >= 8, got 4." in found
  assert ("config.acquisition.picks_per_pass must be a positive integer, "
          "got 0.") in found


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Every mmal_jax module `path` imports, at any depth (functions too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return {m for m in found if m.startswith("mmal_jax")}


def test_the_config_imports_its_parts_and_no_part_imports_the_config():
  package = pathlib.Path(__file__).parents[1] / "mmal_jax"
  parts = sorted((package / "data").rglob("*.py")) + sorted(
      (package / "evaluators").rglob("*.py"))
  importers = [str(p.relative_to(package)) for p in parts
               if "mmal_jax.config_lib" in _imported_modules(p)]
  assert not importers, f"{importers} import config_lib (use mmal_jax.errors)"
  assert {"mmal_jax.data.sources", "mmal_jax.evaluators"} <= _imported_modules(
      package / "config_lib.py")
  assert config_lib.ConfigError is errors.ConfigError
