"""A test hook that kills the process at a named point of a run.

`MMAL_KILL_AT=NAME[:N]` in the environment makes the N-th (default first)
call of `point(NAME)` send SIGKILL to this process: the way a preempted
cluster job dies, with no cleanup, no flushing and no exception handlers.
The resume tests use it to stop runs at exact places (mid-training, during an
asynchronous save, mid-acquisition, between rounds, while writing outputs).
Unset, `point` costs one dictionary lookup.
"""
from __future__ import annotations

import collections
import os
import signal

_counts = collections.Counter()


def point(name: str) -> None:
  """Kills this process here if `MMAL_KILL_AT` names this point and count."""
  spec = os.environ.get("MMAL_KILL_AT")
  if not spec:
    return
  target, _, count = spec.partition(":")
  if target != name:
    return
  _counts[name] += 1
  if _counts[name] == int(count or 1):
    os.kill(os.getpid(), signal.SIGKILL)
