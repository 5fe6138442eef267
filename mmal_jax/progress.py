"""Progress and throughput: what a run reports while it runs.

The figures people compare across accelerators (as big_vision and clu log
them): examples/s, steps/s and examples/s per device while training; an ETA
in h:m:s over a whole experiment that leaves compilation out; device-hours
spent so far. Pure bookkeeping on host clocks; nothing here touches devices.
"""
from __future__ import annotations

import time

from absl import logging


def hms(seconds: float) -> str:
  """`seconds` as "H:MM:SS" ("D days, H:MM:SS" past a day); "?" if unknown."""
  if seconds is None or not seconds >= 0 or seconds == float("inf"):
    return "?"
  seconds = int(round(seconds))
  days, seconds = divmod(seconds, 86400)
  text = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
  return f"{days} day{'s' * (days > 1)}, {text}" if days else text


class Throughput:
  """Training throughput between marks, the first interval left out.

  `mark(step)` is called after the host has waited for `step` (a metrics
  fetch): the interval to the previous mark is then device time. The first
  interval holds the step's compilation, so it only starts the clock.
  """

  def __init__(self, examples_per_step: int, num_devices: int,
               clock=time.perf_counter):
    self.examples_per_step = examples_per_step
    self.num_devices = num_devices
    self._clock = clock
    self._last = None  # (step, time) of the previous mark.

  def mark(self, step: int) -> dict[str, float] | None:
    """Rates since the previous mark: `examples_per_s`, `steps_per_s`,
    `examples_per_s_per_device`; None at the first mark or without steps."""
    now = self._clock()
    last, self._last = self._last, (step, now)
    if last is None or step <= last[0] or now <= last[1]:
      return None
    steps_per_s = (step - last[0]) / (now - last[1])
    examples_per_s = steps_per_s * self.examples_per_step
    return {"steps_per_s": steps_per_s, "examples_per_s": examples_per_s,
            "examples_per_s_per_device": examples_per_s / self.num_devices}


class Eta:
  """`done`/`total` units of an experiment and an ETA in h:m:s.

  The rate is measured from the first unit this process finishes on: that
  unit holds the compilations, which later units reuse. `unit` names what
  is counted ("rounds", "selections"); `log()` is called after each.
  """

  def __init__(self, total: int, done: int, unit: str = "rounds",
               clock=time.perf_counter):
    self.total, self.done, self.unit = total, done, unit
    self._clock = clock
    self._start, self._timed = None, 0

  def eta_s(self) -> float | None:
    """Seconds left at the measured rate; None before a rate exists."""
    if not self._timed:
      return None
    return ((self._clock() - self._start) / self._timed
            * (self.total - self.done))

  def __call__(self) -> str:
    """Counts one unit done; logs and returns the progress line."""
    self.done += 1
    if self._start is None:
      self._start = self._clock()
    else:
      self._timed += 1
    line = f"Progress: {self.done}/{self.total} {self.unit}"
    if self._timed:
      line += (f", ETA {hms(self.eta_s())} (compilation, in the first "
               f"{self.unit[:-1] if self.unit.endswith('s') else self.unit},"
               f" left out)")
    logging.info("%s", line)
    return line


def device_hours(seconds: float, num_devices: int) -> float:
  """Device-hours of `seconds` of wall time on `num_devices` devices."""
  return seconds * num_devices / 3600.0
