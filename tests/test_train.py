"""Towers: fits share one compilation, embeddings, batch sizes over devices."""
import jax
import numpy as np
import pytest

import test_loop
from mmal_jax import config_lib
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
  towers.init_params(pool, 1)  # Another seed: the same compiled init.
  (init_params,) = towers._init.values()  # pylint: disable=protected-access
  assert init_params._cache_size() == 1


def test_embed_is_normalised_and_ordered(towers_and_pool):
  towers, pool, _ = towers_and_pool
  params = towers.init_params(pool, 0)
  every = towers.embed(params, pool, "text", np.arange(24), batch_size=16)
  assert every.shape == (24, 16) and every.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(every, axis=1), 1, atol=1e-5)
  some = towers.embed(params, pool, "text", np.array([5, 3, 21]), 8)
  np.testing.assert_allclose(some, every[[5, 3, 21]], atol=1e-6)


def test_the_batch_is_kept_on_any_device_count(towers_and_pool):
  """The configured batch, cut to the pairs only: never rounded to the
  device count (padding handles that)."""
  towers = towers_and_pool[0]
  assert towers.batch_size(70, 1000) == 70
  assert towers.batch_size(256, 20) == 20


@pytest.mark.skipif(jax.device_count() < 8, reason=(
    "fewer pairs than devices needs 8 devices (CI's second pass)"))
def test_fewer_pairs_than_devices_still_train(towers_and_pool):
  """Fewer pairs (3) than devices (8): one batch per epoch padded to 8,
  trained, not skipped (it was skipped, and round 2 then failed)."""
  towers, pool, config = towers_and_pool
  params = towers.init_params(pool, 0)
  result = towers.fit(params, pool, pool.pairs()[:3],
                      optim_config=config.optim, epochs=2, batch_size=8,
                      warmup_fraction=0., seed=0)
  assert result.steps == 2 and np.isfinite(result.final_loss)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), result.params,
                         params)
  assert any(jax.tree.leaves(changed))


@pytest.mark.skipif(jax.device_count() < 8, reason=(
    "a 1 -> 8 device resume needs 8 devices (CI's second pass, "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8)"))
def test_resume_on_8_devices_keeps_a_batch_of_12():
  """A fit with batch 12 (8 does not divide it) checkpointed on 1 device and
  resumed on 8: the same steps as the uninterrupted 1-device fit and the same
  loss and parameters (the 8-device batches are padded to 16 and masked)."""
  config = test_loop.tiny_config()
  pool = shapes.make_colorswap(12, 16, seed=0)
  one = train.Towers(config, sharding.make_mesh(jax.devices()[:1]))
  eight = train.Towers(config, sharding.make_mesh())
  params = one.init_params(pool, 0)
  pairs = pool.pairs()  # 24: 2 batches per epoch.
  kw = dict(optim_config=config.optim, epochs=3, batch_size=12,
            warmup_fraction=0.5, seed=4)
  saved = {}
  whole = one.fit(params, pool, pairs, checkpoint_every=3,
                  on_checkpoint=lambda step, state: saved.setdefault(
                      step, jax.device_get(state)), **kw)
  assert whole.steps == 6  # 8 devices rounded 12 down to 8: 9 steps.
  like = eight.state_like(config.optim, params)
  state = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), saved[3],
                       like)  # Mid-epoch, as orbax restores it onto 8.
  resumed = eight.fit(params, pool, pairs, resume=(3, state), **kw)
  assert resumed.steps == whole.steps
  np.testing.assert_allclose(resumed.final_loss, whole.final_loss, rtol=1e-4)
  for got, want in zip(jax.tree.leaves(resumed.params),
                       jax.tree.leaves(whole.params)):
    # Adam turns float noise in near-zero gradients into ~1e-5 steps.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3,
                               atol=1e-4)


def test_batch_sizes_are_checked_up_front():
  """Any positive batch is valid on any device count (padding); anything
  else is one config problem naming the field, before any work."""
  for value in (0, -8):
    config = test_loop.tiny_config()
    config.train.batch_size = value
    assert config_lib.problems(config) == [
        f"config.train.batch_size must be a positive integer, got {value!r}."]
  assert not config_lib.problems(test_loop.tiny_config(**{
      "train.batch_size": 3, "pretrain.batch_size": 5}))
