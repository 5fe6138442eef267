"""A persistent compilation cache for the command line and the benchmarks.

Compiling a B/16 training step takes tens of seconds on an accelerator; jax
can store compiled programs on disk and load them in the next process that
builds the same program (same jax version, devices and flags). `enable()`
turns that on, choosing the folder in this order:

1. the `path` argument (the benchmarks' `--compilation_cache`);
2. `$MMAL_JAX_COMPILATION_CACHE` (`off`, `none` or empty: no cache);
3. a folder already given to jax (`$JAX_COMPILATION_CACHE_DIR` or
   `jax.config.update("jax_compilation_cache_dir", ...)`), kept as it is;
4. `$XDG_CACHE_HOME/mmal_jax/jax_compilation_cache` (`~/.cache/...` when
   `XDG_CACHE_HOME` is unset).

Programs that compiled faster than jax's
`jax_persistent_cache_min_compile_time_secs` (1 s unless set) are not
stored. Entries are written to a temporary name and renamed, so processes
sharing the folder (a pod's hosts on one file system, runs side by side)
never load a half-written program. Delete the folder to drop the cache.
"""
from __future__ import annotations

import os

import jax

ENV = "MMAL_JAX_COMPILATION_CACHE"
_OFF = ("", "off", "none")


def default_dir(environ=os.environ) -> str:
  """`$XDG_CACHE_HOME/mmal_jax/jax_compilation_cache` (default ~/.cache)."""
  root = environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(root, "mmal_jax", "jax_compilation_cache")


def choose_dir(path: str | None = None, environ=os.environ,
               configured: str | None = None) -> str | None:
  """The cache folder by the module's order (None: no cache). `configured`:
  the folder jax was already given, if any. Pure: reads nothing else."""
  if path is not None:
    return None if path.strip().lower() in _OFF else path
  if ENV in environ:
    value = environ[ENV]
    return None if value.strip().lower() in _OFF else value
  return configured or default_dir(environ)


def _atomic_put(self, key: str, value: bytes) -> None:
  """jax's `LRUCache.put` without eviction writes an entry in place, so a
  reader can load a torn program (and crash); write, then rename."""
  from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
  path = os.path.join(str(self.path), key + lru_cache._CACHE_SUFFIX)  # pylint: disable=protected-access
  if os.path.exists(path):
    return
  temporary = f"{path}.{os.getpid()}.partial"
  with open(temporary, "wb") as f:
    f.write(value)
  os.replace(temporary, path)


def write_atomically() -> None:
  """Makes jax's on-disk cache write each local entry atomically (see
  `_atomic_put`); remote folders (`etils.epath`) and caches with eviction
  (which lock the folder) keep jax's own writer."""
  from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
  if getattr(lru_cache.LRUCache.put, "atomic", False):
    return
  original = lru_cache.LRUCache.put

  def put(self, key: str, value: bytes) -> None:
    if self.eviction_enabled or not lru_cache._is_local_filesystem(  # pylint: disable=protected-access
        str(self.path)):
      return original(self, key, value)
    return _atomic_put(self, key, value)

  put.atomic = True
  lru_cache.LRUCache.put = put


def enable(path: str | None = None) -> str | None:
  """Turns jax's persistent compilation cache on; returns its folder (None
  when turned off). Call before the first compile. Cost: none until a
  program is compiled (then one file read or write per program)."""
  configured = jax.config.jax_compilation_cache_dir
  folder = choose_dir(path, os.environ, configured)
  if folder is None:
    if configured:
      jax.config.update("jax_compilation_cache_dir", None)
    return None
  write_atomically()
  if folder != configured:
    jax.config.update("jax_compilation_cache_dir", folder)
  return folder
