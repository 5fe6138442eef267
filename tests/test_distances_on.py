"""The metric ablation (paper 1, Table 8): coverage distances on the towers'
raw outputs (`distances_on="raw"`) against normalised embeddings."""
import numpy as np
import pytest

import acquisition_reference as ref
from mmal_jax import config_lib
from mmal_jax.acquisition import build_min_distance_cache
from mmal_jax.acquisition import STRATEGIES

BLOCK = 16


def _norms_disagree(sizes=(60, 50), dim=6, seed=0):
  """Embeddings whose norms (0.1 to 10) rank items unlike their directions:
  raw and normalised distances order them differently."""
  rng = np.random.default_rng(seed)
  embeddings, annotated = {}, {}
  for m, n in zip(("image", "text"), sizes):
    directions = ref.normalize(rng.standard_normal((n, dim)))
    norms = np.exp(rng.uniform(np.log(0.1), np.log(10.0), (n, 1)))
    embeddings[m] = (directions * norms).astype(np.float32)
    annotated[m] = np.zeros(n, bool)
    annotated[m][rng.choice(n, 4, replace=False)] = True
  return embeddings, annotated


def test_raw_distances_match_numpy_and_differ_from_normalised():
  embeddings, annotated = _norms_disagree()
  cache = {(metric, on): build_min_distance_cache(
      embeddings, annotated, metric=metric, distances_on=on, block=BLOCK)
           for metric in ("euclidean", "cosine")
           for on in ("normalized", "raw")}
  for m, z in embeddings.items():
    raw = ref.min_distance(z, z[annotated[m]])
    unit = ref.normalize(z)
    normalised = ref.min_distance(unit, unit[annotated[m]])
    cosine = ref.min_distance(z, z[annotated[m]], "cosine")
    np.testing.assert_allclose(cache["euclidean", "raw"][m], raw, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(cache["euclidean", "normalized"][m],
                               normalised, rtol=1e-5, atol=1e-5)
    # Built to differ: the raw distances order the items otherwise.
    assert not np.allclose(raw, normalised, rtol=0.1)
    assert (np.argsort(cache["euclidean", "raw"][m]).tolist() !=
            np.argsort(cache["euclidean", "normalized"][m]).tolist())
    # On unit vectors Euclidean distance is sqrt(2 x cosine distance); cosine
    # distance ignores norms, raw or not.
    for on in ("normalized", "raw"):
      np.testing.assert_allclose(cache["cosine", on][m], cosine, atol=1e-5)
    np.testing.assert_allclose(cache["euclidean", "normalized"][m],
                               np.sqrt(2 * np.maximum(cosine, 0)), atol=1e-3)


def _mmal_raw_reference(embeddings, annotated, budget, coreset_size):
  """Algorithm 1 with coverage (radius, k-center) on the raw vectors and
  margins on the normalised ones."""
  unit = {m: ref.normalize(z) for m, z in embeddings.items()}
  available = {m: ~annotated[m] for m in embeddings}
  radius = {m: ref.min_distance(z[available[m]], z[annotated[m]]).max()
            for m, z in embeddings.items()}
  modality = max(embeddings, key=lambda m: radius[m])
  coreset = ref.kcenter_greedy(embeddings[modality], coreset_size,
                               annotated[modality],
                               eligible=available[modality])
  margins = np.zeros(len(coreset))
  for other in embeddings:
    if other != modality:
      margins += ref.top2_margin(unit[modality][coreset], unit[other],
                                 available[other])
  return [(modality, int(i))
          for i in coreset[np.argsort(margins, kind="stable")[:budget]]]


def test_metric_ablation_ranks_differently_only_on_raw_outputs():
  embeddings, annotated = _norms_disagree()
  picks = {(metric, on): STRATEGIES["mmal"](
      embeddings, annotated, budget=6, seed=0, coreset_size=20,
      metric=metric, distances_on=on, block=BLOCK)
           for metric in ("euclidean", "cosine")
           for on in ("normalized", "raw")}
  # Normalised embeddings: Euclidean and cosine are the same ranking.
  assert picks["euclidean", "normalized"] == picks["cosine", "normalized"]
  assert picks["cosine", "raw"] == picks["cosine", "normalized"]
  # Raw outputs: Table 8 compares two different selections.
  assert picks["euclidean", "raw"] != picks["cosine", "raw"]
  assert picks["euclidean", "raw"] == _mmal_raw_reference(
      embeddings, annotated, 6, 20)
  got = STRATEGIES["coreset"](embeddings, annotated, budget=7, seed=3,
                              distances_on="raw", block=BLOCK)
  (m,) = {q[0] for q in got}
  assert [i for _, i in got] == ref.kcenter_greedy(
      embeddings[m], 7, annotated[m]).tolist()


def test_unknown_distances_on_is_named():
  with pytest.raises(ValueError, match="Unknown distances_on 'unit'"):
    STRATEGIES["mmal"](*_norms_disagree(), budget=2, seed=0,
                       distances_on="unit", block=BLOCK)
  config = config_lib.base_config()
  config.strategy_hparams.mmal.distances_on = "unit"
  with pytest.raises(config_lib.ConfigError,
                     match=r"strategy_hparams.mmal.distances_on='unit' is "
                     r"not one of \['normalized', 'raw'\]"):
    config_lib.validate(config)
