"""The persistent compilation cache's folder choice and atomic writes."""
import os

import jax
from jax._src import lru_cache

from mmal_jax import compile_cache


def test_folder_order():
  """Argument, then $MMAL_JAX_COMPILATION_CACHE, then jax's own setting,
  then the user's cache folder; "off" turns it off."""
  env = {"XDG_CACHE_HOME": "/x"}
  default = os.path.join("/x", "mmal_jax", "jax_compilation_cache")
  assert compile_cache.default_dir(env) == default
  assert compile_cache.choose_dir(None, env) == default
  assert compile_cache.choose_dir(None, env, "/jax") == "/jax"
  env[compile_cache.ENV] = "gs://b/cache"
  assert compile_cache.choose_dir(None, env, "/jax") == "gs://b/cache"
  assert compile_cache.choose_dir("/arg", env, "/jax") == "/arg"
  for off in ("off", "", "None"):
    assert compile_cache.choose_dir(off, env) is None
    assert compile_cache.choose_dir(None, {compile_cache.ENV: off}) is None
  home = compile_cache.default_dir({})
  assert home == os.path.join(os.path.expanduser("~"), ".cache", "mmal_jax",
                              "jax_compilation_cache")


def test_entries_are_written_whole(tmp_path):
  """An entry appears under its name only once complete (a temporary name,
  then a rename), once; installing twice wraps once."""
  compile_cache.write_atomically()
  put = lru_cache.LRUCache.put
  compile_cache.write_atomically()
  assert lru_cache.LRUCache.put is put and put.atomic
  cache = lru_cache.LRUCache(str(tmp_path), max_size=-1)
  cache.put("key", b"program")
  cache.put("key", b"other")
  assert os.listdir(tmp_path) == ["key" + lru_cache._CACHE_SUFFIX]  # pylint: disable=protected-access
  assert cache.get("key") == b"program"


def test_enable_keeps_a_folder_jax_was_given(monkeypatch):
  """The tests' shared cache (conftest) stays: the CLI run by a test uses
  the folder it was handed through $JAX_COMPILATION_CACHE_DIR."""
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  given = jax.config.jax_compilation_cache_dir
  assert given and compile_cache.enable() == given
  assert jax.config.jax_compilation_cache_dir == given
