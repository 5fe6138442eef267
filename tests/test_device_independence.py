"""Every kernel and strategy gives bit-identical results on 1, 3 and 8 devices.

With 8 (forced host) devices the meshes are compared in-process; on a
single-device run the 8-device results come from a subprocess.
"""
import jax
import numpy as np

import device_counts
from mmal_jax import sharding
from mmal_jax.acquisition import build_min_distance_cache
from mmal_jax.acquisition import kcenter_greedy
from mmal_jax.acquisition import min_distance
from mmal_jax.acquisition import STRATEGIES
from mmal_jax.acquisition import top2_margin

BLOCK = 16


def fingerprint(num_devices: int) -> dict:
  """All kernel and strategy outputs on fixed data, over `num_devices` devices."""
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  rng = np.random.default_rng(0)
  x = rng.standard_normal((333, 24)).astype(np.float32)
  # Duplicates make exact ties that only identical arithmetic keeps tied.
  x[100:110] = x[0]
  centers = rng.standard_normal((40, 24)).astype(np.float32)
  selected = np.zeros(333, bool)
  selected[::37] = True
  kw = dict(mesh=mesh, block=BLOCK)
  out = {
      "min_distance": min_distance(x, centers, **kw),
      "min_distance_cosine": min_distance(x, centers, metric="cosine", **kw),
      "kcenter": kcenter_greedy(x, 50, **kw),
      "kcenter_selected": kcenter_greedy(x, 50, selected=selected, **kw),
      "top2_margin": top2_margin(centers, x, key_mask=~selected, **kw),
  }
  embeddings = {"image": x, "text": rng.standard_normal((250, 24))}
  annotated = {"image": selected, "text": np.zeros(250, bool)}
  annotated["text"][:9] = True
  cache = build_min_distance_cache(embeddings, annotated, **kw)
  out.update({f"cache_{m}": d for m, d in cache.items()})
  for name, fn in STRATEGIES.items():
    out[name] = fn(embeddings, annotated, budget=20, seed=0, **kw)
  return {k: np.asarray(v).tolist() for k, v in out.items()}


def test_results_do_not_depend_on_the_device_count():
  device_counts.assert_same_on_every_device_count("test_device_independence", fingerprint)
