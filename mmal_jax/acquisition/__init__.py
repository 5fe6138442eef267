"""Acquisition: sharded kernels (Algorithm 2, top-2 margins) and strategies."""
from mmal_jax.acquisition.kernels import covering_radius
from mmal_jax.acquisition.kernels import kcenter_greedy
from mmal_jax.acquisition.kernels import METRICS
from mmal_jax.acquisition.kernels import min_distance
from mmal_jax.acquisition.kernels import top2_margin
from mmal_jax.acquisition.strategies import build_min_distance_cache
from mmal_jax.acquisition.strategies import STRATEGIES
from mmal_jax.acquisition.strategies import update_min_distance_cache
from mmal_jax.acquisition.cold_start import cold_start_queries
from mmal_jax.acquisition.cold_start import SELECTORS
# Modules named like their main function (kmeans.kmeans, badge.badge) are
# not shadowed by it: import those functions from the modules.
from mmal_jax.acquisition import badge as _badge

# Registered here: badge.py builds on strategies.py's helpers, so strategies.py
# cannot import it.
STRATEGIES["badge"] = _badge.badge
