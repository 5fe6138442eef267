"""One process of a 2-process jax.distributed job running the input pipeline.

  python pipeline_multihost_worker.py PROCESS_ID PORT OUT_DIR
Writes OUT_DIR/reads_<process>.json (the item indices this process read) and,
on process 0, OUT_DIR/result.json (the gathered batches and embeddings).
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: str, out_dir: str):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=process_id)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import test_pipeline  # pylint: disable=g-import-not-at-top
  from mmal_jax import sharding  # pylint: disable=g-import-not-at-top
  pool, reads = test_pipeline.counting_pool()
  result = test_pipeline.pipeline_fingerprint(pool, sharding.make_mesh())
  gathered = {k: multihost_utils.process_allgather(v, tiled=True).tolist()
              for k, v in result.items()}
  with open(os.path.join(out_dir, f"reads_{process_id}.json"), "w") as f:
    json.dump(reads, f)
  if process_id == 0:
    with open(os.path.join(out_dir, "result.json"), "w") as f:
      json.dump(gathered, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
