"""Every kernel and strategy gives bit-identical results on 1, 3 and 8 devices,
on every (data, fsdp) mesh shape, and for pools handed over as laid-out
`jax.Array`s.

With 8 (forced host) devices the meshes are compared in-process; on a
single-device run the 8-device results come from a subprocess.
"""
import jax
import numpy as np
import pytest

import device_counts
from mmal_jax import sharding
from mmal_jax.acquisition import build_min_distance_cache
from mmal_jax.acquisition import kcenter_greedy
from mmal_jax.acquisition import layout
from mmal_jax.acquisition import min_distance
from mmal_jax.acquisition import STRATEGIES
from mmal_jax.acquisition import top2_margin
from mmal_jax.acquisition import strategies

BLOCK = 16


def _data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((333, 24)).astype(np.float32)
  # Duplicates make exact ties that only identical arithmetic keeps tied.
  x[100:110] = x[0]
  centers = rng.standard_normal((40, 24)).astype(np.float32)
  selected = np.zeros(333, bool)
  selected[::37] = True
  embeddings = {"image": x, "text": rng.standard_normal((250, 24))}
  annotated = {"image": selected, "text": np.zeros(250, bool)}
  annotated["text"][:9] = True
  return x, centers, selected, embeddings, annotated


def fingerprint(num_devices: int = 0, *, data: int = -1, fsdp: int = 1
                ) -> dict:
  """All kernel and strategy outputs on fixed data, over the first
  `num_devices` devices (0: all) as a `data x fsdp` mesh."""
  devices = jax.devices()[:num_devices or None]
  mesh = sharding.make_mesh(devices, data=data, fsdp=fsdp)
  x, centers, selected, embeddings, annotated = _data()
  kw = dict(mesh=mesh, block=BLOCK)
  out = {
      "min_distance": min_distance(x, centers, **kw),
      "min_distance_cosine": min_distance(x, centers, metric="cosine", **kw),
      "kcenter": kcenter_greedy(x, 50, **kw),
      "kcenter_selected": kcenter_greedy(x, 50, selected=selected, **kw),
      "top2_margin": top2_margin(centers, x, key_mask=~selected, **kw),
  }
  cache = build_min_distance_cache(embeddings, annotated, **kw)
  out.update({f"cache_{m}": d for m, d in cache.items()})
  for name, fn in sorted(STRATEGIES.items()):
    out[name] = fn(embeddings, annotated, budget=20, seed=0, **kw)
  return {k: np.asarray(v).tolist() for k, v in out.items()}


def _assert_same(got: dict, want: dict, what: str):
  for key, value in want.items():
    assert got[key] == value, f"{key} differs {what}"


def test_results_do_not_depend_on_the_device_count():
  device_counts.assert_same_on_every_device_count(
      "test_device_independence", fingerprint)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices "
                    "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")
def test_acquisition_identical_on_fsdp_mesh_shapes():
  want = fingerprint(8, data=8, fsdp=1)
  for data, fsdp in ((1, 8), (2, 4)):
    _assert_same(fingerprint(8, data=data, fsdp=fsdp), want,
                 f"between the 8x1 and the {data}x{fsdp} mesh")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices "
                    "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")
@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_laid_out_jax_arrays_are_used_in_place(data, fsdp):
  # What a streamed embedding pass hands over: (padded_rows, D) row-sharded
  # arrays whose first N_m rows are the items.
  mesh = sharding.make_mesh(data=data, fsdp=fsdp)
  _, _, _, embeddings, annotated = _data()
  laid_out = {}
  for m, z in embeddings.items():
    pool = layout.pool_layout(len(z), mesh, BLOCK)
    padded = np.zeros((pool.padded_rows, z.shape[1]), np.float32)
    padded[:len(z)] = z
    laid_out[m] = sharding.put_global(padded, sharding.row_sharding(mesh))
  rnd = strategies._lay_out(laid_out, annotated, mesh=mesh, block=BLOCK)
  raw = strategies._lay_out(laid_out, annotated, mesh=mesh, block=BLOCK,
                            distances_on="raw")
  for m in embeddings:
    assert rnd.pools[m].rows is laid_out[m]
    assert rnd.pools[m].layout.num_rows == len(embeddings[m])
    # Raw-output distances view the same rows unscaled: no copy either.
    assert raw.coverage[m].rows is laid_out[m]
    scale = np.asarray(raw.coverage[m].scale).reshape(-1)
    assert (scale[:len(embeddings[m])] == 1).all() and not scale[
        len(embeddings[m]):].any()
  kw = dict(mesh=mesh, block=BLOCK)
  for name, fn in sorted(STRATEGIES.items()):
    assert (fn(laid_out, annotated, budget=20, seed=0, **kw) ==
            fn(embeddings, annotated, budget=20, seed=0, **kw)), name
  for m, d in build_min_distance_cache(laid_out, annotated, **kw).items():
    np.testing.assert_array_equal(
        d, build_min_distance_cache(embeddings, annotated, **kw)[m])
  # Other shapes, shardings or dtypes are re-laid out on the devices.
  unpadded = {m: jax.device_put(np.asarray(z, np.float32))
              for m, z in embeddings.items()}
  assert (STRATEGIES["mmal"](unpadded, annotated, budget=20, seed=0, **kw) ==
          STRATEGIES["mmal"](embeddings, annotated, budget=20, seed=0, **kw))
  bad = laid_out["image"].at[len(embeddings["image"]) + 1, 3].set(np.nan)
  with pytest.raises(ValueError, match="padding rows"):
    layout.shard_rows(bad, mesh, block=BLOCK,
                      num_rows=len(embeddings["image"]))
