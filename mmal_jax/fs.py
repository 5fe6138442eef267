"""The one filesystem layer: local paths and `gs://` (any fsspec URL) alike.

Every file mmal_jax reads or writes (workdir, data, checkpoints, tokenizer
models, reports, TensorBoard) goes through here. It is `etils.epath` (what
orbax uses for its own metadata) with the fsspec backend for URLs, so `gs://`
goes through `gcsfs` and orbax's arrays through tensorstore. Both can be
pointed at a local GCS emulator (`STORAGE_EMULATOR_HOST` for gcsfs,
`TENSORSTORE_GCS_HTTP_URL` for tensorstore), which is how the tests run a
whole experiment on `gs://` offline. epath would otherwise pick
`tf.io.gfile` for URLs when TensorFlow is installed, whose GCS client cannot
be redirected; `EPATH_USE_TF=false` (set here, before epath decides) stops
that.

Paths stay plain strings in the rest of the code (`os.path.join` is right for
`gs://` too); these functions take `str` or `os.PathLike`.

Writes of files a run relies on are atomic (`write_text`, `write_bytes`):
locally a temporary file in the same folder, fsync, then rename; on object
stores one upload, which the store makes visible whole or not at all. Either
way a kill mid-write leaves the previous version or nothing, never a torn file.
Files are created readable by the group and others (0644), as a shared
cluster needs.
"""
from __future__ import annotations

import errno
import os
import threading
import uuid

os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402  (after EPATH_USE_TF)
from etils.epath import gpath as _gpath  # noqa: E402

builtins_open = open  # `open` below shadows it.

# epath caches whether to use TensorFlow on first use; a library imported
# before this module may already have asked.
_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access

PathLike = str | os.PathLike
_FILE_MODE = 0o644
# What `check_writable_dir` writes: real bytes, so that a full disk fails the
# probe (an empty file needs no data block and is created on a full disk).
_PROBE_BYTES = 1 << 16


def is_remote(path: PathLike) -> bool:
  """True for URLs (`gs://...`, `s3://...`), False for local paths."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path` (local or URL)."""
  return epath.Path(os.fspath(path))


def exists(path: PathLike) -> bool:
  """True if a file or folder is at `path`."""
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  """True if `path` is a folder (on object stores: a prefix with objects)."""
  return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  """True if `path` is a file."""
  return as_path(path).is_file()


def makedirs(path: PathLike) -> None:
  """Creates folder `path` and its parents; no-op if it exists."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
  """Sorted names (not paths) of the entries of folder `path`."""
  return sorted(p.name for p in as_path(path).iterdir())


def glob(path: PathLike, pattern: str) -> list[str]:
  """Sorted full paths under folder `path` matching `pattern` ("*.npz")."""
  return sorted(os.fspath(p) for p in as_path(path).glob(pattern))


def open(path: PathLike, mode: str = "r"):  # pylint: disable=redefined-builtin
  """Opens `path` ("r", "rb", "w", "wb", "a", "ab"); parents made for writes.

  Plain writes through this are not atomic; use `write_text`/`write_bytes`
  for files a run relies on.
  """
  p = as_path(path)
  if any(c in mode for c in "wa"):
    p.parent.mkdir(parents=True, exist_ok=True)
  return p.open(mode)


def read_text(path: PathLike) -> str:
  """The text of file `path` (UTF-8)."""
  return as_path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
  """The bytes of file `path`."""
  return as_path(path).read_bytes()


def read_small(path: PathLike) -> bytes:
  """The bytes of a small file read often (a lock): on object stores one
  request without fsspec's read-ahead cache, which logs a line per open."""
  if not is_remote(path):
    return read_bytes(path)
  fsys, key = _fsspec(path)
  with fsys.open(key, "rb", cache_type="none") as f:
    return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module docstring), 0644.

  Parents are created. Cost: one write of `data` (plus a rename locally).
  """
  p = as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    with p.open("wb") as f:
      f.write(data)
    return
  path = os.fspath(path)
  tmp = os.path.join(os.path.dirname(path) or ".",
                     f".tmp-{os.getpid()}-{os.path.basename(path)}")
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _FILE_MODE)  # Whatever the umask made of it.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically, 0644; parents are created."""
  write_bytes(path, text.encode("utf-8"))


def _fsspec(path: PathLike):
  """(fsspec filesystem, path within it) of URL `path`."""
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.core.url_to_fs(os.fspath(path))


def _is_gcs(path: PathLike) -> bool:
  return os.fspath(path).startswith("gs://")


def create_new(path: PathLike, data: bytes) -> bool:
  """Writes `data` to `path` only if nothing is there; True if it did.

  Atomic test-and-create, what a lock needs: locally the bytes are written
  to a temporary file and hard-linked in (fails if `path` exists; the file
  appears whole), or where hard links are not supported `O_CREAT | O_EXCL`
  then the write (a reader may briefly see it empty), on gs:// one upload with the precondition
  `ifGenerationMatch=0` (GCS refuses it, 412, if the object exists). Other
  object stores: an existence check then a write (not atomic). Parents are
  created. Cost: one small write.
  """
  p = as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if _is_gcs(path):
    fsys, key = _fsspec(path)
    try:
      fsys.pipe_file(key, data, mode="create")
    except FileExistsError:  # gcsfs' name for 412 Precondition Failed.
      return False
    return True
  if is_remote(path):
    if p.exists():
      return False
    write_bytes(path, data)
    return True
  path = os.fspath(path)
  tmp = os.path.join(os.path.dirname(path) or ".",
                     f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
  try:
    write_bytes(tmp, data)
    os.link(tmp, path)  # Fails with FileExistsError if `path` exists.
    return True
  except FileExistsError:
    return False
  except OSError:  # No hard links here (e.g. gcsfuse): O_EXCL, then write.
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _read_versioned(path: PathLike) -> tuple[bytes, str | None]:
  """(bytes of `path`, its GCS generation; None off gs://), one request.

  FileNotFoundError if there is nothing. gcsfs pins the generation it read,
  so the two belong together.
  """
  if not _is_gcs(path):
    return read_small(path), None
  fsys, key = _fsspec(path)
  with fsys.open(key, "rb", cache_type="none") as f:
    return f.read(), f.details.get("generation")


def remove_if_unchanged(path: PathLike, data: bytes) -> bool:
  """Deletes `path` only if it still holds exactly `data`; True if it did.

  A compare-and-delete (breaking a stale lock that another process may be
  replacing at the same moment): on gs:// the object's generation is read
  with its bytes and the delete carries `ifGenerationMatch`; locally the
  file is renamed aside, compared, and linked back if it changed. Other
  object stores: read, compare, delete (not atomic). Cost: one small read.
  """
  if _is_gcs(path):
    try:
      held, generation = _read_versioned(path)
    except FileNotFoundError:
      return False
    if held != data:
      return False
    fsys, key = _fsspec(path)
    bucket, name, _ = fsys.split_path(key)
    try:
      fsys.call("DELETE", "b/{}/o/{}", bucket, name,
                ifGenerationMatch=generation)
    except (FileNotFoundError, FileExistsError):  # 404 / 412: it changed.
      return False
    fsys.invalidate_cache(key)
    return True
  if is_remote(path):
    if not exists(path) or read_bytes(path) != data:
      return False
    remove(path)
    return True
  path = os.fspath(path)
  aside = os.path.join(os.path.dirname(path) or ".",
                       f".removing-{uuid.uuid4().hex}-{os.path.basename(path)}")
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  with builtins_open(aside, "rb") as f:
    held = f.read()
  if held == data:
    os.remove(aside)
    return True
  try:  # Not ours to delete: put it back unless a new one is there.
    os.link(aside, path)
  except FileExistsError:
    pass
  os.remove(aside)
  return False


def refresh_if_unchanged(path: PathLike, data: bytes,
                         fresh: bytes) -> bytes | None:
  """A lock's heartbeat: marks `path` as written now if it still holds
  exactly `data`; returns the bytes it holds afterwards, None if it no
  longer held `data` (another process replaced or removed it).

  Never writes over another process' file, even when the request is
  delayed for minutes between the compare and the write (a hung network
  file system, a frozen process):
    * locally the bytes stay `data` and the file's modification time is set
      to now (`modified_time`); a late touch of a file that replaced ours
      changes no bytes;
    * on gs:// `fresh` is uploaded with `ifGenerationMatch` set to the
      generation read with `data` (compare-and-swap; GCS answers 412 if the
      object was replaced meanwhile).
  Other object stores: read, compare, write `fresh` (not atomic).
  Cost: one small read and one small write or metadata update.
  """
  try:
    held, generation = _read_versioned(path)
  except FileNotFoundError:
    return None
  if held != data:
    return None
  if not is_remote(path):
    try:
      os.utime(path)
    except FileNotFoundError:  # Removed since the read.
      return None
    return data
  if not _is_gcs(path):
    write_bytes(path, fresh)
    return fresh
  fsys, key = _fsspec(path)
  bucket, name, _ = fsys.split_path(key)
  try:
    fsys.call("POST", fsys._location + "/upload/storage/v1/b/{}/o",  # pylint: disable=protected-access
              bucket, uploadType="media", name=name,
              ifGenerationMatch=generation, data=fresh,
              headers={"Content-Type": "application/octet-stream"})
  except (FileNotFoundError, FileExistsError):  # 404 / 412: it changed.
    return None
  finally:
    fsys.invalidate_cache(key)
  return fresh


def modified_time(path: PathLike) -> float | None:
  """When the local file `path` was last modified (seconds since the epoch,
  the file system's clock); None on object stores, whose files carry their
  own time (see `refresh_if_unchanged`). FileNotFoundError if absent."""
  if is_remote(path):
    return None
  return os.stat(os.fspath(path)).st_mtime


def no_space_left(error: BaseException) -> str | None:
  """If `error` (or an exception in its chain) says the disk is full, the
  path it names (or "" when it names none); else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    if (getattr(error, "errno", None) == errno.ENOSPC
        or "No space left on device" in text or "ENOSPC" in text):
      return os.fspath(getattr(error, "filename", None) or "")
    error = error.__cause__ or error.__context__
  return None


# How long the up-front checks wait for an object store to answer
# (`check_reachable`); MMAL_FS_TIMEOUT_S in the environment changes it.
REACHABLE_TIMEOUT_S = 10.0


def check_reachable(path: PathLike, timeout_s: float | None = None
                    ) -> str | None:
  """Why the store holding URL `path` cannot be reached, or None if it can
  (always None for local paths).

  Asks whether `path` exists, waiting at most `timeout_s` (default
  `REACHABLE_TIMEOUT_S` or $MMAL_FS_TIMEOUT_S) seconds: without a network,
  with a wrong endpoint or a firewall gcsfs retries for about a minute and
  then raises a DNS or connection traceback. The question is asked in a
  daemon thread, left behind if it does not answer in time. Cost: one
  metadata request.
  """
  if not is_remote(path):
    return None
  if timeout_s is None:
    timeout_s = float(os.environ.get("MMAL_FS_TIMEOUT_S",
                                     REACHABLE_TIMEOUT_S))
  outcome = []

  def ask():
    try:
      exists(path)
      outcome.append(None)
    except Exception as e:  # pylint: disable=broad-except
      # gcsfs, aiohttp and auth libraries raise many types.
      outcome.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                     if str(e) else type(e).__name__)

  thread = threading.Thread(target=ask, daemon=True,
                            name=f"reachable {os.fspath(path)}")
  thread.start()
  thread.join(timeout_s)
  if not outcome:
    return (f"{os.fspath(path)} cannot be reached: no answer within "
            f"{timeout_s:g}s (network, credentials, firewall or endpoint; "
            f"set MMAL_FS_TIMEOUT_S to wait longer)")
  if outcome[0] is not None:
    return f"{os.fspath(path)} cannot be reached ({outcome[0]})"
  return None


def remove(path: PathLike) -> None:
  """Deletes file `path`; no-op if it is not there."""
  p = as_path(path)
  if p.exists():
    p.unlink()


def rmtree(path: PathLike) -> None:
  """Deletes folder `path` and everything under it; no-op if absent."""
  p = as_path(path)
  if p.exists():
    p.rmtree()


def check_writable_dir(path: PathLike) -> str | None:
  """Why folder `path` cannot hold a run's files, or None if it can.

  Writes (64 KiB of real bytes, which a full disk refuses) and removes a
  probe file in it, creating the folder for that and
  removing it again if it was not there (a local folder), so nothing is left
  behind. Returns a one-line reason for a path under a file, an existing
  file, a read-only or unreachable location.
  """
  path = os.fspath(path)
  local = not is_remote(path)
  if local and os.path.exists(path) and not os.path.isdir(path):
    return f"{path} is a file, not a folder"
  created = []
  if local:
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
      created.append(parent)
      parent = os.path.dirname(parent)
  probe = os.path.join(path, f".write-probe-{os.getpid()}")
  try:
    makedirs(path)
    write_bytes(probe, os.urandom(_PROBE_BYTES))
    remove(probe)
  except Exception as e:  # pylint: disable=broad-except
    # gcsfs, tensorstore and the OS raise many types; only the reason matters.
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    if no_space_left(e) is not None:
      reason = "no space left on device"
    return f"{path} cannot be written: {reason.splitlines()[0]}"
  finally:
    for folder in created:  # Deepest first.
      if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
  return None
