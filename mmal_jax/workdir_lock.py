"""One process per workdir: the lock file WORKDIR/lock.

Two processes on one workdir would both buy every round's queries (asking a
human or paid oracle twice) and write over each other's checkpoints. The
first process takes the lock once its up-front checks have passed, before it
writes anything (`take`); a second one is refused with `WorkdirBusy`, which
the command line prints as one line (exit status 2), leaving the workdir as
it was.

The lock is a small JSON file (host, pid, start time, heartbeat time, a
random token, the command) created with an atomic test-and-create
(`fs.create_new`: `O_EXCL` locally, an upload with `ifGenerationMatch=0` on
gs://), so it works on local disks, shared file systems and object stores.
A background thread beats every `HEARTBEAT_S` seconds
(`fs.refresh_if_unchanged`: locally it sets the file's modification time,
on gs:// it rewrites the heartbeat time in the JSON with a compare-and-swap)
and never writes over a lock another process has taken meanwhile. A lock is
stale, and is broken with a warning by the next process, when

  * its heartbeat is older than `STALE_AFTER_S` seconds (its holder was
    SIGKILLed, its host died or lost the network), or
  * it was taken on this host by a process that no longer exists (a kill -9
    on the same machine: broken at once, no wait).

Breaking is a compare-and-delete (`fs.remove_if_unchanged`) followed by the
same atomic create, so of several processes breaking one stale lock at once
exactly one gets it.

A holder whose lock was broken (it was frozen for minutes, or cut off from
the file system, and another process took the workdir over) must not write
again: `ensure_held()`, which the run calls before every checkpoint and
after every round, raises `WorkdirLost` on every process of the job once
the lock file is no longer this process'.

The lock is released (deleted) when the run ends, normally or by an error
or signal, and at interpreter exit. In a multi-host job only process 0
takes it; the others trust it. Within one process `take` is re-entrant (the
same workdir's lock is returned again).
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging

from mmal_jax import fs
from mmal_jax import sharding

HEARTBEAT_S = 30.0
# Ten missed heartbeats: a live holder never looks stale, even with a few
# minutes of clock skew between hosts or a slow object store.
STALE_AFTER_S = 300.0
LOCK_NAME = "lock"
# An unreadable lock is read again after this long before it is broken: a
# file system without hard links shows a lock empty while it is written.
_REREAD_S = 0.5
# Release waits this long for a heartbeat write in progress.
_JOIN_S = 10.0


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLost(WorkdirBusy):
  """This process held the workdir's lock, and another process took it."""


def _iso(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(
      seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: it exists.
    return True
  return True


def last_heartbeat(holder: dict, modified: float | None) -> float:
  """When the lock `holder` (its parsed JSON) last beat: its heartbeat field
  or the file's modification time `modified` (None on object stores),
  whichever is later (seconds since the epoch)."""
  return max(float(holder.get("heartbeat", 0)), modified or 0.0)


def stale_reason(holder: dict, now: float, stale_after_s: float,
                 modified: float | None = None) -> str | None:
  """Why the lock `holder` (its parsed JSON; `modified`: see
  `last_heartbeat`) is stale, or None if it is live.

  Cost: one `kill(pid, 0)` when the holder ran on this host.
  """
  age = now - last_heartbeat(holder, modified)
  if age > stale_after_s:
    return (f"its heartbeat is {age:.0f}s old (limit {stale_after_s:.0f}s)")
  pid = holder.get("pid")
  if holder.get("host") == socket.gethostname() and not (
      isinstance(pid, int) and pid > 0 and _pid_alive(pid)):
    return f"process {pid} on this host no longer exists"
  return None


class WorkdirLock:
  """A held lock on a workdir; `release()` deletes it (idempotent)."""

  def __init__(self, workdir: str, heartbeat_s: float):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    now = time.time()
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": now, "started_utc": _iso(now),
                   "heartbeat": now, "token": uuid.uuid4().hex,
                   "command": " ".join(sys.argv)}
    self.data = _encode(self.holder)
    self._heartbeat_s = heartbeat_s
    self._stop = threading.Event()
    self._thread = None
    # A beat and `lost_reason` do not interleave: on gs:// a beat changes the
    # file and `data` together.
    self._mutex = threading.Lock()

  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat_until_released,
                                    daemon=True,
                                    name=f"lock heartbeat {self.path}")
    self._thread.start()

  def _beat_until_released(self) -> None:
    """Beats until released; stops once the lock was lost."""
    while not self._stop.wait(self._heartbeat_s):
      try:
        if not self.beat():
          logging.error("The lock %s is no longer this process' (broken as "
                        "stale by another process); this run stops at its "
                        "next checkpoint or round.", self.path)
          return
      except Exception as e:  # pylint: disable=broad-except
        # A full disk, a network blip: try again at the next beat.
        logging.warning("Cannot refresh the lock %s: %s", self.path, e)

  def beat(self) -> bool:
    """One heartbeat (`fs.refresh_if_unchanged`); False if the lock is no
    longer this process'. Cost: one small read and one small write."""
    with self._mutex:
      holder = dict(self.holder, heartbeat=time.time())
      held = fs.refresh_if_unchanged(self.path, self.data, _encode(holder))
      if held is None:
        return False
      if held != self.data:
        self.holder, self.data = holder, held
      return True

  def lost_reason(self) -> str | None:
    """None while WORKDIR/lock is this process' (or cannot be read now: the
    heartbeat tells later); else one line saying who holds it now. Cost: one
    small read."""
    with self._mutex:
      try:
        held = fs.read_small(self.path)
      except FileNotFoundError:
        held = None
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Cannot read the lock %s: %s", self.path, e)
        return None
      if held == self.data:
        return None
    holder = _parse(held) if held is not None else None
    now_held = ("nobody holds it now" if holder is None else
                f"process {holder.get('pid')} on {holder.get('host')} "
                f"holds it since {holder.get('started_utc')}")
    return (f"{self.workdir}: this process lost the workdir's lock "
            f"{self.path} ({now_held}; it was broken as stale while this "
            f"process was frozen or cut off from the file system). Stopping "
            f"before writing anything more, so that two processes do not "
            f"share the workdir: let the other run go on, or stop it and "
            f"rerun this command to resume.")

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if it is still ours."""
    if _HELD.get(self.workdir) is not self:
      return
    del _HELD[self.workdir]
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=_JOIN_S)  # A write stuck on the network.
    try:
      fs.remove_if_unchanged(self.path, self.data)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Cannot remove the lock %s (%s); the next run breaks "
                      "it as stale.", self.path, e)


_HELD: dict[str, WorkdirLock] = {}


def _encode(holder: dict) -> bytes:
  return (json.dumps(holder, indent=1) + "\n").encode()


def _parse(data: bytes) -> dict | None:
  """A lock file's holder, None if the bytes are not one."""
  try:
    holder = json.loads(data)
    float(holder["heartbeat"])
    return holder
  except (ValueError, TypeError, KeyError):
    return None


def take(workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
         stale_after_s: float = STALE_AFTER_S) -> WorkdirLock:
  """Takes WORKDIR/lock for this process (see the module docstring).

  Returns the held lock (the same one again if this process holds it).
  Raises WorkdirBusy, its message one line naming the holder, if a live
  process holds it. Cost: a few small reads and writes.
  """
  if workdir in _HELD:
    return _HELD[workdir]
  lock = WorkdirLock(workdir, heartbeat_s)
  for _ in range(3):  # Lost races against other breakers: look again.
    if fs.create_new(lock.path, lock.data):
      _HELD[workdir] = lock
      lock._start_heartbeat()  # pylint: disable=protected-access
      return lock
    try:
      held = fs.read_small(lock.path)
    except FileNotFoundError:
      continue  # Released meanwhile.
    holder = _parse(held)
    if holder is None:  # Maybe being written (O_EXCL, then the bytes).
      time.sleep(_REREAD_S)
      try:
        held = fs.read_small(lock.path)
      except FileNotFoundError:
        continue
      holder = _parse(held)
    try:
      modified = fs.modified_time(lock.path)
    except FileNotFoundError:
      continue
    if holder is None:
      reason = "it is not a lock file this program wrote"
    else:
      reason = stale_reason(holder, time.time(), stale_after_s, modified)
    if reason is None:
      beat_s = time.time() - last_heartbeat(holder, modified)
      raise WorkdirBusy(
          f"{workdir} is in use by process {holder.get('pid')} on "
          f"{holder.get('host')} (started {holder.get('started_utc')}, "
          f"heartbeat {beat_s:.0f}s ago; "
          f"lock {lock.path}). Wait for that run to end (or stop it), or "
          f"pass another --workdir. A lock whose process is gone is broken "
          f"automatically ({stale_after_s:.0f}s after its last heartbeat, "
          f"at once on the same host).")
    logging.warning("Breaking the stale lock %s (%s): %s", lock.path,
                    held.decode(errors="replace").replace("\n", " "), reason)
    fs.remove_if_unchanged(lock.path, held)
  raise WorkdirBusy(f"{workdir}: other processes keep taking its lock "
                    f"{lock.path}; run one process per workdir.")


def ensure_held() -> None:
  """Raises WorkdirLost, on every process of the job, if this process lost
  a workdir lock it took (`WorkdirLock.lost_reason`).

  Called at points every process reaches together (before a checkpoint,
  after a round): only process 0 holds the lock, and stopping it alone
  would leave the others waiting at their next collective. Cost: one small
  read per held lock, one all-gather of a byte per process.
  """
  reasons = [r for r in (lock.lost_reason() for lock in list(_HELD.values()))
             if r is not None]
  if sharding.any_process(bool(reasons)):
    raise WorkdirLost(reasons[0] if reasons else (
        "process 0 of this job lost the workdir's lock (its error line says "
        "why): this process stops with it."))


def release(workdir: str) -> None:
  """Releases this process' lock on `workdir`, if it holds one."""
  if workdir in _HELD:
    _HELD[workdir].release()


@atexit.register
def _release_all() -> None:
  for lock in list(_HELD.values()):
    lock.release()
