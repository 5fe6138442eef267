"""Progress lines, throughput and device-hours on fake clocks."""
import pytest

from mmal_jax import progress


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


@pytest.mark.parametrize("seconds,text", [
    (0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"),
    (183421, "2 days, 2:57:01"), (86400, "1 day, 0:00:00"), (None, "?"),
    (float("nan"), "?"), (-1, "?")])
def test_hms(seconds, text):
  assert progress.hms(seconds) == text


def test_throughput_leaves_the_first_interval_out():
  clock = FakeClock()
  throughput = progress.Throughput(examples_per_step=64, num_devices=8,
                                   clock=clock)
  clock.now += 30.0  # The first fetch waited for the compilation.
  assert throughput.mark(1) is None
  clock.now += 2.0
  rates = throughput.mark(5)  # 4 steps in 2 s.
  assert rates == pytest.approx({"steps_per_s": 2.0, "examples_per_s": 128.0,
                                 "examples_per_s_per_device": 16.0})
  assert throughput.mark(5) is None  # No step since the last mark.


def test_eta_counts_from_the_first_unit_on(caplog):
  clock = FakeClock()
  eta = progress.Eta(total=10, done=2, unit="rounds", clock=clock)
  assert eta.eta_s() is None
  assert eta() == "Progress: 3/10 rounds"  # Held the compilation.
  clock.now += 3600.0
  assert eta() == ("Progress: 4/10 rounds, ETA 6:00:00 (compilation, in the "
                   "first round, left out)")
  clock.now += 1800.0
  assert eta.eta_s() == pytest.approx(5400.0 * 6)  # 1 timed unit, 6 left.


def test_device_hours():
  assert progress.device_hours(1800.0, 8) == 4.0
