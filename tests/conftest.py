"""Shared test set-up: quiet TensorFlow, hypothesis without deadlines (jit compiles)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "mmal", deadline=None, max_examples=25, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("mmal")
