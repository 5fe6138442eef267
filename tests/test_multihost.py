"""Multi-process jax.distributed jobs on 127.0.0.1 (gloo CPU collectives):
2 processes x 4 devices give the acquisitions, selections, metrics and final
parameters of 1 process x 8 devices, in the pool and the stream regime, also
after both processes are SIGKILLed mid-run and the job is started again.

Each job runs `multihost_worker.py` in subprocesses that set their own device
counts, so these tests run in the 1-device pass of CI only.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import test_device_independence
import test_loop
from mmal_jax import report
from mmal_jax import workdir_lock
from mmal_jax.data import AnnotationState

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        jax.device_count() > 1, reason="multi-process jobs set their own "
        "device counts (8 per job): run once, in the 1-device pass")]

_HERE = os.path.dirname(os.path.abspath(__file__))
_TIMING = set(report.TIMING_KEYS)
_RUN = os.path.join("runs", "mmal", "seed_0")
# Round 1 trains 2 steps, round 2 4 (checkpointed at each): the 4th
# checkpoint is mid-way through round 2.
_KILL_AT = "train_checkpoint:4"


def _reserve_port() -> socket.socket:
  """A socket bound to a free port, held for the job's lifetime.

  Probing a free port and releasing it lets another process (a GCS
  emulator, another job: a full suite starts many) take it before the
  coordinator binds it, and that job's processes then join the wrong
  coordinator. Held with SO_REUSEPORT (and not listening), no other bind
  gets the port, but jax's gRPC coordinator, which sets SO_REUSEPORT too,
  does.
  """
  s = socket.socket()
  s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  s.bind(("127.0.0.1", 0))
  return s


def _job(num_processes, out_dir, steps, kill_at=None, timeout_s=400):
  """Runs a job of `num_processes` worker processes; their exit statuses.

  When one process dies (a kill, a crash), the others are SIGKILLed at once,
  as a cluster scheduler ends a job; none outlives this call. Each process'
  output goes to out_dir/process_<i>.log (quoted on failure).
  """
  os.makedirs(out_dir, exist_ok=True)
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "MMAL_KILL_AT")}
  env["PYTHONPATH"] = os.pathsep.join(sys.path)
  reserved = _reserve_port()
  port = str(reserved.getsockname()[1])
  logs = [os.path.join(out_dir, f"process_{i}.log")
          for i in range(num_processes)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(_HERE, "multihost_worker.py"), str(i),
           str(num_processes), port, str(out_dir), ",".join(steps),
           *([kill_at] if kill_at else [])],
          env=env, cwd=_HERE, stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout_s
  try:
    while any(p.poll() is None for p in procs):
      failed = any(p.poll() not in (None, 0) for p in procs)
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
      p.wait()
    reserved.close()
  codes = [p.returncode for p in procs]
  if kill_at is None and codes != [0] * num_processes:
    pytest.fail(f"{num_processes}-process job {steps} exited with {codes}:\n"
                + "\n".join(f"---- process {i} ----\n{_tail(log)}"
                            for i, log in enumerate(logs)))
  return codes


def _tail(path, chars=4000):
  with open(path) as f:
    return f.read()[-chars:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """1 process x 8 devices: the reference."""
  out = tmp_path_factory.mktemp("single")
  _job(1, out, ["pool", "stream"])
  return out


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
  """2 processes x 4 devices: acquisition and the stream regime, then the
  pool regime killed mid-run (both processes) and run again to its end."""
  out = tmp_path_factory.mktemp("distributed")
  codes = _job(2, out, ["acquisition", "stream", "pool"], kill_at=_KILL_AT)
  at_kill = {"rows": report.read_rows(str(out / "pool" / "metrics.jsonl")),
             "finished": (out / "pool" / "final_params.npz").exists()}
  _job(2, out, ["pool"])
  return out, codes, at_kill


def _rows(workdir):
  return sorted(report.read_rows(str(workdir / "metrics.jsonl")),
                key=lambda r: r["round"])


def _assert_same_run(got, want):
  """Same selections and counts; metrics (but timings) and final parameters
  equal to float32 round-off: gloo's all-reduce across processes sums in
  another order than the single process' one."""
  got_rows, want_rows = _rows(got), _rows(want)
  assert len(got_rows) == len(want_rows)
  for a, b in zip(got_rows, want_rows):
    assert a.keys() == b.keys()
    for key in a.keys() - _TIMING:
      if isinstance(b[key], float):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
      else:
        assert a[key] == b[key], key
  for name in ("annotation.json", "annotated/round_1.json",
               "annotated/round_2.json"):
    assert AnnotationState.load(str(got / _RUN / name)).log == (
        AnnotationState.load(str(want / _RUN / name)).log), name
  with np.load(got / "final_params.npz") as a, \
       np.load(want / "final_params.npz") as b:
    assert sorted(a) == sorted(b)
    for key in a:
      # Attention key biases get no gradient (softmax ignores a shift), so
      # Adam's normalised steps turn their round-off into steps of ~lr.
      atol = 1e-3 if key.endswith("['key']['bias']") else 1e-5
      np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=atol,
                                 err_msg=key)


def test_acquisition_of_two_processes_is_that_of_one(distributed):
  with open(distributed[0] / "fingerprint.json") as f:
    got = json.load(f)
  assert "error" not in got, got["error"]
  assert got == test_device_independence.fingerprint(1)


def test_stream_run_of_two_processes_is_that_of_one(single, distributed):
  _assert_same_run(distributed[0] / "stream", single / "stream")


def test_pool_run_killed_on_both_processes_resumes_as_one(single,
                                                          distributed):
  out, codes, at_kill = distributed
  assert -signal.SIGKILL in codes, codes
  assert [r["round"] for r in at_kill["rows"]] == [0, 1]  # Killed in round 2.
  assert not at_kill["finished"]
  _assert_same_run(out / "pool", single / "pool")
  assert (out / "pool" / "results.md").exists()


def test_busy_or_lost_workdir_stops_every_process(tmp_path):
  """Process 0 alone takes the workdir's lock; when it is refused, the
  other process stops too (one ConfigError line each, exit status 2 from
  the CLI). Before, it waited for process 0 at the config.json barrier
  until the collective timed out (30 s with gloo here), then stopped with a
  JaxRuntimeError traceback. Likewise when process 0 loses the lock
  mid-run (another process broke it as stale): every process stops with
  WorkdirLost before the next checkpoint."""
  busy = tmp_path / "busy"
  lock = workdir_lock.take(str(busy))  # A live holder: this process.
  try:
    _job(2, tmp_path, ["busy", "lost"], timeout_s=200)
  finally:
    lock.release()
  stopped = [json.loads((tmp_path / f"busy_{i}.json").read_text())
             for i in range(2)]
  assert stopped[0]["type"] == "WorkdirBusy", stopped
  assert f"in use by process {os.getpid()}" in stopped[0]["message"]
  assert stopped[1]["type"] == "ConfigError", stopped
  assert stopped[1]["message"].startswith("process 0 of this job could not "
                                          "go on")
  assert not (busy / "config.json").exists()
  lost = [json.loads((tmp_path / f"lost_{i}.json").read_text())
          for i in range(2)]
  assert [s["type"] for s in lost] == ["WorkdirLost"] * 2, lost
  assert "this process lost the workdir's lock" in lost[0]["message"]
  assert lost[1]["message"].startswith("process 0 of this job lost")
  # The new holder's lock is left alone.
  assert (tmp_path / "lost" / "lock").read_bytes() == test_loop.LOST_HOLDER
