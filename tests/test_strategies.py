"""Strategy invariants, numpy references, the min-distance cache, and errors."""
import os
import re
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
from jax import monitoring
import numpy as np
import pytest

import acquisition_reference as ref
from mmal_jax.acquisition import build_min_distance_cache
from mmal_jax.acquisition import STRATEGIES
from mmal_jax.acquisition import update_min_distance_cache

BLOCK = 16


def _round(sizes=(120, 90), dim=12, annotated=(6, 6), seed=0):
  rng = np.random.default_rng(seed)
  names = ("image", "text", "audio")[:len(sizes)]
  embeddings = {m: rng.standard_normal((n, dim)).astype(np.float32)
                for m, n in zip(names, sizes)}
  masks = {}
  for m, n, a in zip(names, sizes, annotated):
    masks[m] = np.zeros(n, bool)
    masks[m][rng.choice(n, a, replace=False)] = True
  return embeddings, masks


def _check_queries(queries, budget, annotated, candidates=None):
  assert len(queries) == budget
  assert len(set(queries)) == budget
  for m, i in queries:
    assert isinstance(m, str) and isinstance(i, int)
    assert not annotated[m][i]
    if candidates is not None:
      assert candidates[m][i]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("sizes", [(120, 90), (40, 70, 55)])
def test_queries_are_exact_distinct_unannotated(name, sizes):
  embeddings, annotated = _round(sizes, annotated=(5,) * len(sizes))
  queries = STRATEGIES[name](embeddings, annotated, budget=17, seed=1,
                             block=BLOCK)
  _check_queries(queries, 17, annotated)
  again = STRATEGIES[name](embeddings, annotated, budget=17, seed=1,
                           block=BLOCK)
  assert queries == again


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_stream_candidates_bound_queries_and_keys(name):
  embeddings, annotated = _round()
  rng = np.random.default_rng(3)
  candidates = {m: rng.random(len(z)) < 0.3 for m, z in embeddings.items()}
  queries = STRATEGIES[name](embeddings, annotated, budget=12, seed=2,
                             candidates=candidates, block=BLOCK)
  _check_queries(queries, 12, annotated, candidates)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_cold_start_and_budget_spilling_over_modalities(name):
  embeddings, _ = _round(sizes=(10, 30))
  none = {m: np.zeros(len(z), bool) for m, z in embeddings.items()}
  queries = STRATEGIES[name](embeddings, none, budget=25, seed=0, block=BLOCK)
  _check_queries(queries, 25, none)
  # Everything but 3 items annotated: the budget takes exactly those.
  almost = {m: np.ones(len(z), bool) for m, z in embeddings.items()}
  almost["image"][[2, 5]] = False
  almost["text"][7] = False
  queries = STRATEGIES[name](embeddings, almost, budget=3, seed=0, block=BLOCK)
  assert sorted(queries) == [("image", 2), ("image", 5), ("text", 7)]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_mmal_matches_numpy_reference(metric):
  embeddings, annotated = _round(sizes=(150, 130), annotated=(8, 12))
  got = STRATEGIES["mmal"](embeddings, annotated, budget=10, seed=0,
                           coreset_size=40, metric=metric, block=BLOCK)
  assert got == ref.mmal(embeddings, annotated, 10, 40, "auto", metric)


def test_mmal_modality_ablation_and_three_modalities():
  embeddings, annotated = _round(sizes=(60, 50, 40), annotated=(3, 3, 3))
  for m in embeddings:
    got = STRATEGIES["mmal"](embeddings, annotated, budget=8, seed=0,
                             coreset_size=20, modality=m, block=BLOCK)
    assert got == ref.mmal(embeddings, annotated, 8, 20, m)
  picked = {STRATEGIES["mmal"](embeddings, annotated, budget=4, seed=s,
                               modality="random", block=BLOCK)[0][0]
            for s in range(12)}
  assert len(picked) > 1


def test_mmal_queries_the_least_covered_modality():
  # Texts sit next to their annotated ones; images are spread out.
  rng = np.random.default_rng(0)
  texts = np.tile(rng.standard_normal((4, 8)), (25, 1))
  texts += 1e-3 * rng.standard_normal(texts.shape)
  embeddings = {"image": rng.standard_normal((100, 8)), "text": texts}
  annotated = {m: np.zeros(100, bool) for m in embeddings}
  annotated["image"][:4] = annotated["text"][:4] = True
  queries = STRATEGIES["mmal"](embeddings, annotated, budget=5, seed=0,
                               block=BLOCK)
  assert {m for m, _ in queries} == {"image"}


def test_uncertainty_matches_numpy_reference():
  embeddings, annotated = _round(sizes=(70, 60))
  got = STRATEGIES["uncertainty"](embeddings, annotated, budget=15, seed=0,
                                  block=BLOCK)
  assert got == ref.uncertainty(embeddings, annotated, 15)


def test_coreset_is_greedy_kcenter_in_the_drawn_modality():
  embeddings, annotated = _round()
  queries = STRATEGIES["coreset"](embeddings, annotated, budget=9, seed=4,
                                  block=BLOCK)
  (m,) = {q[0] for q in queries}
  z = ref.normalize(embeddings[m])
  want = ref.kcenter_greedy(z, 9, annotated[m])
  assert [i for _, i in queries] == want.tolist()


def test_random_is_seeded_and_spreads_over_modalities():
  embeddings, annotated = _round()
  runs = [STRATEGIES["random"](embeddings, annotated, budget=10, seed=s)
          for s in range(10)]
  assert len({tuple(r) for r in runs}) == 10
  assert len({r[0][0] for r in runs}) == 2


def test_cache_update_equals_rebuild_and_is_used():
  embeddings, annotated = _round()
  cache = build_min_distance_cache(embeddings, annotated, block=BLOCK)
  for m, z in embeddings.items():
    zn = ref.normalize(z)
    np.testing.assert_allclose(np.asarray(cache[m]),
                               ref.min_distance(zn, zn[annotated[m]]),
                               atol=1e-5)
  new = {"image": np.array([0, 11]), "text": np.array([5])}
  updated = update_min_distance_cache(cache, embeddings, new, block=BLOCK)
  after = {m: a.copy() for m, a in annotated.items()}
  for m, idx in new.items():
    after[m][idx] = True
  rebuilt = build_min_distance_cache(embeddings, after, block=BLOCK)
  for m in embeddings:
    np.testing.assert_array_equal(np.asarray(updated[m]),
                                  np.asarray(rebuilt[m]))
  for name in ("mmal", "coreset"):
    with_cache = STRATEGIES[name](embeddings, after, budget=7, seed=0,
                                  min_dist=updated, block=BLOCK)
    assert with_cache == STRATEGIES[name](embeddings, after, budget=7, seed=0,
                                          block=BLOCK)
  cold = build_min_distance_cache(
      embeddings, {m: np.zeros_like(a) for m, a in annotated.items()})
  assert all(np.isposinf(np.asarray(d)).all() for d in cold.values())


@hypothesis.given(st.integers(2, 40), st.integers(2, 40), st.data())
def test_any_pool_gives_a_valid_query_set(n_image, n_text, data):
  embeddings, _ = _round(sizes=(n_image, n_text), dim=4, annotated=(0, 0),
                         seed=data.draw(st.integers(0, 99)))
  annotated = {m: np.asarray(data.draw(st.lists(
      st.booleans(), min_size=len(z), max_size=len(z))), bool)
               for m, z in embeddings.items()}
  left = sum(int((~a).sum()) for a in annotated.values())
  hypothesis.assume(left >= 1)
  budget = data.draw(st.integers(1, left))
  name = data.draw(st.sampled_from(sorted(STRATEGIES)))
  queries = STRATEGIES[name](embeddings, annotated, budget=budget, seed=0,
                             block=BLOCK)
  _check_queries(queries, budget, annotated)


# -------------------------------------------------------------------- errors


def test_errors_name_the_problem():
  embeddings, annotated = _round()
  mmal = STRATEGIES["mmal"]
  with pytest.raises(KeyError, match="Unknown acquisition strategy 'bald'"):
    STRATEGIES["bald"]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="budget=211 is larger than the 198"):
    mmal(embeddings, annotated, budget=211, seed=0)
  candidates = {m: np.zeros(len(z), bool) for m, z in embeddings.items()}
  candidates["text"][:3] = True
  with pytest.raises(ValueError, match="budget=4 is larger than the 3 "
                     "unannotated candidate"):
    mmal(embeddings, annotated, budget=4, seed=0, candidates=candidates)
  with pytest.raises(ValueError, match="budget must be a positive integer"):
    mmal(embeddings, annotated, budget=0, seed=0)
  with pytest.raises(ValueError, match="Unknown metric 'l1'"):
    STRATEGIES["coreset"](embeddings, annotated, budget=2, seed=0, metric="l1")
  with pytest.raises(ValueError, match="coreset_size must be an integer >= "
                     "budget"):
    mmal(embeddings, annotated, budget=5, seed=0, coreset_size=4)
  with pytest.raises(ValueError, match="modality must be one of"):
    mmal(embeddings, annotated, budget=5, seed=0, modality="video")
  with pytest.raises(TypeError, match="unexpected keyword argument 'coreset'"):
    mmal(embeddings, annotated, budget=5, seed=0, coreset=4)

  with pytest.raises(ValueError, match="dimensions differ across modalities"):
    mmal({**embeddings, "text": embeddings["text"][:, :5]}, annotated,
         budget=2, seed=0)
  with pytest.raises(ValueError, match="Modality 'text' is empty"):
    mmal({**embeddings, "text": np.zeros((0, 12), np.float32)},
         {**annotated, "text": np.zeros(0, bool)}, budget=2, seed=0)
  with pytest.raises(ValueError, match="at least two modalities"):
    mmal({"image": embeddings["image"]}, {"image": annotated["image"]},
         budget=2, seed=0)
  bad = embeddings["image"].copy()
  bad[7, 0] = np.nan
  with pytest.raises(ValueError, match=r"embeddings\['image'\] has NaN or inf "
                     "values in 1 row.*first at row 7"):
    mmal({**embeddings, "image": bad}, annotated, budget=2, seed=0)
  with pytest.raises(ValueError, match=r"annotated\['text'\] must have shape "
                     r"\(90,\)"):
    mmal(embeddings, {**annotated, "text": annotated["text"][:5]}, budget=2,
         seed=0)
  with pytest.raises(ValueError, match="annotated must be a dict over"):
    mmal(embeddings, {"image": annotated["image"]}, budget=2, seed=0)
  with pytest.raises(ValueError, match=r"min_dist\['image'\] must have shape"):
    mmal(embeddings, annotated, budget=2, seed=0,
         min_dist={"image": np.zeros(3), "text": np.zeros(90)})


def test_unknown_strategy_is_a_value_error():
  with pytest.raises(ValueError, match="Unknown acquisition strategy 'nope'; "
                     "expected one of"):
    STRATEGIES["nope"]  # pylint: disable=pointless-statement


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_bools_are_not_counts(name):
  embeddings, annotated = _round()
  with pytest.raises(ValueError, match="budget must be a positive integer, "
                     "got True"):
    STRATEGIES[name](embeddings, annotated, budget=True, seed=0, block=BLOCK)
  with pytest.raises(ValueError, match="block must be an integer >= 8"):
    STRATEGIES[name](embeddings, annotated, budget=3, seed=0, block=True)
  if name in ("mmal", "coreset"):  # The others take it and ignore it.
    with pytest.raises(ValueError, match="picks_per_pass must be a positive"):
      STRATEGIES[name](embeddings, annotated, budget=3, seed=0,
                       picks_per_pass=True)


def test_mmal_coreset_size_bool_is_rejected():
  embeddings, annotated = _round()
  with pytest.raises(ValueError, match="coreset_size must be an integer"):
    STRATEGIES["mmal"](embeddings, annotated, budget=1, seed=0,
                       coreset_size=True)


_NAN_CACHE = r"""
import sys
import numpy as np
sys.path.insert(0, {tests!r})
import test_strategies as t
from mmal_jax import sharding
from mmal_jax.acquisition import kernels, layout, STRATEGIES
embeddings, annotated = t._round()
for bad in (np.nan, -np.inf):
  for name in ("mmal", "coreset"):
    cache = {{m: np.full(len(z), bad, np.float32)
             for m, z in embeddings.items()}}
    try:
      STRATEGIES[name](embeddings, annotated, budget=5, seed=0,
                       min_dist=cache, block=t.BLOCK)
    except ValueError as e:
      print("ValueError:", e)
# The greedy loop itself ends on NaN distances that bypass validation.
x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
pool = layout.shard_rows(x, block=t.BLOCK)
eligible = layout.shard_mask(np.ones(50, bool), pool.layout)
nan = layout.row_vector(np.full(50, np.nan), pool.layout, np.nan)
for per_pass in (1, 4):
  try:
    kernels.kcenter_greedy_sharded(pool, 7, eligible=eligible, init_dist=nan,
                                   picks_per_pass=per_pass)
  except ValueError as e:
    print("ValueError:", e)
"""


def test_nan_or_neg_inf_cache_is_rejected_and_greedy_always_ends():
  # Before the fix an all-NaN cache made mmal and coreset loop forever: run
  # in a subprocess under a timeout.
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  run = subprocess.run([sys.executable, "-c", _NAN_CACHE.format(tests=tests)],
                       env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.splitlines()
  assert len(lines) == 6, run.stdout
  for line, bad in zip(lines[:4], ("NaN", "NaN", "-inf", "-inf")):
    assert re.match(r"ValueError: min_dist\['image'\] holds 120 NaN or -inf "
                    r"value\(s\), first at item 0", line), line
  for line in lines[4:]:
    assert "greedy k-center made only 0 of 7 picks" in line, line


def _compiles(fn):
  """Number of programs jax lowers (compiles or loads) while fn runs."""
  seen = []

  def listen(name, *_, **__):
    if name == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      seen.append(name)

  monitoring.register_event_duration_secs_listener(listen)
  try:
    fn()
  finally:
    monitoring.unregister_event_duration_listener(listen)
  return len(seen)


def _bucketed_round(n, num_annotated, seed):
  rng = np.random.default_rng(seed)
  embeddings = {m: rng.standard_normal((n, 8)).astype(np.float32)
                for m in ("image", "text")}
  annotated = {}
  for m in embeddings:
    annotated[m] = np.zeros(n, bool)
    annotated[m][rng.choice(n, num_annotated, replace=False)] = True
  return embeddings, annotated


@pytest.mark.parametrize("name", ["mmal", "coreset"])
def test_no_recompilation_within_a_size_bucket(name):
  # N in (512, 1024], annotated items in (16, 32], budget in (8, 16] (coreset
  # 4 x budget in (32, 64]): one set of programs.
  def run(n, num_annotated, budget, seed):
    embeddings, annotated = _bucketed_round(n, num_annotated, seed)
    return _compiles(lambda: STRATEGIES[name](
        embeddings, annotated, budget=budget, seed=0, block=BLOCK))

  run(600, 20, 9, 0)
  for n, num_annotated, budget in ((1000, 32, 16), (513, 17, 12),
                                   (777, 25, 10)):
    assert run(n, num_annotated, budget, n) == 0, (n, num_annotated, budget)
  # The counter does see compilations: a pool of another bucket compiles.
  assert run(1100, 20, 9, 1) > 0
