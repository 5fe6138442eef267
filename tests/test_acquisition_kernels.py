"""Kernels vs plain numpy references, on whatever devices this run has."""
import re

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_distances

import acquisition_reference as ref
from mmal_jax.acquisition import covering_radius
from mmal_jax.acquisition import kcenter_greedy
from mmal_jax.acquisition import min_distance
from mmal_jax.acquisition import top2_margin
from mmal_jax import sharding
from mmal_jax.acquisition import badge as badge_lib
from mmal_jax.acquisition import cold_start
from mmal_jax.acquisition import kernels
from mmal_jax.acquisition import kmeans as kmeans_lib
from mmal_jax.acquisition import layout as layout_lib
from mmal_jax.acquisition import pallas_kernels
from mmal_jax.acquisition import strategies
from mmal_jax.acquisition import tile_math

# Small tiles so that small pools still span many blocks and center chunks.
BLOCK = 16


def _gaussian(n, d, seed):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _integers(n, d, seed, high=2):
  """Small-integer points: every distance is exact, so ties are exact too."""
  rng = np.random.default_rng(seed)
  return rng.integers(-high, high + 1, (n, d)).astype(np.float32)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,c,d", [(1, 1, 3), (37, 5, 7), (203, 41, 33),
                                   (64, 70, 8)])
def test_min_distance_matches_numpy(metric, n, c, d):
  x, centers = _gaussian(n, d, 0), _gaussian(c, d, 1)
  got = np.asarray(min_distance(x, centers, metric=metric, block=BLOCK))
  assert got.shape == (n,) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref.min_distance(x, centers, metric),
                             rtol=1e-5, atol=1e-5)


def test_min_distance_duplicates_are_exactly_zero():
  x = _gaussian(50, 9, 2)
  centers = np.concatenate([x[[3, 17, 49]], _gaussian(20, 9, 3)])
  got = np.asarray(min_distance(x, centers, block=BLOCK))
  assert (got[[3, 17, 49]] == 0).all()
  assert (np.delete(got, [3, 17, 49]) > 0).all()


def _assert_equal_to_numpy(got, want, ulps=1):
  """Bit equality with numpy where it holds (CPU: XLA's sqrt is correctly
  rounded, as numpy's); within `ulps` elsewhere (GPU sqrt is not)."""
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_array_max_ulp(got, want, maxulp=ulps)


def test_min_distance_exact_on_integer_points():
  x, centers = _integers(90, 5, 4), _integers(30, 5, 5)
  got = np.asarray(min_distance(x, centers, block=BLOCK))
  _assert_equal_to_numpy(got, ref.min_distance(x, centers).astype(np.float32))


def test_cosine_is_sklearns_cosine_distances_on_unnormalised_input():
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((120, 16)) * rng.uniform(0.1, 30, (120, 1))
       ).astype(np.float32)
  centers = 7 * _gaussian(25, 16, 4)
  want = cosine_distances(x, centers).min(axis=1)
  got = min_distance(x, centers, metric="cosine", block=BLOCK)
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert got.max() <= 2 + 1e-6
  np.testing.assert_allclose(
      covering_radius(x, centers, metric="cosine", block=BLOCK), want.max(),
      atol=2e-6)
  # Greedy k-center under cosine picks as it would on the normalised rows.
  picks = kcenter_greedy(x, 15, metric="cosine", block=BLOCK)
  np.testing.assert_array_equal(
      picks, kcenter_greedy(ref.normalize(x).astype(np.float32), 15,
                            metric="cosine", block=BLOCK))
  selected = np.zeros(120, bool)
  selected[:5] = True
  picks = kcenter_greedy(x, 10, selected=selected, metric="cosine",
                         block=BLOCK)
  dist = cosine_distances(x, x[selected]).min(axis=1)
  dist[selected] = -np.inf
  assert dist[picks[0]] >= dist.max() - 1e-6


def test_min_distance_empty_centers_is_inf():
  got = np.asarray(min_distance(_gaussian(11, 4, 0), np.zeros((0, 4))))
  assert got.shape == (11,) and np.isposinf(got).all()
  assert covering_radius(_gaussian(11, 4, 0), np.zeros((0, 4))) == np.inf


def test_covering_radius_is_max_min_distance():
  x, centers = _gaussian(77, 6, 6), _gaussian(9, 6, 7)
  np.testing.assert_allclose(covering_radius(x, centers, block=BLOCK),
                             ref.min_distance(x, centers).max(), rtol=1e-5)


def test_bfloat16_storage_accumulates_in_float32():
  x, centers = _gaussian(40, 64, 8), _gaussian(12, 64, 9)
  xb, cb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(centers, jnp.bfloat16)
  got = np.asarray(min_distance(xb, cb, block=BLOCK))
  want = ref.min_distance(np.asarray(xb, np.float32), np.asarray(cb, np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  margins = np.asarray(top2_margin(cb, xb, block=BLOCK))
  np.testing.assert_allclose(
      margins, ref.top2_margin(np.asarray(cb, np.float32),
                               np.asarray(xb, np.float32)), atol=1e-3)


# Picks per pass: 1 is the textbook loop; more picks per pass must not change
# a single pick.
PASSES = [1, 4, 16]


@pytest.mark.parametrize("picks_per_pass", PASSES)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,d,k", [(1, 3, 1), (45, 5, 12), (203, 17, 30)])
def test_kcenter_matches_numpy_from_the_mean(metric, n, d, k, picks_per_pass):
  x = _gaussian(n, d, n)
  got = np.asarray(kcenter_greedy(x, k, metric=metric, block=BLOCK,
                                  picks_per_pass=picks_per_pass))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, ref.kcenter_greedy(x, k, metric=metric))


@pytest.mark.parametrize("picks_per_pass", PASSES)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kcenter_matches_numpy_with_selected(metric, picks_per_pass):
  x = _gaussian(150, 11, 10)
  selected = np.zeros(150, bool)
  selected[[0, 7, 99, 149]] = True
  got = np.asarray(kcenter_greedy(x, 25, selected=selected, metric=metric,
                                  block=BLOCK, picks_per_pass=picks_per_pass))
  np.testing.assert_array_equal(
      got, ref.kcenter_greedy(x, 25, selected, metric))
  assert not selected[got].any()


def test_kcenter_clustered_pool_same_picks_for_any_pass_size():
  # Tight clusters: a pick lowers its neighbours' distances, so speculative
  # picks get rejected and passes end early; the picks must not change.
  rng = np.random.default_rng(5)
  x = (np.repeat(rng.standard_normal((12, 6)), 40, axis=0) +
       0.05 * rng.standard_normal((480, 6))).astype(np.float32)
  picks = {p: np.asarray(kcenter_greedy(x, 60, block=BLOCK, picks_per_pass=p))
           for p in PASSES}
  np.testing.assert_array_equal(picks[1], ref.kcenter_greedy(x, 60))
  for p in PASSES[1:]:
    np.testing.assert_array_equal(picks[p], picks[1])


@pytest.mark.parametrize("picks_per_pass", PASSES)
def test_kcenter_exact_ties_go_to_smallest_index(picks_per_pass):
  # Integer points, each three times: distances tie exactly all the time.
  x = np.repeat(_integers(20, 3, 11, high=1), 3, axis=0)
  selected = np.zeros(60, bool)
  selected[5] = True
  got = np.asarray(kcenter_greedy(x, 40, selected=selected, block=BLOCK,
                                  picks_per_pass=picks_per_pass))
  np.testing.assert_array_equal(got, ref.kcenter_greedy(x, 40, selected))
  # Once every distinct point is covered, only exact duplicates (distance 0)
  # remain, and they come out in index order.
  covered = len(np.unique(x, axis=0)) - 1
  assert (np.diff(got[covered:]) > 0).all()


def test_kcenter_takes_every_row_when_k_is_all():
  x = _gaussian(23, 4, 12)
  got = np.asarray(kcenter_greedy(x, 23, block=BLOCK))
  assert sorted(got.tolist()) == list(range(23))


@pytest.mark.parametrize("q,n,d", [(1, 2, 3), (13, 57, 7), (40, 300, 33)])
def test_top2_margin_matches_numpy(q, n, d):
  queries, keys = _gaussian(q, d, 13), _gaussian(n, d, 14)
  got = np.asarray(top2_margin(queries, keys, block=BLOCK))
  assert got.shape == (q,) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref.top2_margin(queries, keys), atol=2e-5)


def test_top2_margin_mask_ties_and_too_few_keys():
  queries, keys = _integers(12, 4, 15), _integers(40, 4, 16)
  mask = np.random.default_rng(0).random(40) < 0.6
  got = np.asarray(top2_margin(queries, keys, key_mask=mask, block=BLOCK))
  np.testing.assert_array_equal(
      got, ref.top2_margin(queries, keys, mask).astype(np.float32))
  # Duplicated best key: margin exactly 0.
  dup = np.concatenate([keys, keys[:1]])
  assert np.asarray(top2_margin(keys[:1], dup, block=BLOCK))[0] == 0
  one = np.zeros(40, bool)
  one[3] = True
  assert np.isposinf(np.asarray(top2_margin(queries, keys, key_mask=one))).all()
  assert np.isposinf(np.asarray(top2_margin(queries, keys[:1]))).all()


# ---------------------------------------------------------------- properties


def _arrays(n, d):
  return hnp.arrays(np.float32, (n, d), elements=st.floats(
      -4, 4, width=32, allow_nan=False))


@st.composite
def _pools(draw, dim=None):
  n = draw(st.integers(1, 70))
  return draw(_arrays(n, draw(st.integers(1, 9)) if dim is None else dim))


@hypothesis.given(_pools(), st.data())
def test_kcenter_picks_are_distinct_and_maximal(x, data):
  n = len(x)
  selected = np.asarray(data.draw(st.lists(st.booleans(), min_size=n,
                                           max_size=n)), bool)
  if selected.all():
    selected[0] = False
  k = data.draw(st.integers(1, int((~selected).sum())))
  picks = np.asarray(kcenter_greedy(x, k, selected=selected, block=BLOCK))
  assert len(set(picks.tolist())) == k and not selected[picks].any()
  x64 = x.astype(np.float64)
  # Distances come from ||x||^2 + ||c||^2 - 2<x, c> in float32: compare
  # squared distances with a tolerance of a few float32 ulps of the norms.
  tolerance = 4e-6 * (1 + (x64 ** 2).sum(axis=1).max())
  centers = list(np.flatnonzero(selected))
  for j in picks:
    if centers:  # Each pick is the farthest row left, up to rounding.
      dist = ref.min_distance(x64, x64[centers]) ** 2
      dist[centers] = -np.inf
      assert dist[j] >= dist.max() - tolerance
    centers.append(j)


@hypothesis.given(st.integers(1, 9), st.data())
def test_top2_margins_are_nonnegative(dim, data):
  queries, keys = data.draw(_pools(dim)), data.draw(_pools(dim))
  got = np.asarray(top2_margin(queries, keys, block=BLOCK))
  assert (got >= 0).all()
  if len(keys) < 2:
    assert np.isposinf(got).all()


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_rejected(bad):
  x = _gaussian(10, 3, 0)
  x[4, 1] = bad
  with pytest.raises(ValueError, match="NaN or inf .* first at row 4"):
    min_distance(x, _gaussian(2, 3, 1))
  with pytest.raises(ValueError, match="centers has NaN or inf"):
    min_distance(_gaussian(2, 3, 1), x)
  with pytest.raises(ValueError, match="NaN or inf"):
    kcenter_greedy(x, 2)
  with pytest.raises(ValueError, match="keys has NaN or inf"):
    top2_margin(_gaussian(2, 3, 1), x)


def test_shape_dtype_and_argument_errors():
  x = _gaussian(10, 3, 0)
  with pytest.raises(ValueError, match="dimension 4, the pool has 3"):
    min_distance(x, _gaussian(2, 4, 1))
  with pytest.raises(ValueError, match="must be 2-D"):
    min_distance(x[0], x)
  with pytest.raises(TypeError, match="floating-point"):
    min_distance(x.astype(np.int32), x)
  with pytest.raises(ValueError, match="Unknown metric 'manhattan'"):
    min_distance(x, x, metric="manhattan")
  with pytest.raises(ValueError, match="k must be a non-negative integer, "
                     "got True"):
    kcenter_greedy(x, True)
  with pytest.raises(ValueError, match="k=11 is larger than the 10"):
    kcenter_greedy(x, 11)
  selected = np.zeros(10, bool)
  selected[:4] = True
  with pytest.raises(ValueError, match="k=7 is larger than the 6 unselected"):
    kcenter_greedy(x, 7, selected=selected)
  with pytest.raises(ValueError, match=r"selected must have shape \(10,\)"):
    kcenter_greedy(x, 2, selected=selected[:5])
  with pytest.raises(TypeError, match="selected must be a bool array"):
    kcenter_greedy(x, 2, selected=selected.astype(int))
  with pytest.raises(ValueError, match="queries have dimension 2, keys have 3"):
    top2_margin(_gaussian(2, 2, 1), x)
  with pytest.raises(ValueError, match="block must be an integer >= 8"):
    min_distance(x, x, block=4)
  with pytest.raises(ValueError, match="picks_per_pass must be a positive"):
    kcenter_greedy(x, 2, picks_per_pass=0)


# --------------------------------------------------------------------------
# Precision: float32 products must not run at TF32 (NVIDIA GPUs) or one
# bf16 pass (TPUs). Only a GPU/TPU shows wrong picks; the lowered program
# shows the request on any backend.

_DOT_GENERAL = re.compile(r"stablehlo\.dot_general.*")


def _low_precision_f32_products(hlo_text):
  """The dot_general lines of `hlo_text` with float32 operands that do not
  ask for full precision on both operands."""
  bad = []
  for line in _DOT_GENERAL.findall(hlo_text):
    operands = re.search(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)", line)
    assert operands, f"cannot read the operand types of: {line}"
    if not all(t.endswith("xf32>") or t == "tensor<f32>"
               for t in operands.groups()):
      continue
    if "precision = [HIGHEST, HIGHEST]" not in line:
      bad.append(line.strip())
  return bad


def test_low_precision_f32_products_are_found():
  x = jnp.ones((4, 3), jnp.float32)
  default = jax.jit(lambda a: a @ a.T).lower(x).as_text()
  highest = jax.jit(lambda a: jnp.dot(
      a, a.T, precision=jax.lax.Precision.HIGHEST)).lower(x).as_text()
  bf16 = jax.jit(lambda a: a @ a.T).lower(x.astype(jnp.bfloat16)).as_text()
  assert len(_low_precision_f32_products(default)) == 1
  assert not _low_precision_f32_products(highest)
  assert not _low_precision_f32_products(bf16)


# Jitted acquisition functions without products (copies, masks, elementwise).
_NO_PRODUCTS = {
    "kernels._gather", "kernels._replicate", "kernels._masked",
    "kernels._margins", "layout._write_chunk", "layout._zeros",
    "layout._relayout", "layout._row_stats", "strategies._masked_max",
    "strategies._minimum", "strategies._add"}


def _lowered(fn, *args, **kwargs):
  """The StableHLO text of jitted `fn` on these arguments (not compiled)."""
  return fn.lower(*args, **kwargs).as_text()


def _lowered_kernels():
  """{name: lowered text} of each kernel with products, on a float32 pool."""
  pool = layout_lib.shard_rows(_gaussian(40, 6, 0), block=BLOCK)
  shape, mesh = pool.layout.shape, pool.layout.mesh
  put = lambda v: sharding.put_global(v, sharding.replicated(mesh))
  blocked = np.ones(shape.num_blocks * shape.rows_per_block).reshape(
      shape.num_blocks, -1)
  mask = sharding.put_global(blocked.astype(bool),
                             sharding.row_sharding(mesh))
  dist = sharding.put_global(blocked.astype(np.float32),
                             sharding.row_sharding(mesh))
  small = kernels.host_operand(_gaussian(5, 6, 1), pool, block=BLOCK,
                               name="c", pool_has="", normalize=False)
  rows = (pool.rows, pool.scale, pool.sq_norms, pool.num_rows)
  key = jax.random.PRNGKey(0)
  lower = {
      "kernels._min_distance_kernel": lambda m: _lowered(kernels._min_distance_kernel,
          pool.rows, pool.scale, pool.num_rows, small.values, small.count,
          shape=shape, metric=m, center_chunk=small.chunk),
      "kernels._greedy_kernel": lambda m: [_lowered(kernels._greedy_kernel,
          *rows, dist, put(np.int32(4)), shape=shape, metric=m, capacity=4,
          first_replaces=first, batch=batch)
          for first, batch in ((True, 1), (False, 4))],
      "kernels._distance_to_mean_kernel":
          lambda m: _lowered(kernels._distance_to_mean_kernel,
              pool.rows, pool.scale, pool.sq_norms, mask, shape=shape,
              metric=m),
      "kernels._top2_kernel": lambda m: _lowered(kernels._top2_kernel,
          small.values, small.count, pool.rows, pool.scale, mask,
          pool.num_rows, shape=shape, query_chunk=small.chunk),
      "kmeans._plusplus_kernel": lambda m: _lowered(kmeans_lib._plusplus_kernel,
          *rows, mask, key, shape=shape, k=3),
      "kmeans._lloyd_kernel": lambda m: _lowered(kmeans_lib._lloyd_kernel,
          *rows, mask, small.values[:3], put(np.float32(0)), shape=shape,
          max_iters=2),
      "badge._badge_kernel": lambda m: _lowered(badge_lib._badge_kernel,
          *rows, mask, small.values, small.count, put(np.float32(10)), key,
          shape=shape, class_chunk=small.chunk, k=3),
      "badge._distance_kernel": lambda m: _lowered(badge_lib._distance_kernel,
          *rows, small.values, small.count, put(np.float32(10)),
          put(np.int32(2)), shape=shape, class_chunk=small.chunk),
      "cold_start._top_k_kernel": lambda m: _lowered(cold_start._top_k_kernel,
          pool.rows, pool.scale, pool.num_rows, mask, small.values,
          shape=shape, k=2),
      "pallas_kernels.top2": lambda m: [_lowered(
          pallas_kernels.top2, small.values, small.values, dist[0, :8],
          mask[0, :8], block_rows=8, block_cols=8, form=form,
          interpret=True) for form in pallas_kernels.FORMS],
      "pallas_kernels.nearest": lambda m: [_lowered(
          pallas_kernels.nearest, small.values, dist[0, :8], small.values,
          dist[0, :8], block_rows=8, block_cols=8, form=form,
          interpret=True) for form in pallas_kernels.FORMS],
      "cold_start._optimize_kernel": lambda m: _lowered(cold_start._optimize_kernel,
          pool.rows, pool.scale, pool.num_rows, mask,
          put(np.ones((4, 2, 3), np.float32)), key, shape=shape, budget=4,
          iterations=2, chunk=4, keep_prob=1., lr=1e-3, tau=0.07,
          lambda_div=1., lambda_align=1.),
  }
  out = {}
  for name, kernel in lower.items():
    texts = [kernel(metric) for metric in kernels.METRICS]
    out[name] = "\n".join(t if isinstance(t, str) else "\n".join(t)
                          for t in texts)
  return out


def test_float32_products_ask_for_full_precision():
  """Each acquisition kernel with products, lowered for a float32 pool, asks
  for HIGHEST precision in every float32 product (bf16 pools: one bf16 pass
  accumulated in float32, which needs no request)."""
  modules = (kernels, layout_lib, kmeans_lib, badge_lib, strategies,
             cold_start, pallas_kernels, tile_math)
  jitted = {f"{module.__name__.rsplit('.', 1)[1]}.{name}"
            for module in modules for name, fn in vars(module).items()
            if callable(fn) and hasattr(fn, "lower") and hasattr(fn, "trace")}
  lowered = _lowered_kernels()
  assert jitted == set(lowered) | _NO_PRODUCTS, (
      "a jitted acquisition function is neither lowered here nor listed as "
      "product-free")
  bad = {name: _low_precision_f32_products(text)
         for name, text in lowered.items()}
  assert not {name: lines for name, lines in bad.items() if lines}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_laying_out_allocates_nothing_pool_sized(dtype):
  """The programs that lay a pool out (row statistics, re-layout, host
  pieces) need temporaries far below the pool's bytes: no second copy."""
  if dtype == "bfloat16" and jax.default_backend() == "cpu":
    pytest.skip("XLA's CPU backend computes bfloat16 in float32: any pass "
                "over a bfloat16 array gets a float32 copy there.")
  mesh = sharding.make_mesh()
  n, dim = 1 << 15, 128
  pool = layout_lib.pool_layout(n, mesh, 1024)
  rows = jax.ShapeDtypeStruct((pool.padded_rows, dim), dtype,
                              sharding=sharding.row_sharding(mesh))
  count = jax.ShapeDtypeStruct((), jnp.int32,
                               sharding=sharding.replicated(mesh))
  pool_bytes = rows.size * jnp.dtype(dtype).itemsize // mesh.size
  piece = jax.ShapeDtypeStruct((1024, dim), dtype,
                               sharding=sharding.replicated(mesh))
  programs = {
      "_row_stats": layout_lib._row_stats.lower(
          rows, count, shape=pool.shape, normalize=True),
      "_relayout": layout_lib._relayout.lower(
          jax.ShapeDtypeStruct((n, dim), jnp.float32), count,
          shape=pool.shape, dtype=jnp.dtype(dtype)),
      "_write_chunk": layout_lib._write_chunk.lower(
          rows, piece, count, shape=pool.shape, dtype=jnp.dtype(dtype))}
  for name, lowered in programs.items():
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    # Per-row vectors (scale, norms, indices: 16 bytes a row) are expected.
    assert temp < pool_bytes / 4, (name, temp, pool_bytes)


def test_auto_tiling_per_backend_and_memory():
  gib = 1 << 30
  # CPU: today's tuned values, whatever the pool or memory.
  for n in (10, 10**6, 10**8):
    assert layout_lib.auto_tiling("cpu", None, n, 768, "float32") == (
        layout_lib.CPU_TILING)
  assert layout_lib.CPU_TILING == layout_lib.Tiling(1024, 16)
  # Accelerators with room: 8192-wide tiles, 64 picks per pass.
  for backend, memory in (("gpu", 80 * gib), ("tpu", 16 * gib),
                          ("gpu", None)):
    assert layout_lib.auto_tiling(backend, memory, 12_800_000, 768,
                                  "bfloat16") == layout_lib.Tiling(8192, 64)
  # A tile's working set (3 float32 tiles + 2 row blocks) within 1/16 of
  # the memory: 8192 needs ~0.8 GB, 4096 ~0.2 GB; never below 1024.
  tiling = lambda memory: layout_lib.auto_tiling(
      "gpu", memory, 10**7, 768, "float32").block
  assert tiling(16 * gib) == 8192
  assert tiling(8 * gib) == 4096
  assert tiling(gib // 8) == 1024
  # A pool smaller than a tile: the tile shrinks to it.
  assert layout_lib.auto_tiling("gpu", 80 * gib, 3000, 768,
                                "bfloat16").block == 4096


def test_auto_block_on_this_backend():
  x = _gaussian(300, 8, 0)
  pool = layout_lib.shard_rows(x)
  want = layout_lib.device_tiling(pool.layout.mesh, 300, 8, np.float32)
  assert kernels.pool_block("auto", pool) == want.block
  assert kernels.resolve_picks_per_pass("auto", pool) == want.picks_per_pass
  assert kernels.pool_block(64, pool) == 64
  with pytest.raises(ValueError, match="block must be"):
    layout_lib.check_block("big")
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(
        kcenter_greedy(x, 20), kcenter_greedy(x, 20, block=1024,
                                              picks_per_pass=16))


@pytest.mark.parametrize("batch", [1, 16])
def test_greedy_pass_copies_no_pool(batch):
  """A greedy pass reads the pool where it lies: its runs of blocks are not
  copied out as operands of the branches that skip padding (XLA:CPU may
  still materialise the largest run, half the pool, for its product)."""
  mesh = sharding.make_mesh()
  pool = layout_lib.pool_layout(1 << 14, mesh, 1024)
  row_spec = sharding.row_sharding(mesh)
  blocked = lambda dtype: jax.ShapeDtypeStruct(
      (pool.num_blocks, pool.rows_per_block), dtype, sharding=row_spec)
  scalar = jax.ShapeDtypeStruct((), jnp.int32,
                                sharding=sharding.replicated(mesh))
  rows = jax.ShapeDtypeStruct((pool.padded_rows, 64), jnp.float32,
                              sharding=row_spec)
  compiled = kernels._greedy_kernel.lower(
      rows, blocked(jnp.float32), blocked(jnp.float32), scalar,
      blocked(jnp.float32), scalar, shape=pool.shape, metric="euclidean",
      capacity=64, first_replaces=False, batch=batch).compile()
  pool_bytes = rows.size * 4 // mesh.size
  assert compiled.memory_analysis().temp_size_in_bytes < 0.75 * pool_bytes
