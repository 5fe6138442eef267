"""SIGTERM and Ctrl-C (SIGINT): stop at once, keep what is saved, one line.

Cluster schedulers and TPU-VM preemption send SIGTERM and allow a short
grace period before SIGKILL; a user presses Ctrl-C. `install()` (called by
the command line) turns either signal into the exception `Interrupted`,
raised in the main thread where it is running. It is a `BaseException`
(like KeyboardInterrupt), so no `except Exception` swallows it: it unwinds
the run, whose `finally` blocks wait for the asynchronous checkpoint saves
in flight to commit (`RunCheckpoints.close`) and release the workdir lock;
then the command line logs one line and exits with `exit_status`: 128 + the
signal number, the shell's convention (143 for SIGTERM, 130 for SIGINT).
Nothing is saved that was not already being saved: the rerun resumes from
the newest committed checkpoint, as after a SIGKILL. A second signal during
that wind-down kills the process at once (default action), which the resume
handles as well.
"""
from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
  """The process received SIGTERM or SIGINT; `exit_status` is 128 + signal."""

  def __init__(self, signum: int):
    self.signum = signum
    self.name = signal.Signals(signum).name
    self.exit_status = 128 + signum
    super().__init__(f"stopped by {self.name}")


def _raise(signum, frame) -> None:
  del frame
  for s in SIGNALS:  # A second signal: the default action, at once.
    signal.signal(s, signal.SIG_DFL)
  raise Interrupted(signum)


def install() -> None:
  """Makes SIGTERM and SIGINT raise `Interrupted` in the main thread.

  No-op outside the main thread (signal handlers can only be set there).
  """
  if threading.current_thread() is threading.main_thread():
    for s in SIGNALS:
      signal.signal(s, _raise)
