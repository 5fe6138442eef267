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
    _write_holder(workdir, host="elsewhere",
                  heartbeat=time.time() - workdir_lock.STALE_AFTER_S - 1)
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


def test_heartbeat_is_refreshed(tmp_path):
  lock = workdir_lock.take(str(tmp_path), heartbeat_s=0.05)
  try:
    first = json.loads(fs.read_bytes(lock.path))["heartbeat"]
    deadline = time.monotonic() + 10
    while json.loads(fs.read_bytes(lock.path))["heartbeat"] == first:
      assert time.monotonic() < deadline, "no heartbeat"
      time.sleep(0.02)
  finally:
    lock.release()
  assert not os.path.exists(lock.path)
