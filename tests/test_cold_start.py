"""Cold-start selectors against numpy references; same picks on any mesh."""
import itertools

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans

import acquisition_reference as ref
import device_counts
from mmal_jax import config_lib
from mmal_jax import loop
from mmal_jax import sharding
from mmal_jax.acquisition import STRATEGIES
from mmal_jax.acquisition import cold_start as cs
from mmal_jax.acquisition import kmeans as km
from mmal_jax.acquisition import layout as layout_lib

BLOCK = 16


def make_reps(n=120, dim=6, seed=0, clusters=8):
  """Two modalities of paired, clustered representations."""
  rng = np.random.default_rng(seed)
  centers = 3 * rng.standard_normal((clusters, 2, dim))
  which = rng.integers(0, clusters, n)
  return {m: (centers[which, k] + rng.standard_normal((n, dim))
              ).astype(np.float32) for k, m in enumerate(("image", "text"))}


def concat(reps):
  return np.concatenate([ref.normalize(r) for r in reps.values()], axis=1)


def greedy_nearest_unused(x, queries):
  """Numpy: query j in turn takes its most similar unused row."""
  sims = np.asarray(queries, np.float64) @ np.asarray(x, np.float64).T
  used, picks = set(), []
  for row in sims:
    for i in np.lexsort((np.arange(len(row)), -row)):
      if i not in used:
        used.add(int(i))
        picks.append(int(i))
        break
  return np.asarray(picks)


def objective(theta, x, num_modalities, tau, lambda_div, lambda_align):
  """Numpy float64: D - lambda_div R - lambda_align A (eqs. 6-8)."""
  theta = np.asarray(theta, np.float64)
  dim = theta.shape[-1]
  tn = theta / np.linalg.norm(theta, axis=-1, keepdims=True)
  xs = np.asarray(x, np.float64).reshape(len(x), num_modalities, dim)
  sims = np.einsum("imd,jmd->ij", xs, tn) / (num_modalities * tau)
  gap = -sims.max(axis=1).mean()
  intra = np.einsum("jmd,kmd->jk", tn, tn) / (num_modalities * tau)
  np.fill_diagonal(intra, -np.inf)
  lse = lambda a: np.log(np.exp(a - a.max(1, keepdims=True)).sum(1)) + a.max(1)
  diversity = -lse(intra).mean()
  align = np.mean([lse(tn[:, a] @ tn[:, c].T / tau).mean() for a, c in
                   itertools.combinations(range(num_modalities), 2)])
  return gap - lambda_div * diversity - lambda_align * align


def numeric_grad(f, theta, eps=1e-6):
  grad = np.zeros_like(theta, np.float64)
  for idx in np.ndindex(theta.shape):
    up, down = theta.astype(np.float64), theta.astype(np.float64)
    up[idx] += eps
    down[idx] -= eps
    grad[idx] = (f(up) - f(down)) / (2 * eps)
  return grad


# ----------------------------------------------------------- the selectors


def test_random_is_numpy_choice():
  reps = make_reps()
  picks = cs.SELECTORS["random"](reps, budget=15, seed=4)
  np.testing.assert_array_equal(
      picks, np.random.default_rng(4).choice(120, 15, replace=False))


def test_kcenter_is_greedy_k_center_on_the_concatenation():
  reps = make_reps()
  picks = cs.SELECTORS["kcenter"](reps, budget=15, seed=0, block=BLOCK)
  np.testing.assert_array_equal(picks, ref.kcenter_greedy(concat(reps), 15))


def test_kmeans_takes_the_row_nearest_each_centroid():
  reps = make_reps()
  x = concat(reps)
  picks = cs.SELECTORS["kmeans"](reps, budget=10, seed=3, block=BLOCK)
  seeds = km.kmeans_plusplus(x, 10, seed=3, block=BLOCK)
  centroids = KMeans(10, init=x[seeds], n_init=1, tol=0,
                     algorithm="lloyd").fit(x).cluster_centers_
  # All rows have norm sqrt(2): nearest = largest inner product.
  np.testing.assert_array_equal(picks, greedy_nearest_unused(x, centroids))
  dist = ((x[:, None] - centroids[None]) ** 2).sum(-1)
  assert (picks == dist.argmin(axis=0)).mean() >= 0.9


@pytest.mark.parametrize("lambda_align", [0., 1.])
def test_first_step_follows_the_numpy_objective(lambda_align):
  reps = make_reps(n=60, dim=4)
  x = concat(reps)
  budget, tau, lr = 5, 0.07, 1e-3
  _, _, theta1, losses = cs.optimize_centroids(
      reps, budget=budget, seed=2, block=BLOCK, iterations=1, lr=lr,
      lambda_align=lambda_align, batch_rows=None)
  init = np.random.default_rng(2).choice(60, budget, replace=False)
  theta0 = x[init].reshape(budget, 2, 4)
  f = lambda t: objective(t, x, 2, tau, 1., lambda_align)
  np.testing.assert_allclose(losses[0], f(theta0), rtol=1e-5, atol=1e-5)
  grad = numeric_grad(f, theta0)
  # Adam's first step is lr * g / (|g| + eps).
  step = theta0 - lr * grad / (np.abs(grad) + 1e-8)
  step /= np.linalg.norm(step, axis=-1, keepdims=True)
  np.testing.assert_allclose(theta1, step, atol=2e-6)


@pytest.mark.parametrize("name", ["activeft", "mmcsal"])
def test_losses_decrease_and_picks_are_distinct(name):
  reps = make_reps()
  kw = dict(budget=12, seed=0, block=BLOCK, iterations=100,
            lambda_align=1. if name == "mmcsal" else 0.)
  pool, order, theta, losses = cs.optimize_centroids(reps, **kw)
  assert order is None
  assert losses[-1] < losses[0] - 0.1
  assert np.mean(np.diff(losses) <= 1e-6) > 0.9
  picks = cs.SELECTORS[name](reps, budget=12, seed=0, block=BLOCK,
                             iterations=100)
  assert len(set(picks.tolist())) == 12
  np.testing.assert_array_equal(
      picks, greedy_nearest_unused(concat(reps), theta.reshape(12, -1)))
  del pool


def test_alignment_term_raises_alignment():
  reps = make_reps()
  kw = dict(budget=12, seed=1, block=BLOCK, iterations=150)
  _, _, plain, _ = cs.optimize_centroids(reps, lambda_align=0., **kw)
  _, _, aligned, _ = cs.optimize_centroids(reps, lambda_align=1., **kw)
  cross = lambda t: np.mean(np.sum(t[:, 0] * t[:, 1], axis=1))
  assert cross(aligned) > cross(plain)


def test_row_sampling_still_optimises():
  reps = make_reps(n=300)
  _, order, _, losses = cs.optimize_centroids(
      reps, budget=10, seed=0, block=BLOCK, iterations=60, batch_rows=100)
  assert sorted(order.tolist()) == list(range(300))
  assert losses[-10:].mean() < losses[:10].mean()
  picks = cs.SELECTORS["mmcsal"](reps, budget=10, seed=0, block=BLOCK,
                                 iterations=60, batch_rows=100)
  assert len(set(picks.tolist())) == 10 and picks.max() < 300


def test_nearest_unused_is_the_sequential_greedy_even_past_its_candidates():
  rng = np.random.default_rng(0)
  x = ref.normalize(rng.standard_normal((150, 5))).astype(np.float32)
  # 80 identical queries exhaust the 64 candidates each pass gathers.
  queries = np.concatenate([np.repeat(x[:1], 80, axis=0),
                            rng.standard_normal((10, 5))]).astype(np.float32)
  pool = layout_lib.shard_rows(x, block=BLOCK)
  np.testing.assert_array_equal(cs.nearest_unused(pool, queries),
                                greedy_nearest_unused(x, queries))
  eligible = np.arange(150) % 2 == 0
  picks = cs.nearest_unused(pool, queries[:40], eligible)
  assert eligible[picks].all() and len(set(picks.tolist())) == 40


# --------------------------------------------------- unaligned cold start


def test_cold_start_queries_split_the_budget():
  rng = np.random.default_rng(0)
  emb = {"image": rng.standard_normal((30, 4)),
         "text": rng.standard_normal((8, 4))}
  for selector in cs.SELECTORS:
    kw = dict(iterations=5) if selector in ("activeft", "mmcsal") else {}
    queries = cs.cold_start_queries(emb, budget=20, selector=selector, seed=1,
                                    split="even", block=BLOCK, **kw)
    counts = {m: sum(q[0] == m for q in queries) for m in emb}
    assert counts == {"image": 12, "text": 8}  # text capped at 8: 2 move on.
    assert len(set(queries)) == 20
    assert all(0 <= i < len(emb[m]) for m, i in queries)
  one = cs.cold_start_queries(emb, budget=10, selector="kcenter", seed=0,
                              block=BLOCK)
  modalities = [m for m, _ in one]
  assert len(set(modalities[:8])) == 1  # All in one modality while it lasts.
  picks = cs.SELECTORS["kcenter"]({modalities[0]: emb[modalities[0]]},
                                  budget=len(emb[modalities[0]][:10]),
                                  seed=0, block=BLOCK)
  assert [i for m, i in one if m == modalities[0]] == picks[:10].tolist()[
      :sum(m == modalities[0] for m in modalities)]


def test_errors_name_the_problem():
  reps = make_reps(n=20)
  with pytest.raises(ValueError, match="budget=21 is larger than the 20"):
    cs.SELECTORS["kmeans"](reps, budget=21, seed=0)
  with pytest.raises(ValueError, match="same number N"):
    cs.SELECTORS["random"]({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))},
                           budget=1, seed=0)
  with pytest.raises(KeyError, match="Unknown cold-start selector 'bald'"):
    cs.SELECTORS["bald"]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="same dimension"):
    cs.SELECTORS["mmcsal"]({"a": np.ones((5, 2)), "b": np.ones((5, 3))},
                           budget=2, seed=0)
  with pytest.raises(ValueError, match="iterations must be a positive"):
    cs.SELECTORS["activeft"](reps, budget=2, seed=0, iterations=0)
  with pytest.raises(ValueError, match="travel must be > 0"):
    cs.SELECTORS["mmcsal"](reps, budget=2, seed=0, travel=0.)
  with pytest.raises(ValueError, match="split must be one of"):
    cs.cold_start_queries(reps, budget=2, selector="random", seed=0,
                          split="half")


def clustered(k=8, per=40, dim=8, seed=0):
  """Two modalities of `k` tight clusters (`per` pairs each), and labels."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(k), per)
  reps = {}
  for m in ("image", "text"):
    x = rng.standard_normal((k, dim))[labels] + 0.15 * rng.standard_normal(
        (k * per, dim))
    reps[m] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return reps, labels


def test_travel_moves_the_selection_off_its_initialisation():
  # The centroids start at `random`'s picks of the same seed. With the
  # paper's lr the selection stays there; `travel` lets it leave them and
  # cover the clusters.
  reps, labels = clustered()
  init = set(cs.SELECTORS["random"](reps, budget=8, seed=0).tolist())
  fixed = cs.SELECTORS["mmcsal"](reps, budget=8, seed=0, iterations=100)
  moving = cs.SELECTORS["mmcsal"](reps, budget=8, seed=0, iterations=100,
                                  travel=2.)
  assert len(init & set(fixed.tolist())) >= 6
  assert len(init & set(moving.tolist())) <= 3
  assert len(set(labels[moving])) > len(set(labels[list(init)]))


def test_travel_lr_is_scaled_to_the_pool():
  reps, _ = clustered()
  x = cs.concat_normalized(reps)
  distances = np.linalg.norm(x[:, None] - x[None], axis=-1)
  median = np.median(distances[~np.eye(len(x), dtype=bool)])
  assert cs.pool_scale(x, seed=0) == pytest.approx(median, rel=0.05)
  assert cs.travel_lr(x, 2., 100, seed=0) == pytest.approx(
      2 * 2. * cs.pool_scale(x, seed=0) / (4. * 100))


# ------------------------------------------- the unaligned loop's cold start


def unaligned(seed=0):
  rng = np.random.default_rng(seed)
  emb = {"image": rng.standard_normal((40, 6)).astype(np.float32),
         "text": rng.standard_normal((30, 6)).astype(np.float32)}
  return emb, {m: np.zeros(len(z), bool) for m, z in emb.items()}


def cold_round(selector, mesh=None):
  """A first round under `selector` with a stream buffer of every 2nd item."""
  emb, none = unaligned()
  candidates = {m: np.arange(len(z)) % 2 == 0 for m, z in emb.items()}
  acquire = cs.with_cold_start(STRATEGIES["mmal"], selector)
  return acquire(emb, none, budget=8, seed=3, candidates=candidates,
                 mesh=mesh, block=BLOCK, coreset_size=16)


@pytest.mark.parametrize("selector", ["kmeans", "mmcsal"])
def test_with_cold_start_runs_the_selector_on_the_first_round(selector):
  emb, none = unaligned()
  picked = cold_round(selector)
  items = {m: np.flatnonzero(np.arange(len(z)) % 2 == 0)
           for m, z in emb.items()}
  want = cs.cold_start_queries({m: emb[m][items[m]] for m in emb}, budget=8,
                               selector=selector, seed=3, block=BLOCK)
  assert picked == [(m, int(items[m][i])) for m, i in want]
  assert len(set(picked)) == 8 and all(i % 2 == 0 for _, i in picked)
  assert picked != cold_round("")  # mmal's own cold start picks otherwise.
  # Once something is annotated, the strategy itself runs.
  annotated = {m: np.isin(np.arange(len(emb[m])),
                          [i for n, i in picked if n == m]) for m in emb}
  kw = dict(budget=8, seed=4, block=BLOCK, coreset_size=16)
  assert (cs.with_cold_start(STRATEGIES["mmal"], selector)(
      emb, annotated, **kw) == STRATEGIES["mmal"](emb, annotated, **kw))


def test_cold_start_selector_is_checked():
  assert cs.with_cold_start(STRATEGIES["mmal"], "") is STRATEGIES["mmal"]
  with pytest.raises(KeyError, match="Unknown cold-start selector 'bald'"):
    cs.with_cold_start(STRATEGIES["mmal"], "bald")
  config = config_lib.base_config()
  assert config.cold_start == "" and not config_lib.problems(config)
  config.cold_start = "bald"
  assert config_lib.problems(config) == [
      "config.cold_start='bald' is not one of ['', 'activeft', 'kcenter', "
      "'kmeans', 'mmcsal', 'random']."]
  with pytest.raises(config_lib.ConfigError, match="config.cold_start"):
    config_lib.validate(config)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() > 1, reason="1-device pass only: the "
                    "cold round on 1, 3 and 8 devices is compared by "
                    "test_results_do_not_depend_on_the_device_count")
def test_loop_first_round_uses_config_cold_start(tmp_path):
  import test_loop  # pylint: disable=g-import-not-at-top
  picks = {}
  for selector in ("", "kmeans"):
    config = test_loop.tiny_config(strategies=("mmal",), num_rounds=1,
                                   cold_start=selector)
    workdir = str(tmp_path / (selector or "default"))
    loop.run_experiment(config, workdir)
    # pylint: disable-next=protected-access
    log = test_loop._state(workdir, "mmal").log
    picks[selector] = [(a.modality, a.index) for a in log]
    assert len(set(picks[selector])) == config.budget
  assert picks["kmeans"] != picks[""]
  # All in one modality (the seed's), as cold_start_queries splits them.
  assert len({m for m, _ in picks["kmeans"]}) == 1


# ------------------------------------------------------------ device count


def fingerprint(num_devices: int) -> dict:
  """Every selector's picks and K-means on fixed data over `num_devices`."""
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  reps = make_reps(n=150)
  kw = dict(mesh=mesh, block=BLOCK)
  out = {name: fn(reps, budget=15, seed=0,
                  **(dict(iterations=10) if name in ("activeft", "mmcsal")
                     else {}), **kw)
         for name, fn in cs.SELECTORS.items()}
  _, _, theta, losses = cs.optimize_centroids(reps, budget=9, seed=1,
                                              iterations=10, batch_rows=60,
                                              **kw)
  out.update(theta=theta, losses=losses)
  result = km.kmeans(concat(reps), 6, seed=2, **kw)
  out["cold_round"] = cold_round("kmeans", mesh)
  out.update(centroids=result.centroids, labels=result.labels,
             inertia=result.inertia)
  return {k: np.asarray(v).tolist() for k, v in out.items()}


@pytest.mark.slow
def test_results_do_not_depend_on_the_device_count():
  device_counts.assert_same_on_every_device_count("test_cold_start",
                                                 fingerprint)
