"""The workdir's log file, local and on gs://: restarts keep earlier lines,
closing writes the lines the remote interval held back."""
import atexit
import errno
import logging
import os

import pytest

from mmal_jax import fs
from mmal_jax import logfile


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("gcs_bucket") + "/run"


def _log(handler, message):
  handler.handle(logging.LogRecord("t", logging.INFO, __file__, 1, message,
                                   None, None))


def _open(handler, workdir):
  path = handler.open_in(workdir)
  atexit.unregister(handler.close)  # The test closes it (or "kills" it).
  return path


def test_restart_keeps_earlier_lines_and_close_writes_the_rest(workdir):
  first = logfile.FileLog(remote_interval_s=1e9)
  _log(first, "before open")
  path = _open(first, workdir)
  assert path == os.path.join(workdir, "logs", "process_0.log")
  _log(first, "first run")  # Then killed: no close.
  second = logfile.FileLog(remote_interval_s=1e9)
  _log(second, "second run")
  _open(second, workdir)
  _log(second, "last line")
  second.close()
  lines = fs.read_text(path).splitlines()
  assert "before open" in lines[0]
  assert any("restarted at" in line for line in lines)
  assert "second run" in lines[-2] and "last line" in lines[-1]
  if fs.is_remote(workdir):
    # Held back by the interval, then lost with the process.
    assert not any("first run" in line for line in lines)


def test_a_full_disk_stops_the_log_with_one_line(tmp_path, monkeypatch,
                                                   capsys):
  """#17 item 7: one line on stderr, not a logging traceback per line."""
  handler = logfile.FileLog()
  _open(handler, str(tmp_path))

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(fs, "open", full)
  for i in range(3):
    _log(handler, f"line {i}")
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.splitlines()) == 1, err
  assert "cannot write the log" in err and "No space left" in err
  assert handler.lines == []  # Nothing piles up in memory.
  handler.close()
