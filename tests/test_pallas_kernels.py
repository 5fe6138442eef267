"""The Pallas tile reductions, in interpret mode, against the references of
the XLA kernels (tests/acquisition_reference.py), in both forms; and their
lowerings for the devices CI does not have (CUDA through Triton, TPU through
Mosaic), read for what they ask of the hardware."""
import functools
import re

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


def _margins(queries, keys, mask, form="grid"):
  top1, top2 = pallas_kernels.top2(
      jnp.asarray(queries), jnp.asarray(keys),
      jnp.ones(len(keys), jnp.float32), jnp.asarray(mask), block_rows=16,
      block_cols=32, form=form, interpret=True)
  top1, top2 = np.asarray(top1), np.asarray(top2)
  return np.where(top2 == -np.inf, np.inf, top1 - top2)


FORMS = pytest.mark.parametrize("form", pallas_kernels.FORMS)


@_ONE_DEVICE_PASS
@FORMS
@pytest.mark.parametrize("dim", [8, 24])
def test_top2_matches_reference(form, dim):
  # D = 24: the loop form sums three 8-wide feature slices.
  queries, keys = _gaussian(48, dim, 0), _gaussian(96, dim, 1)
  mask = np.random.default_rng(2).random(96) < 0.7
  np.testing.assert_allclose(_margins(queries, keys, mask, form),
                             ref.top2_margin(queries, keys, mask),
                             rtol=1e-5, atol=1e-5)


@_ONE_DEVICE_PASS
@FORMS
def test_top2_exact_ties_and_too_few_keys(form):
  queries, keys = _integers(32, 4, 3), _integers(64, 4, 4)
  mask = np.random.default_rng(5).random(64) < 0.6
  # Integer products are exact: bit equality on any backend.
  np.testing.assert_array_equal(
      _margins(queries, keys, mask, form),
      ref.top2_margin(queries, keys, mask).astype(np.float32))
  dup = np.concatenate([keys[:63], keys[:1]])  # The best key, twice.
  assert _margins(keys[:16], dup, np.ones(64, bool), form)[0] == 0
  one = np.zeros(64, bool)
  one[40] = True
  assert (_margins(queries, keys, one, form) == np.inf).all()


@_ONE_DEVICE_PASS
@FORMS
@pytest.mark.parametrize("integers", [False, True])
def test_nearest_center_matches_reference(form, integers):
  make = _integers if integers else _gaussian
  x, centers = make(64, 5, 6), make(64, 5, 7)
  valid = np.arange(64) < 41  # Padding centers past the real 41.
  bias = np.where(valid, np.einsum("cd,cd->c", centers, centers), np.inf)
  best, idx = pallas_kernels.nearest(
      jnp.asarray(x), jnp.full(64, 2., jnp.float32), jnp.asarray(centers),
      jnp.asarray(bias, jnp.float32), block_rows=16, block_cols=16,
      form=form, interpret=True)
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
      block_rows=16, block_cols=16, form=form, interpret=True)
  assert (np.asarray(idx) < 32).all()


@_ONE_DEVICE_PASS
@FORMS
def test_no_valid_center(form):
  best, _ = pallas_kernels.nearest(
      jnp.ones((16, 4)), jnp.ones(16), jnp.ones((16, 4)),
      jnp.full(16, jnp.inf), block_rows=16, block_cols=16, form=form,
      interpret=True)
  assert (np.asarray(best) == -np.inf).all()


@_ONE_DEVICE_PASS
def test_loop_form_pads_operands_below_the_smallest_tile():
  """The loop form's tiles are at least 16 rows (Triton's smallest product):
  8 queries / keys / points / centers are padded, and the padding neither
  answers nor wins."""
  x, centers = _integers(8, 16, 13), _integers(8, 16, 14)
  mask = np.arange(8) != 3
  np.testing.assert_array_equal(
      _margins(x, centers, mask, "loop"),
      ref.top2_margin(x, centers, mask).astype(np.float32))
  bias = np.einsum("cd,cd->c", centers, centers).astype(np.float32)
  best, idx = pallas_kernels.nearest(
      jnp.asarray(x), jnp.full(8, 2., jnp.float32), jnp.asarray(centers),
      jnp.asarray(bias), block_rows=8, block_cols=8, form="loop",
      interpret=True)
  assert best.shape == idx.shape == (8,)
  dist = np.linalg.norm(x - centers[np.asarray(idx)], axis=1)
  np.testing.assert_array_equal(
      dist, ref.min_distance(x, centers).astype(np.float32))


def test_plan_picks_the_form_and_tiles_per_backend():
  plan = pallas_kernels.plan
  assert plan("cpu", 64, 256, 8, 16, 32) == dict(
      form="grid", block_rows=16, block_cols=32, interpret=True)
  assert plan("tpu", 1 << 17, 1 << 17, 768, 8192, 8192) == dict(
      form="grid", block_rows=8192, block_cols=8192, interpret=False)
  for platform in ("gpu", "cuda", "rocm"):
    assert plan(platform, 1 << 17, 1 << 17, 768, 8192, 8192) == dict(
        form="loop", block_rows=128, block_cols=128, interpret=False)
  assert plan("gpu", 8, 32, 48, 8, 32)["block_rows"] == 16
  assert pallas_kernels.dim_chunk(768) == 64
  assert pallas_kernels.dim_chunk(48) == 16
  with pytest.raises(ValueError, match="multiple of 16.*D = 24.*impl='xla'"):
    plan("gpu", 64, 64, 24, 16, 16)
  with pytest.raises(ValueError, match="Unknown Pallas form"):
    pallas_kernels.top2(jnp.ones((16, 4)), jnp.ones((16, 4)), jnp.ones(16),
                        jnp.ones(16, bool), block_rows=16, block_cols=16,
                        form="warp", interpret=True)


# --------------------------------------------------------------------------
# Lowerings for the accelerators: what the device compiler is asked for.


_TARGET_KINDS = {"cuda": "NVIDIA H100 80GB HBM3", "tpu": "TPU v5 lite"}


def _device_lowering(capfd, monkeypatch, kernel, platform, dtype, **blocks):
  """(StableHLO text, kernel IR printed by Pallas) of `kernel` lowered for
  `platform` ("cuda": the loop form through Triton, for an H100; "tpu": the
  grid form through Mosaic, for a TPU v5e) at Q = N = 256, D = 128.
  Lowering runs on any host; compiling it needs the device."""
  monkeypatch.setattr(pallas_kernels.pl, "pallas_call", functools.partial(
      pallas_kernels.pl.pallas_call, debug=True))
  jax.clear_caches()  # A jaxpr traced without `debug` would be reused.
  rows = jax.ShapeDtypeStruct((256, 128), dtype)
  vec = jax.ShapeDtypeStruct((256,), jnp.float32)
  args = ((rows, rows, vec, jax.ShapeDtypeStruct((256,), jnp.bool_))
          if kernel is pallas_kernels.top2 else (rows, vec, rows, vec))
  # Triton (jax >= 0.11) and Mosaic read the target chip from the
  # (abstract) device at hand.
  device = jax.sharding.AbstractDevice(device_kind=_TARGET_KINDS[platform],
                                       num_cores=1, platform=platform)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=device)):
    lowered = kernel.trace(
        *args, form=pallas_kernels.form_for(platform), **blocks).lower(
            lowering_platforms=(platform,))
  return lowered.as_text(), capfd.readouterr().out


@_ONE_DEVICE_PASS
@pytest.mark.parametrize("kernel", ["top2", "nearest"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_lowering_for_cuda(capfd, monkeypatch, kernel, dtype):
  """The loop form lowers to one Triton call with a 1-D grid of 128-row
  tiles; its float32 products ask for IEEE float32 (Triton's default, left
  unprinted), never TF32 (bfloat16 operands ignore the request)."""
  hlo, ir = _device_lowering(capfd, monkeypatch,
                             getattr(pallas_kernels, kernel), "cuda",
                             jnp.dtype(dtype), block_rows=128, block_cols=128)
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", hlo)) == 1
  assert "grid_x = 2 : i32, grid_y = 1 : i32" in hlo
  dots = re.findall(r"tt\.dot .*", ir)
  assert len(dots) == 1 and "tensor<128x64x" in dots[0], dots
  if dtype == "float32":
    assert "xf32> * tensor<64x128xf32>" in dots[0]
    assert "inputPrecision" not in dots[0], dots[0]


@_ONE_DEVICE_PASS
@pytest.mark.parametrize("kernel", ["top2", "nearest"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mosaic_lowering_for_tpu(capfd, monkeypatch, kernel, dtype):
  """The grid form lowers to one Mosaic call whose float32 tile products
  ask for float32 contraction precision (not one bfloat16 pass)."""
  hlo, ir = _device_lowering(capfd, monkeypatch,
                             getattr(pallas_kernels, kernel), "tpu",
                             jnp.dtype(dtype), block_rows=128, block_cols=128)
  assert len(re.findall(r"custom_call @tpu_custom_call", hlo)) == 1
  matmuls = re.findall(r"tpu\.matmul .*", ir)
  assert len(matmuls) == 1, matmuls
  assert ("contract_precision<fp32>" in matmuls[0]) == (dtype == "float32")


def test_sharded_top2_margin_through_pallas():
  """`top2_margin(impl="pallas")`: the sharded path with the Pallas tile
  reduction gives the XLA path's margins (same tiles: the same bits on CPU).
  D = 16: on a GPU this compiles the Triton loop form, whose products need
  a multiple of 16."""
  queries, keys = _gaussian(37, 16, 8), _gaussian(203, 16, 9)
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
  x, centers = _gaussian(203, 16, 11), _gaussian(41, 16, 12)
  xla = kernels.min_distance(x, centers, metric=metric, block=16)
  pallas = kernels.min_distance(x, centers, metric=metric, block=16,
                                impl="pallas")
  np.testing.assert_allclose(pallas, ref.min_distance(x, centers, metric),
                             rtol=1e-5, atol=1e-5)
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(pallas, xla)
  empty = kernels.min_distance(x, centers[:0], block=16, impl="pallas")
  assert (empty == np.inf).all()
