"""Compares a test module's `fingerprint(num_devices)` on 1, 3 and 8 devices.

With 8 (forced host) devices the meshes are compared in-process; on a
single-device run the 8-device fingerprint comes from a subprocess.
"""
import json
import os
import subprocess
import sys

import jax


def assert_same_on_every_device_count(module: str, fingerprint) -> None:
  """`fingerprint(n)` (a JSON-able dict) is the same for n = 1 and 3 / 8."""
  here = fingerprint(1)
  if jax.device_count() >= 8:
    others = {n: fingerprint(n) for n in (3, 8)}
  else:
    env = dict(os.environ,
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join(sys.path))
    code = (f"import json, {module} as t; "
            "print(json.dumps(t.fingerprint(8)))")
    run = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True,
                         cwd=os.path.dirname(__file__))
    others = {8: json.loads(run.stdout.strip().splitlines()[-1])}
  for n, other in others.items():
    for key, value in here.items():
      assert other[key] == value, f"{key} differs between 1 and {n} devices"
