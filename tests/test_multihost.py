"""A 2-process jax.distributed job on 127.0.0.1 (2 CPU devices each): acquisition
gives the single-process results, and a whole experiment runs with one writer."""
import json
import os
import socket
import subprocess
import sys

import test_device_independence
from mmal_jax import report


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes(tmp_path):
  here = os.path.dirname(__file__)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(sys.path)
  port = str(_free_port())
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(here, "multihost_worker.py"), str(i), port,
       str(tmp_path)], env=env, cwd=here, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  with open(tmp_path / "fingerprint.json") as f:
    distributed = json.load(f)
  assert distributed == test_device_independence.fingerprint(1)
  rows = report.read_rows(str(tmp_path / "run" / "metrics.jsonl"))
  assert sorted(r["round"] for r in rows) == [0, 1, 2]
  assert rows[-1]["queries"] == 16
  assert (tmp_path / "run" / "results.md").exists()
