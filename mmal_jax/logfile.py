"""The run's log in the workdir: WORKDIR/logs/process_<i>.log.

`FileLog` is a `logging.Handler` installed on absl's logger when the program
starts: it keeps lines in memory until `open_in(workdir)` names the workdir
(after the config has passed its checks, so a config that cannot run leaves
no trace), then writes them there and every later line. Local files are
appended to and flushed at once; on object stores (gs://), which cannot
append, the whole file (a restarted run's earlier lines first) is rewritten
at most every `remote_interval_s` seconds and at exit.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import time

import jax

from mmal_jax import fs


class FileLog(logging.Handler):
  """Buffers formatted log lines, then writes them to the workdir's log."""

  def __init__(self, remote_interval_s: float = 30.0):
    super().__init__()
    self.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s"))
    self.lines: list[str] = []
    self.path = None
    self.remote_interval_s = remote_interval_s
    self._written = 0       # Lines already in the file.
    self._last_write = 0.0
    self.stopped = False    # A write failed: no more lines are kept.
    atexit.register(self.close)

  def open_in(self, workdir: str) -> str:
    """Starts writing to WORKDIR/logs/process_<i>.log; returns that path."""
    self.path = os.path.join(workdir, "logs",
                             f"process_{jax.process_index()}.log")
    if fs.exists(self.path):
      restart = [f"---- restarted at {time.ctime()} ----"]
      if fs.is_remote(self.path):  # Rewritten whole: keep what is there.
        restart = fs.read_text(self.path).splitlines() + restart
      self.lines[:0] = restart
    self.flush(force=True)
    # Exit hooks run last-registered first: re-registered after that write
    # set gcsfs up (and its own hook, which closes its HTTP session), the
    # last lines are written while the session is still open.
    atexit.unregister(self.close)
    atexit.register(self.close)
    return self.path

  def emit(self, record: logging.LogRecord) -> None:
    if self.stopped:
      return
    try:
      self.lines.append(self.format(record))
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)
      return
    self.flush()

  def flush(self, force: bool = False) -> None:
    """Writes the lines not written yet (remote: whole file, rate-limited).

    A write that fails (a full disk) stops the file log with one line on
    stderr instead of a traceback per log line; the run goes on logging to
    stderr (its next checkpoint save then reports the full disk).
    """
    if self.path is None or self._written == len(self.lines):
      return
    try:
      self._write(force)
    except Exception as e:  # pylint: disable=broad-except
      # OSError locally; gcsfs raises its own types. A handler never raises.
      reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
      print(f"mmal_jax: cannot write the log {self.path} ({reason}); "
            f"logging to stderr only.", file=sys.stderr)
      self.path, self.lines, self._written = None, [], 0
      self.stopped = True

  def _write(self, force: bool) -> None:
    if not fs.is_remote(self.path):
      fs.makedirs(os.path.dirname(self.path))
      with fs.open(self.path, "a") as f:
        f.write("".join(line + "\n" for line in self.lines))
      self.lines, self._written = [], 0
      return
    now = time.monotonic()
    if force or now - self._last_write >= self.remote_interval_s:
      fs.write_text(self.path, "".join(line + "\n" for line in self.lines))
      self._written, self._last_write = len(self.lines), now

  def close(self) -> None:
    """Writes every line left (remote ones too, whatever the interval)."""
    self.flush(force=True)
    super().close()


_HANDLER: FileLog | None = None


def install(quiet_until_open: bool = True) -> FileLog:
  """Adds the (single) FileLog to the root logger, which absl logs through.

  With `quiet_until_open`, INFO lines stay off stderr until `open_in` (so a
  config rejected up front prints its one error line and nothing else).
  """
  global _HANDLER
  if _HANDLER is None:
    _HANDLER = FileLog()
    _HANDLER.setLevel(logging.INFO)
    logging.getLogger().addHandler(_HANDLER)
    if quiet_until_open:
      _stderr_handler().setLevel(logging.WARNING)
  return _HANDLER


def _stderr_handler() -> logging.Handler:
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  return absl_logging.get_absl_handler()


def note(message: str) -> None:
  """Adds a line to the log file only (not to stderr), e.g. the error that
  the CLI prints as its one line."""
  if _HANDLER is not None and not _HANDLER.stopped:
    _HANDLER.lines.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")
    _HANDLER.flush(force=True)


def open_in(workdir: str) -> str | None:
  """Points the installed FileLog at `workdir` (and lets INFO lines reach
  stderr again); None if none is installed."""
  if _HANDLER is None:
    return None
  _stderr_handler().setLevel(logging.NOTSET)
  return _HANDLER.open_in(workdir)
