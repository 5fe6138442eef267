"""Sharded K-means and k-means++ against scikit-learn and numpy; tree sums."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sklearn.cluster import KMeans

from mmal_jax import sharding
from mmal_jax.acquisition import kmeans as km
from mmal_jax.acquisition import layout as layout_lib

BLOCK = 16


def blobs(n=400, k=5, dim=6, seed=0, spread=4., labels=False):
  rng = np.random.default_rng(seed)
  centers = spread * rng.standard_normal((k, dim))
  which = rng.integers(0, k, n)
  x = (centers[which] + rng.standard_normal((n, dim))).astype(np.float32)
  return (x, which) if labels else x


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_matches_scikit_learn_from_the_same_init(seed):
  x = blobs(seed=seed)
  init = x[np.random.default_rng(seed).choice(len(x), 7, replace=False)]
  ours = km.kmeans(x, 7, init=init, block=BLOCK, max_iters=300)
  ref = KMeans(7, init=init, n_init=1, tol=0, max_iter=300,
               algorithm="lloyd").fit(x)
  np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, atol=1e-4)
  np.testing.assert_array_equal(ours.labels, ref.labels_)
  np.testing.assert_allclose(ours.inertia, ref.inertia_, rtol=1e-5)
  assert ours.iterations == ref.n_iter_


def test_rows_left_out_take_no_part():
  x = blobs()
  valid = np.arange(len(x)) % 3 != 0
  init = x[valid][:4]
  ours = km.kmeans(x, 4, init=init, valid=valid, block=BLOCK)
  ref = KMeans(4, init=init, n_init=1, tol=0, algorithm="lloyd").fit(x[valid])
  np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, atol=1e-4)
  np.testing.assert_array_equal(ours.labels[valid], ref.labels_)
  assert (ours.labels[~valid] == -1).all()


def test_kmeans_plusplus_picks_distinct_eligible_rows_by_seed():
  x = blobs()
  eligible = np.arange(len(x)) >= 100
  picks = km.kmeans_plusplus(x, 30, seed=0, eligible=eligible, block=BLOCK)
  assert len(set(picks.tolist())) == 30 and (picks >= 100).all()
  again = km.kmeans_plusplus(x, 30, seed=0, eligible=eligible, block=BLOCK)
  np.testing.assert_array_equal(picks, again)
  other = km.kmeans_plusplus(x, 30, seed=1, eligible=eligible, block=BLOCK)
  assert not np.array_equal(picks, other)
  # Far apart blobs: D^2 sampling puts the 5 seeds in 5 different blobs.
  x, labels = blobs(spread=100., labels=True)
  for seed in range(3):
    picks = km.kmeans_plusplus(x, 5, seed=seed, block=BLOCK)
    assert len(set(labels[picks])) == 5


def test_kmeans_plusplus_samples_proportionally_to_squared_distance():
  # Rows 0, 1, 3 on a line (and 10 copies of nothing else): after a first
  # uniform pick i, j != i is drawn with probability d(i, j)^2 / sum.
  x = np.array([[0.], [1.], [3.]], np.float32)
  counts = np.zeros((3, 3))
  trials = 900
  for seed in range(trials):
    i, j = km.kmeans_plusplus(x, 2, seed=seed, block=8)
    counts[i, j] += 1
  d2 = (x - x.T) ** 2
  expected = trials / 3 * d2 / d2.sum(axis=1, keepdims=True)
  sigma = np.sqrt(expected * (1 - expected / trials) + 1)
  assert (np.abs(counts - expected) < 4 * sigma).all(), (counts, expected)


def test_sampling_noise_is_what_the_kernel_adds():
  # Row 0 is the only eligible row at distance > 0 besides one duplicate:
  # with everything else at distance 0 the draw is decided by the weights.
  x = np.zeros((20, 2), np.float32)
  x[7] = 1.
  picks = km.kmeans_plusplus(x, 2, seed=5, block=8)
  assert 7 in picks.tolist()
  noise = km.sampling_noise(jax.random.PRNGKey(5), 0, 20, 8)
  assert picks[0] == int(np.argmax(noise))


def test_tree_sum_is_the_sum_and_needs_powers_of_two():
  mesh = sharding.make_mesh()
  n = mesh.size
  values = jnp.arange(n * 4 * 3, dtype=jnp.float32).reshape(n * 4, 3)

  def local(v):
    return km.tree_sum(lambda j: v[j], 4, 10)

  out = jax.shard_map(local, mesh=mesh, in_specs=P(sharding.ROW_AXES),
                      out_specs=P(), check_vma=False)(values)
  np.testing.assert_array_equal(out, np.asarray(values)[:10].sum(axis=0))
  with pytest.raises(ValueError, match="power of two"):
    jax.shard_map(lambda v: km.tree_sum(lambda j: v[j], 3, 3), mesh=mesh,
                  in_specs=P(sharding.ROW_AXES), out_specs=P(),
                  check_vma=False)(jnp.zeros((3 * n, 2)))


@pytest.mark.parametrize("num_devices", [1, 3, 6, 8])
def test_pools_have_power_of_two_blocks_per_device(num_devices):
  # What tree_sum needs, on any mesh size (the layout reads only its size).
  mesh = types.SimpleNamespace(size=num_devices)
  for n in (1, 100, 1000, 5000):
    lay = layout_lib.pool_layout(n, mesh, 64)
    per_device = lay.num_blocks // mesh.size
    assert per_device & (per_device - 1) == 0
    assert lay.padded_rows >= n and lay.num_blocks % mesh.size == 0


def test_errors_name_the_problem():
  x = blobs(n=20)
  with pytest.raises(ValueError, match="num_clusters=30 is larger than the "
                     "20 rows"):
    km.kmeans(x, 30)
  with pytest.raises(ValueError, match=r"init must be \(C, 6\)"):
    km.kmeans_sharded(layout_lib.shard_rows(x), np.zeros((3, 2)))
  with pytest.raises(ValueError, match="init has 3 centroids"):
    km.kmeans(x, 4, init=x[:3])
  bad = x.copy()
  bad[4, 1] = np.nan
  with pytest.raises(ValueError, match="NaN or inf values in 1 row"):
    km.kmeans(bad, 2)
  with pytest.raises(ValueError, match="k must be a positive integer"):
    km.kmeans_plusplus(x, 0)
