"""One process of a 2-process jax.distributed job on 127.0.0.1 (see test_multihost).

  python multihost_worker.py PROCESS_ID PORT WORKDIR
Process 0 writes WORKDIR/fingerprint.json (acquisition over all 4 devices of
the job) next to the experiment's own outputs.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
import conftest  # noqa: E402,F401  (the tests' shared compilation cache)


def main(process_id: int, port: str, workdir: str):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=process_id)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  import test_device_independence  # pylint: disable=g-import-not-at-top
  import test_loop  # pylint: disable=g-import-not-at-top
  from mmal_jax import loop  # pylint: disable=g-import-not-at-top
  fingerprint = test_device_independence.fingerprint(4)
  if process_id == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "fingerprint.json"), "w") as f:
      json.dump(fingerprint, f)
  loop.run_experiment(test_loop.tiny_config(strategies=("mmal",)),
                      os.path.join(workdir, "run"))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
