"""Shared test set-up: quiet TensorFlow, hypothesis without deadlines (jit
compiles), the compilation cache, a GCS emulator."""
import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "mmal", deadline=None, max_examples=25, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("mmal")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from mmal_jax import compile_cache  # noqa: E402

# Tests build the same small programs again and again (every end-to-end run
# compiles its train step anew, CLI and multi-process tests start many short
# processes): they share compiled executables on disk.
CACHE_DIR = os.path.join(tempfile.gettempdir(), "mmal_jax_test_cache")


def enable_compilation_cache() -> None:
  """The shared cache, written atomically, for a test's worker process."""
  compile_cache.write_atomically()
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


enable_compilation_cache()
_CHILD_CACHES = tempfile.TemporaryDirectory(prefix="mmal_jax_child_caches_")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each module's compiled programs when it ends. Every executable
  maps its code into the process (~2000 maps per tiny experiment run, kept
  by jax's caches); a whole suite in one process passed the kernel's
  vm.max_map_count (65530) and XLA then segfaulted. Later modules reload
  what they need from the disk cache."""
  yield
  jax.clear_caches()
  gc.collect()


def child_cache_env(private: bool = True) -> dict:
  """Environment giving a `python -m mmal_jax.main` subprocess the shared
  cache (`compile_cache.enable` keeps it): with `private`, its own
  copy as hard links, for processes that run beside others (what they write
  never reaches another process); else the shared folder itself, for one
  process at a time (SIGKILLs at `faults` points never land mid-write:
  jax writes an entry right after compiling, in the main thread)."""
  folder = CACHE_DIR
  if private:
    folder = tempfile.mkdtemp(dir=_CHILD_CACHES.name)
    if os.path.isdir(CACHE_DIR):
      shutil.copytree(CACHE_DIR, folder, copy_function=os.link,
                      dirs_exist_ok=True,
                      ignore=shutil.ignore_patterns("*.partial"))
  return {"JAX_COMPILATION_CACHE_DIR": folder,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


import itertools  # noqa: E402

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
