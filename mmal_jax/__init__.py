"""mmal_jax: multimodal active learning with unaligned data, in JAX/Flax."""
