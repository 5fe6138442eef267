"""The Pallas tile reductions, in interpret mode, against the references of
the XLA kernels (tests/acquisition_reference.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import acquisition_reference as ref
from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import pallas_kernels

# Single-device calls: the 8-device CI pass would repeat the same run.
_ONE_DEVICE_PASS = pytest.mark.skipif(jax.device_count() > 1,
                                      reason="1-device pass only")


def _gaussian(n, d, seed):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _integers(n, d, seed, high=2):
  rng = np.random.default_rng(seed)
  return rng.integers(-high, high + 1, (n, d)).astype(np.float32)


def _margins(queries, keys, mask):
  top1, top2 = pallas_kernels.top2(
      jnp.asarray(queries), jnp.asarray(keys),
      jnp.ones(len(keys), jnp.float32), jnp.asarray(mask), block_rows=16,
      block_cols=32, interpret=True)
  top1, top2 = np.asarray(top1), np.asarray(top2)
  return np.where(top2 == -np.inf, np.inf, top1 - top2)


@_ONE_DEVICE_PASS
def test_top2_matches_reference():
  queries, keys = _gaussian(48, 8, 0), _gaussian(96, 8, 1)
  mask = np.random.default_rng(2).random(96) < 0.7
  np.testing.assert_allclose(_margins(queries, keys, mask),
                             ref.top2_margin(queries, keys, mask),
                             rtol=1e-5, atol=1e-5)


@_ONE_DEVICE_PASS
def test_top2_exact_ties_and_too_few_keys():
  queries, keys = _integers(32, 4, 3), _integers(64, 4, 4)
  mask = np.random.default_rng(5).random(64) < 0.6
  # Integer products are exact: bit equality on any backend.
  np.testing.assert_array_equal(
      _margins(queries, keys, mask),
      ref.top2_margin(queries, keys, mask).astype(np.float32))
  dup = np.concatenate([keys[:63], keys[:1]])  # The best key, twice.
  assert _margins(keys[:16], dup, np.ones(64, bool))[0] == 0
  one = np.zeros(64, bool)
  one[40] = True
  assert (_margins(queries, keys, one) == np.inf).all()


@_ONE_DEVICE_PASS
@pytest.mark.parametrize("integers", [False, True])
def test_nearest_center_matches_reference(integers):
  make = _integers if integers else _gaussian
  x, centers = make(64, 5, 6), make(64, 5, 7)
  valid = np.arange(64) < 41  # Padding centers past the real 41.
  bias = np.where(valid, np.einsum("cd,cd->c", centers, centers), np.inf)
  best, idx = pallas_kernels.nearest(
      jnp.asarray(x), jnp.full(64, 2., jnp.float32), jnp.asarray(centers),
      jnp.asarray(bias, jnp.float32), block_rows=16, block_cols=16,
      interpret=True)
  assert np.isfinite(np.asarray(best)).all()
  # As the XLA kernel: the distance recomputed to the chosen center.
  dist = np.linalg.norm(x - centers[np.asarray(idx)], axis=1)
  want = ref.min_distance(x, centers[:41]).astype(np.float32)
  if integers and jax.default_backend() == "cpu":
    np.testing.assert_array_equal(dist.astype(np.float32), want)
  else:
    np.testing.assert_allclose(dist, want, rtol=1e-5, atol=1e-5)
  # Ties go to the first center: duplicated centers never win.
  dup = np.concatenate([centers[:32], centers[:32]])
  _, idx = pallas_kernels.nearest(
      jnp.asarray(x), jnp.full(64, 2., jnp.float32), jnp.asarray(dup),
      jnp.asarray(np.einsum("cd,cd->c", dup, dup), jnp.float32),
      block_rows=16, block_cols=16, interpret=True)
  assert (np.asarray(idx) < 32).all()


@_ONE_DEVICE_PASS
def test_no_valid_center():
  best, _ = pallas_kernels.nearest(
      jnp.ones((16, 4)), jnp.ones(16), jnp.ones((16, 4)),
      jnp.full(16, jnp.inf), block_rows=16, block_cols=16, interpret=True)
  assert (np.asarray(best) == -np.inf).all()


def test_sharded_top2_margin_through_pallas():
  """`top2_margin(impl="pallas")`: the sharded path with the Pallas tile
  reduction gives the XLA path's margins (same tiles: the same bits on CPU)."""
  queries, keys = _gaussian(37, 8, 8), _gaussian(203, 8, 9)
  mask = np.random.default_rng(10).random(203) < 0.8
  xla = kernels.top2_margin(queries, keys, key_mask=mask, block=16)
  pallas = kernels.top2_margin(queries, keys, key_mask=mask, block=16,
                               impl="pallas")
  np.testing.assert_allclose(pallas, ref.top2_margin(queries, keys, mask),
                             rtol=1e-5, atol=1e-5)
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(pallas, xla)
  with pytest.raises(ValueError, match="Unknown impl"):
    kernels.top2_margin(queries, keys, impl="triton")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_sharded_min_distance_through_pallas(metric):
  x, centers = _gaussian(203, 8, 11), _gaussian(41, 8, 12)
  xla = kernels.min_distance(x, centers, metric=metric, block=16)
  pallas = kernels.min_distance(x, centers, metric=metric, block=16,
                                impl="pallas")
  np.testing.assert_allclose(pallas, ref.min_distance(x, centers, metric),
                             rtol=1e-5, atol=1e-5)
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(pallas, xla)
  empty = kernels.min_distance(x, centers[:0], block=16, impl="pallas")
  assert (empty == np.inf).all()
