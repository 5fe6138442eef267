"""Image and text towers with a shared embedding space (SigLIP, LiT, CLIP).

Parameters, as in big_vision's `proj/image_text/two_towers.py`: `img/...`,
`txt/...`, `t` (1,) holding log(temperature) and, with `bias_init`, `b` (1,).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from mmal_jax.models import feature_towers
from mmal_jax.models import text_transformer
from mmal_jax.models import vit

TOWERS = {
    "vit": vit.Model,
    "text_transformer": text_transformer.Model,
    "feature_tower": feature_towers.Model,
    # big_vision's module path, so that its model configs work unchanged.
    "proj.image_text.text_transformer": text_transformer.Model,
}


class Model(nn.Module):
  """Two towers. Call `(image, text, *, train=False) -> (zimg, ztxt, out)`.

  `image` is (B, H, W, C) for "vit" or (B, F) features for "feature_tower";
  `text` is (B, L) tokens for "text_transformer" or (B, F) features. Either may
  be None: its embedding is then None and its tower does not run (embed one
  modality alone). zimg, ztxt are L2-normalised (B, D). `out` holds `t`
  (= exp of the parameter), `t/parameter`, `b` if `bias_init` is set, and every
  tower output under `img/...`, `txt/...` (e.g. `img/pre_logits`; `img/raw`:
  the embedding before L2 normalisation).
  `out_dim` is one int or (image_dim, text_dim); None for a side = no head.
  """
  image: Optional[Mapping[str, Any]] = None
  text: Optional[Mapping[str, Any]] = None
  image_model: str = "vit"
  text_model: str = "text_transformer"
  out_dim: Union[None, int, Tuple[Optional[int], Optional[int]]] = 128
  temperature_init: float = 1.0
  bias_init: Optional[float] = None

  @nn.compact
  def __call__(self, image, text=None, *, train=False):
    out_dims = self.out_dim
    if out_dims is None or isinstance(out_dims, int):
      out_dims = (out_dims, out_dims)
    out = {}
    zimg = self._embed(image, "img", self.image_model, self.image, out_dims[0],
                       train, out)
    ztxt = self._embed(text, "txt", self.text_model, self.text, out_dims[1],
                       train, out)

    log_t_init = jnp.log(self.temperature_init)
    t = self.param("t", lambda _, shape: jnp.full(shape, log_t_init,
                                                  jnp.float32), (1,))
    out["t/parameter"] = t
    out["t"] = jnp.exp(t)
    if self.bias_init is not None:
      out["b"] = self.param(
          "b", lambda _, shape: jnp.full(shape, self.bias_init, jnp.float32),
          (1,))
    return zimg, ztxt, out

  def _embed(self, x, name, model_name, config, out_dim, train, out):
    """Runs one tower and L2-normalises its output; None in, None out."""
    if x is None:
      return None
    if model_name not in TOWERS:
      raise ValueError(f"Unknown tower {model_name!r}; known: {sorted(TOWERS)}")
    tower = TOWERS[model_name](**{"num_classes": out_dim, **(config or {})},
                               name=name)
    z, tower_out = tower(x, train=train)
    for key, value in tower_out.items():
      out[f"{name}/{key}"] = value
    out[f"{name}/raw"] = z  # The tower's output before normalisation.
    norm = out[f"{name}/norm"] = jnp.linalg.norm(z, axis=-1, keepdims=True)
    z = out[f"{name}/normalized"] = z / (norm + 1e-8)
    return z
