"""BADGE against a reference that builds the gradient embeddings (tiny pool)."""
import jax
import numpy as np
import pytest

import acquisition_reference as ref
from mmal_jax.acquisition import badge as badge_lib
from mmal_jax.acquisition import kmeans as km
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition import STRATEGIES

BLOCK = 16


def gradient_embeddings(z, classes, scale):
  """Explicit g_x = (p_x - e_yhat) (x) z_x, (N, C * D)."""
  logits = scale * np.asarray(z, np.float64) @ np.asarray(classes,
                                                         np.float64).T
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  e = np.eye(len(classes))[logits.argmax(axis=1)]
  return ((p - e)[:, :, None] * z[:, None, :]).reshape(len(z), -1)


def kmeans_plusplus_reference(g, k, seed, rows_per_block, eligible):
  """BADGE's seeding on explicit vectors: largest norm first, then D^2
  sampling with the kernels' Gumbel noise."""
  key = jax.random.PRNGKey(seed)
  open_rows = eligible.copy()
  norms = np.where(open_rows, (g ** 2).sum(axis=1), -np.inf)
  picks = [int(np.argmax(norms))]
  open_rows[picks[0]] = False
  dist = ((g - g[picks[0]]) ** 2).sum(axis=1)
  for t in range(1, k):
    with np.errstate(divide="ignore"):
      weights = np.where(open_rows & (dist > 0), np.log(dist), -np.inf)
    if weights.max() == -np.inf:
      weights = np.where(open_rows, 0., -np.inf)
    noise = km.sampling_noise(key, t, len(g), rows_per_block)
    picks.append(int(np.argmax(np.where(open_rows, weights + noise,
                                        -np.inf))))
    open_rows[picks[-1]] = False
    dist = np.minimum(dist, ((g - g[picks[-1]]) ** 2).sum(axis=1))
  return picks


def unit_rows(n, dim, seed):
  return ref.normalize(np.random.default_rng(seed).standard_normal((n, dim)))


@pytest.mark.parametrize("scale", [1., 10.])
def test_implicit_distances_equal_the_explicit_ones(scale):
  z, classes = unit_rows(40, 6, 0), unit_rows(25, 6, 1)
  g = gradient_embeddings(z, classes, scale)
  centers = [0, 5, 17, 39]
  expected = ((g[:, None] - g[centers][None]) ** 2).sum(-1)
  got = badge_lib.gradient_sq_distances(z, classes, centers,
                                        logit_scale=scale, block=BLOCK)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_picks_equal_kmeans_plusplus_on_the_explicit_embeddings():
  z, classes = unit_rows(50, 6, 2), unit_rows(30, 6, 3)
  eligible = np.arange(50) % 5 != 1
  pool = layout_lib.shard_rows(z, block=BLOCK)
  picks = badge_lib.badge_sharded(
      pool, layout_lib.shard_mask(eligible, pool.layout), classes, 15,
      seed=7, block=BLOCK)
  expected = kmeans_plusplus_reference(
      gradient_embeddings(z, classes, 10.), 15, 7,
      pool.layout.rows_per_block, eligible)
  assert picks.tolist() == expected


def test_strategy_queries_the_chosen_modality_against_its_classes():
  rng = np.random.default_rng(0)
  emb = {"image": rng.standard_normal((40, 6)),
         "text": rng.standard_normal((30, 6))}
  annotated = {"image": np.arange(40) < 5, "text": np.arange(30) < 10}
  queries = STRATEGIES["badge"](emb, annotated, budget=12, seed=3,
                                modality="image", block=BLOCK)
  assert [m for m, _ in queries] == ["image"] * 12
  picks = np.array([i for _, i in queries])
  assert len(set(picks.tolist())) == 12 and (picks >= 5).all()
  # The classes are the unannotated texts, the rows the unannotated images,
  # the draw the seed the strategy derives after choosing the modality order.
  g = gradient_embeddings(ref.normalize(emb["image"]),
                          ref.normalize(emb["text"])[10:], 10.)
  rng = np.random.default_rng(3)
  rng.permutation(2)
  rows_per_block = layout_lib.pool_layout(
      40, layout_lib.resolve_mesh(None), BLOCK).rows_per_block
  expected = kmeans_plusplus_reference(
      g, 12, int(rng.integers(2 ** 31)), rows_per_block, ~annotated["image"])
  assert picks.tolist() == expected


def test_budget_beyond_a_modality_continues_in_the_next():
  rng = np.random.default_rng(1)
  emb = {"image": rng.standard_normal((6, 4)),
         "text": rng.standard_normal((20, 4))}
  none = {m: np.zeros(len(z), bool) for m, z in emb.items()}
  queries = STRATEGIES["badge"](emb, none, budget=10, seed=0,
                                modality="image", block=BLOCK)
  counts = {m: sum(q[0] == m for q in queries) for m in emb}
  assert counts == {"image": 6, "text": 4} and len(set(queries)) == 10


def test_without_classes_the_picks_are_uniform_and_valid():
  rng = np.random.default_rng(2)
  emb = {"image": rng.standard_normal((12, 4)),
         "text": rng.standard_normal((3, 4))}
  annotated = {"image": np.zeros(12, bool), "text": np.ones(3, bool)}
  queries = STRATEGIES["badge"](emb, annotated, budget=5, seed=0,
                                modality="image", block=BLOCK)
  assert len(set(queries)) == 5 and all(m == "image" for m, _ in queries)
  # One class: every gradient is 0, D^2 sampling falls back to uniform.
  annotated["text"][0] = False
  queries = STRATEGIES["badge"](emb, annotated, budget=5, seed=0,
                                modality="image", block=BLOCK)
  assert len(set(queries)) == 5


def test_candidates_bound_queries_and_classes():
  rng = np.random.default_rng(3)
  emb = {"image": rng.standard_normal((30, 4)),
         "text": rng.standard_normal((30, 4))}
  none = {m: np.zeros(30, bool) for m in emb}
  candidates = {m: np.arange(30) % 3 == 0 for m in emb}
  queries = STRATEGIES["badge"](emb, none, budget=6, seed=1,
                                candidates=candidates, block=BLOCK)
  assert all(i % 3 == 0 for _, i in queries) and len(set(queries)) == 6


def test_errors_name_the_problem():
  emb = {"image": np.ones((4, 2)), "text": np.ones((4, 2))}
  none = {m: np.zeros(4, bool) for m in emb}
  with pytest.raises(ValueError, match="modality must be 'random' or a "
                     "modality name"):
    STRATEGIES["badge"](emb, none, budget=2, seed=0, modality="audio")
  with pytest.raises(ValueError, match="budget=9 is larger than the 8"):
    STRATEGIES["badge"](emb, none, budget=9, seed=0)
