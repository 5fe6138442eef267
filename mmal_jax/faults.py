"""A test hook that kills the process at a named point of a run.

`MMAL_KILL_AT=NAME[:N[:SIGNAL]]` in the environment makes the N-th (default
first) call of `point(NAME)` send SIGKILL (or SIGNAL: TERM, INT) to this
process. SIGKILL is the way a preempted cluster job dies, with no cleanup,
no flushing and no exception handlers; TERM and INT test the graceful stop
(`interrupt`).
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
  target, _, rest = spec.partition(":")
  if target != name:
    return
  count, _, signal_name = rest.partition(":")
  _counts[name] += 1
  if _counts[name] == int(count or 1):
    os.kill(os.getpid(), getattr(signal, f"SIG{signal_name or 'KILL'}"))
