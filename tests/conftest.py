"""Shared test set-up: quiet TensorFlow, hypothesis without deadlines (jit compiles)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "mmal", deadline=None, max_examples=25, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("mmal")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Tests build the same small programs again and again (every end-to-end run
# compiles its train step anew): share the compiled executables on disk.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "mmal_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import itertools  # noqa: E402

import pytest  # noqa: E402

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def gcs_emulator():
  """One in-memory GCS emulator for the session (see gcs_emulator.py)."""
  import gcs_emulator as lib  # pylint: disable=g-import-not-at-top
  emulator = lib.Emulator()
  yield emulator
  emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):
  """A fresh "gs://bucket-N" on the emulator, this process pointed at it."""
  for key, value in gcs_emulator.env().items():
    monkeypatch.setenv(key, value)
  gcs_emulator.use_in_this_process()
  return gcs_emulator.bucket(f"bucket-{os.getpid()}-{next(_bucket_ids)}")
