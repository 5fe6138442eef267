"""The workdir lock (#17 item 5) on a local disk and on gs:// (the emulator):
a live holder refuses others, a stale one is broken, release deletes it."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mmal_jax import fs
from mmal_jax import workdir_lock


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "w")
  return request.getfixturevalue("gcs_bucket") + "/w"


def _write_holder(workdir, **fields) -> bytes:
  holder = {"host": socket.gethostname(), "pid": os.getppid(),
            "started": time.time(), "started_utc": "then",
            "heartbeat": time.time(), "token": "theirs", **fields}
  data = json.dumps(holder).encode()
  fs.write_bytes(os.path.join(workdir, "lock"), data)
  return data


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_create_new_and_remove_if_unchanged_are_atomic(workdir):
  path = os.path.join(workdir, "x")
  assert fs.create_new(path, b"one")
  assert not fs.create_new(path, b"two")
  assert fs.read_bytes(path) == b"one"
  assert not fs.remove_if_unchanged(path, b"two")
  assert fs.read_bytes(path) == b"one"
  assert fs.remove_if_unchanged(path, b"one")
  assert not fs.exists(path)
  assert not fs.remove_if_unchanged(path, b"one")


def test_create_new_without_hard_links(tmp_path, monkeypatch):
  """gcsfuse and some other mounts have no hard links: O_EXCL instead."""
  def no_links(*args):
    raise PermissionError("Operation not permitted")

  monkeypatch.setattr(os, "link", no_links)
  path = str(tmp_path / "x")
  assert fs.create_new(path, b"one")
  assert not fs.create_new(path, b"two")
  assert fs.read_bytes(path) == b"one"
  assert sorted(os.listdir(tmp_path)) == ["x"]  # No temporary left.


def test_live_holder_refuses_and_keeps_its_lock(workdir):
  held = _write_holder(workdir)  # Our parent: alive, on this host.
  with pytest.raises(workdir_lock.WorkdirBusy) as error:
    workdir_lock.take(workdir)
  message = str(error.value)
  assert "\n" not in message
  assert f"in use by process {os.getppid()} on {socket.gethostname()}" in (
      message)
  assert fs.read_bytes(os.path.join(workdir, "lock")) == held
  # Another host's lock with a fresh heartbeat: its pid cannot be checked.
  held = _write_holder(workdir, host="elsewhere", pid=_dead_pid())
  with pytest.raises(workdir_lock.WorkdirBusy):
    workdir_lock.take(workdir)
  assert fs.read_bytes(os.path.join(workdir, "lock")) == held


@pytest.mark.parametrize("stale", ["dead_pid", "old_heartbeat", "garbage"])
def test_stale_lock_is_broken_with_a_warning(workdir, stale, caplog):
  if stale == "dead_pid":  # SIGKILLed on this host: broken at once.
    _write_holder(workdir, pid=_dead_pid())
  elif stale == "old_heartbeat":  # Another host, silent for too long.
    then = time.time() - workdir_lock.STALE_AFTER_S - 1
    _write_holder(workdir, host="elsewhere", heartbeat=then)
    if not fs.is_remote(workdir):  # Locally the file's time is the beat.
      os.utime(os.path.join(workdir, "lock"), (then, then))
  else:
    fs.write_bytes(os.path.join(workdir, "lock"), b"\x00garbage")
  lock = workdir_lock.take(workdir)
  try:
    assert "Breaking the stale lock" in caplog.text
    holder = json.loads(fs.read_bytes(lock.path))
    assert holder["pid"] == os.getpid() and holder["token"] != "theirs"
    assert workdir_lock.take(workdir) is lock  # Re-entrant.
  finally:
    lock.release()
  assert not fs.exists(lock.path)


def _last_heartbeat(path) -> float:
  return workdir_lock.last_heartbeat(json.loads(fs.read_bytes(path)),
                                     fs.modified_time(path))


def test_heartbeat_is_refreshed(workdir):
  lock = workdir_lock.take(workdir, heartbeat_s=0.05)
  try:
    first = _last_heartbeat(lock.path)
    deadline = time.monotonic() + 10
    while _last_heartbeat(lock.path) == first:
      assert time.monotonic() < deadline, "no heartbeat"
      time.sleep(0.02)
    assert lock.lost_reason() is None
    workdir_lock.ensure_held()
  finally:
    lock.release()
  assert not fs.exists(lock.path)


def test_heartbeat_never_writes_over_a_lock_taken_over(workdir, monkeypatch):
  """The holder froze (or its file system hung) between reading its lock
  and refreshing it, and another process broke the lock as stale and took
  it meanwhile: the late refresh must leave the new holder's lock as it is,
  and the old holder must see that it lost the workdir."""
  lock = workdir_lock.take(workdir, heartbeat_s=3600)
  theirs = json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": 0.0,
                       "started_utc": "now", "token": "theirs"}).encode()
  read = fs._read_versioned  # pylint: disable=protected-access

  def read_then_taken_over(path):
    held = read(path)
    monkeypatch.setattr(fs, "_read_versioned", read)
    assert fs.remove_if_unchanged(path, lock.data)
    assert fs.create_new(path, theirs)
    return held

  monkeypatch.setattr(fs, "_read_versioned", read_then_taken_over)
  try:
    lock.beat()  # Locally it touches their file: no byte changes.
    assert fs.read_bytes(lock.path) == theirs
    assert not lock.beat()
    assert fs.read_bytes(lock.path) == theirs
    reason = lock.lost_reason()
    assert "lost the workdir's lock" in reason and "\n" not in reason
    assert "process 1 on elsewhere holds it" in reason
    with pytest.raises(workdir_lock.WorkdirLost, match="lost the workdir"):
      workdir_lock.ensure_held()
  finally:
    lock.release()
  assert fs.read_bytes(lock.path) == theirs  # Release leaves theirs alone.
