"""Acquisition: sharded kernels (Algorithm 2, top-2 margins) and strategies."""
from mmal_jax.acquisition.kernels import covering_radius
from mmal_jax.acquisition.kernels import kcenter_greedy
from mmal_jax.acquisition.kernels import METRICS
from mmal_jax.acquisition.kernels import min_distance
from mmal_jax.acquisition.kernels import top2_margin
from mmal_jax.acquisition.strategies import build_min_distance_cache
from mmal_jax.acquisition.strategies import STRATEGIES
from mmal_jax.acquisition.strategies import update_min_distance_cache
