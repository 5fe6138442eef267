"""Towers: fits share one compilation, embeddings, batch sizes over devices."""
import numpy as np
import pytest

import test_loop
from mmal_jax import sharding
from mmal_jax import train
from mmal_jax.data import shapes


@pytest.fixture(scope="module")
def towers_and_pool():
  config = test_loop.tiny_config()
  pool = shapes.make_colorswap(12, 16, seed=0)
  return train.Towers(config, sharding.make_mesh()), pool, config


def test_fits_of_different_lengths_share_one_compiled_step(towers_and_pool):
  towers, pool, config = towers_and_pool
  params = towers.init_params(pool, 0)
  pairs = pool.pairs()
  losses = []
  for n in (8, 16, 24):
    result = towers.fit(params, pool, pairs[:n], optim_config=config.optim,
                        epochs=2, batch_size=8, warmup_fraction=0.5, seed=n)
    assert result.steps == 2 * n // 8
    losses.append(result.final_loss)
  assert np.isfinite(losses).all()
  (init_state, step), = towers._compiled.values()  # pylint: disable=protected-access
  assert step._cache_size() == 1 and init_state._cache_size() == 1


def test_embed_is_normalised_and_ordered(towers_and_pool):
  towers, pool, _ = towers_and_pool
  params = towers.init_params(pool, 0)
  every = towers.embed(params, pool, "text", np.arange(24), batch_size=16)
  assert every.shape == (24, 16) and every.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(every, axis=1), 1, atol=1e-5)
  some = towers.embed(params, pool, "text", np.array([5, 3, 21]), 8)
  np.testing.assert_allclose(some, every[[5, 3, 21]], atol=1e-6)


def test_too_few_pairs_for_the_devices_skip_training(towers_and_pool):
  towers, pool, config = towers_and_pool
  params = towers.init_params(pool, 0)
  result = towers.fit(params, pool, pool.pairs()[:towers.mesh.size - 1],
                      optim_config=config.optim, epochs=1, batch_size=8,
                      warmup_fraction=0., seed=0)
  assert result.steps == 0 and result.params is params


def test_batch_size_is_a_multiple_of_the_devices(towers_and_pool):
  towers = towers_and_pool[0]
  devices = towers.mesh.size
  assert towers.batch_size(70, 1000) == 70 // devices * devices
  assert towers.batch_size(256, 20) == 20 // devices * devices
  if devices > 1:
    with pytest.raises(ValueError, match="cannot fill one batch"):
      towers.batch_size(64, devices - 1)
