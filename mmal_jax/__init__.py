"""mmal_jax: multimodal active learning with unaligned data, in JAX/Flax."""
# The filesystem layer first: it decides how epath (orbax) reaches gs://.
from mmal_jax import fs  # noqa: F401
