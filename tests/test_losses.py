"""Losses vs numpy references, finite differences, and across devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from mmal_jax import losses
from mmal_jax import sharding

BATCH, DIM = 16, 8  # BATCH divisible by 1, 2 and 8 devices.


def unit_rows(seed, n=BATCH, d=DIM, dtype=np.float32):
  x = np.random.default_rng(seed).normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def log_sigmoid(x):
  return -np.logaddexp(0., -x)


def log_softmax(x, axis):
  return x - np.logaddexp.reduce(x, axis=axis, keepdims=True)


def siglip_reference(zimg, ztxt, t, b):
  logits = t * zimg.astype(np.float64) @ ztxt.T.astype(np.float64) + b
  labels = 2 * np.eye(len(zimg)) - 1
  return -np.sum(log_sigmoid(labels * logits)) / len(zimg)


def clip_reference(zimg, ztxt, t):
  logits = t * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
  i2t = -np.diag(log_softmax(logits, axis=1)).mean()
  t2i = -np.diag(log_softmax(logits, axis=0)).mean()
  return (i2t + t2i) / 2


def test_siglip_matches_numpy():
  zimg, ztxt = unit_rows(0), unit_rows(1)
  for t, b in [(10., -10.), (1., 0.), (30., 2.)]:
    got = losses.siglip_loss(zimg, ztxt, jnp.array([t]), jnp.array([b]))
    np.testing.assert_allclose(got, siglip_reference(zimg, ztxt, t, b),
                               rtol=1e-5)


def test_clip_matches_numpy():
  zimg, ztxt = unit_rows(2), unit_rows(3)
  for t in (1., 1 / 0.07, 100.):
    np.testing.assert_allclose(losses.clip_loss(zimg, ztxt, t),
                               clip_reference(zimg, ztxt, t), rtol=1e-5)


def test_bfloat16_embeddings_are_promoted():
  zimg, ztxt = unit_rows(4), unit_rows(5)
  got = losses.siglip_loss(jnp.asarray(zimg, jnp.bfloat16),
                           jnp.asarray(ztxt, jnp.bfloat16), 10., -10.)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, siglip_reference(zimg, ztxt, 10., -10.),
                             rtol=2e-2)


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    zimg = jnp.asarray(unit_rows(6, n=6, dtype=np.float64))
    ztxt = jnp.asarray(unit_rows(7, n=6, dtype=np.float64))
    t, b = jnp.array([5.], jnp.float64), jnp.array([-2.], jnp.float64)
    assert losses.siglip_loss(zimg, ztxt, t, b).dtype == jnp.float64
    for loss, args in [(losses.siglip_loss, (zimg, ztxt, t, b)),
                       (losses.clip_loss, (zimg, ztxt, t))]:
      check_grads(loss, args, order=1, modes=["rev"], eps=1e-6, atol=1e-7,
                  rtol=1e-7)


@pytest.mark.parametrize("num_devices", [
    pytest.param(n, marks=pytest.mark.skipif(
        jax.device_count() < n, reason=f"needs {n} devices"))
    for n in (1, 2, 8)])
def test_sharded_losses_equal_single_device(num_devices):
  check_sharded_losses(sharding.make_mesh(jax.devices()[:num_devices]))


@pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 devices")
@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4), (8, 1)])
def test_sharded_losses_on_fsdp_meshes(data, fsdp):
  """Rows over both axes of a 2-D mesh: still the global-batch loss."""
  check_sharded_losses(sharding.make_mesh(data=data, fsdp=fsdp))


def check_sharded_losses(mesh):
  rows = sharding.row_spec()
  zimg, ztxt = unit_rows(10), unit_rows(11)
  t, b = jnp.array([7.]), jnp.array([-3.])

  def sharded(loss, *, n_scalars, **kw):
    fn = functools.partial(loss, axis_name=sharding.ROW_AXES, **kw)
    return jax.jit(jax.shard_map(fn, mesh=mesh, out_specs=P(),
                                 in_specs=(rows, rows) + (P(),) * n_scalars))

  want = losses.siglip_loss(zimg, ztxt, t, b)
  want_grads = jax.grad(losses.siglip_loss, (0, 1, 2, 3))(zimg, ztxt, t, b)
  for method in ("all_gather", "ring"):
    fn = sharded(losses.siglip_loss, n_scalars=2, method=method)
    np.testing.assert_allclose(fn(zimg, ztxt, t, b), want, rtol=1e-5)
    grads = jax.grad(fn, (0, 1, 2, 3))(zimg, ztxt, t, b)
    for got, ref in zip(grads, want_grads):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)

  fn = sharded(losses.clip_loss, n_scalars=1)
  np.testing.assert_allclose(fn(zimg, ztxt, t), losses.clip_loss(zimg, ztxt, t),
                             rtol=1e-5)
  for got, ref in zip(jax.grad(fn, (0, 1, 2))(zimg, ztxt, t),
                      jax.grad(losses.clip_loss, (0, 1, 2))(zimg, ztxt, t)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_padded_rows_take_part_in_no_pair():
  """`valid` False rows (a batch padded to the device count): the loss and
  gradients are those of the real rows alone, sharded over every device and
  on one, and the padded rows' gradients are zero."""
  mesh, rows = sharding.make_mesh(), sharding.row_spec()
  zimg, ztxt = unit_rows(10), unit_rows(11)
  t, b = jnp.array([7.]), jnp.array([-3.])
  valid = np.ones(BATCH, bool)
  valid[[3, 9, 14, 15]] = False
  real = np.flatnonzero(valid)
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))
  for loss, scalars, kw in [(losses.siglip_loss, (t, b), dict(method="ring")),
                            (losses.siglip_loss, (t, b), {}),
                            (losses.clip_loss, (t,), {})]:
    want, want_grads = value_and_grad(loss)(zimg[real], ztxt[real], *scalars)
    sharded = jax.shard_map(
        functools.partial(loss, axis_name=sharding.ROW_AXES, **kw), mesh=mesh,
        out_specs=P(), in_specs=(rows, rows) + (P(),) * len(scalars) + (rows,))
    for fn in (sharded, loss):
      got, grads = value_and_grad(fn)(zimg, ztxt, *scalars, valid)
      np.testing.assert_allclose(got, want, rtol=1e-5)
      for grad, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(grad)[real], ref, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.)


def clustered(seed, n_per=20, centres=3, dim=DIM, spread=0.05):
  rng = np.random.default_rng(seed)
  mus = rng.normal(size=(centres, dim)) * 3
  x = np.concatenate([mu + spread * rng.normal(size=(n_per, dim))
                      for mu in mus])
  return x.astype(np.float32), np.repeat(np.arange(centres), n_per)


def test_prototype_concentration_matches_numpy():
  x, assignments = clustered(1, n_per=5)
  assignments[-1] = 3  # a singleton cluster
  prototypes = np.stack([x[assignments == c].mean(0) for c in range(4)])
  phi = losses.prototype_concentration(x, prototypes, assignments, alpha=10.)
  want = []
  for c in range(3):
    members = x[assignments == c]
    dist = np.linalg.norm(members - prototypes[c], axis=1)
    want.append(dist.mean() / np.log(len(members) + 10.))
  want.append(max(want))  # singleton: largest measured phi (PCL)
  np.testing.assert_allclose(phi, want, rtol=1e-5)


def test_prototypical_and_mmcsal_losses_match_numpy():
  rng = np.random.default_rng(3)
  z1, z2 = unit_rows(12, n=10), unit_rows(13, n=10)
  protos = [rng.normal(size=(4, DIM)).astype(np.float32) for _ in range(2)]
  assign = [rng.integers(0, 4, size=10) for _ in range(2)]
  phis = [rng.uniform(0.1, 0.5, size=4).astype(np.float32) for _ in range(2)]

  def proto_reference(z, p, a, phi):
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    logits = (z.astype(np.float64) @ p.T) / phi
    return -log_softmax(logits, axis=1)[np.arange(len(z)), a].mean()

  got = losses.prototypical_loss(z1, protos[0], assign[0], phis[0])
  np.testing.assert_allclose(got, proto_reference(z1, protos[0], assign[0],
                                                  phis[0]), rtol=1e-5)
  uni = np.mean([proto_reference(z, p, a, phi) for z, p, a, phi in
                 zip((z1, z2), protos, assign, phis)])
  want = 0.5 * clip_reference(z1, z2, 1 / 0.07) + 0.5 * uni
  np.testing.assert_allclose(
      losses.mmcsal_loss(z1, z2, protos, assign, phis), want, rtol=1e-5)
  check_grads(lambda z: losses.prototypical_loss(z, protos[0], assign[0],
                                                 phis[0]),
              (z1,), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


def test_mmcsal_loss_ignores_padded_rows():
  """MMCSAL's Stage-1 batches padded to the device count: the loss with
  `valid` is the loss of the real rows."""
  rng = np.random.default_rng(4)
  z1, z2 = unit_rows(14, n=10), unit_rows(15, n=10)
  protos = [rng.normal(size=(4, DIM)).astype(np.float32) for _ in range(2)]
  assign = [rng.integers(0, 4, size=10) for _ in range(2)]
  phis = [rng.uniform(0.1, 0.5, size=4).astype(np.float32) for _ in range(2)]
  valid = np.arange(10) < 7
  np.testing.assert_allclose(
      losses.mmcsal_loss(z1, z2, protos, assign, phis, valid=valid),
      losses.mmcsal_loss(z1[:7], z2[:7], protos, [a[:7] for a in assign],
                         phis), rtol=1e-5)
