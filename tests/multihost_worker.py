"""One process of a multi-process jax.distributed job on 127.0.0.1, or a
single process, running tiny experiments (see test_multihost).

  python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR \
      STEP[,STEP...] [KILL_AT]

Every process gets 8 / NUM_PROCESSES CPU devices (a job has 8 in all);
NUM_PROCESSES=1 runs alone (no jax.distributed). The steps, in order:
"acquisition": process 0 writes OUT_DIR/fingerprint.json (the acquisition
kernels over all 8 devices of the job); "pool" / "stream": runs (or resumes)
`experiment_config(regime)` in OUT_DIR/<regime>, then process 0 writes
OUT_DIR/<regime>/final_params.npz (the run's last checkpointed parameters,
gathered); "busy": runs the stream experiment in OUT_DIR/busy, whose lock
the test holds, and every process writes OUT_DIR/busy_<PROCESS_ID>.json
(the exception it stopped with); "lost": runs it in OUT_DIR/lost, whose
lock process 0 hands to another holder (`test_loop.LOST_HOLDER`) at its
first checkpoint, and writes OUT_DIR/lost_<PROCESS_ID>.json so. KILL_AT
(an MMAL_KILL_AT value) applies to the last step only.
Run as a script only: it sets XLA_FLAGS for its device count.
"""
import json
import os
import sys
import traceback

NUM_DEVICES = 8
NUM_PROCESSES = int(sys.argv[2])
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           f"{NUM_DEVICES // NUM_PROCESSES}")
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
import conftest  # noqa: E402,F401  (the tests' shared compilation cache)
import numpy as np  # noqa: E402

STRATEGY = "mmal"


def experiment_config(regime: str):
  """The tiny experiment of `regime`. The pool run (the one test_multihost
  kills) is checkpointed at every training step, so that a kill
  mid-training resumes there; the stream run starts from scratch (the pool
  run covers pre-training)."""
  import test_loop  # pylint: disable=g-import-not-at-top
  overrides = {"strategies": (STRATEGY,), "train.checkpoint_every": 1}
  if regime == "stream":
    overrides.update(regime="stream", stream_buffer=12,
                     **{"init.kind": "scratch", "train.checkpoint_every": 0})
  return test_loop.tiny_config(**overrides)


def ckpt_dir(workdir: str) -> str:
  return os.path.join(workdir, "runs", STRATEGY, "seed_0", "ckpt")


def final_params(config, workdir: str) -> dict[str, np.ndarray]:
  """The run's newest checkpointed parameters, on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from mmal_jax import loop  # pylint: disable=g-import-not-at-top
  from mmal_jax import run_state  # pylint: disable=g-import-not-at-top
  like = loop.Experiment.create(config, workdir).initial_params(0)
  checkpoints = run_state.RunCheckpoints(ckpt_dir(workdir))
  meta, params = checkpoints.latest(like, lambda: None)
  checkpoints.close()
  assert (meta["phase"], meta["round"]) == ("evaluated", config.num_rounds)
  params = multihost_utils.process_allgather(params, tiled=True)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(params)[0]}


def main(process_id: int, num_processes: int, port: str, out_dir: str,
         steps: list[str], kill_at: str | None):
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes,
                               process_id=process_id)
  assert jax.device_count() == NUM_DEVICES
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)  # Into process_<i>.log (test_multihost).
  import test_device_independence  # pylint: disable=g-import-not-at-top
  from mmal_jax import loop  # pylint: disable=g-import-not-at-top
  for i, step in enumerate(steps):
    if kill_at and i == len(steps) - 1:
      os.environ["MMAL_KILL_AT"] = kill_at
    if step == "acquisition":
      try:
        fingerprint = test_device_independence.fingerprint(NUM_DEVICES)
      except Exception:  # pylint: disable=broad-except
        # Reported by the acquisition test; the experiments still run.
        fingerprint = {"error": traceback.format_exc()}
      if process_id == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "fingerprint.json"), "w") as f:
          json.dump(fingerprint, f)
      continue
    if step in ("busy", "lost"):
      workdir = os.path.join(out_dir, step)
      if step == "lost" and process_id == 0:
        import test_loop  # pylint: disable=g-import-not-at-top
        from mmal_jax import faults  # pylint: disable=g-import-not-at-top
        faults.point = test_loop.point_that_loses_the_lock(workdir, [])
      try:
        loop.run_experiment(experiment_config("stream"), workdir)
        stopped = None
      except Exception as e:  # pylint: disable=broad-except
        stopped = {"type": type(e).__name__, "message": str(e)}
      with open(os.path.join(out_dir, f"{step}_{process_id}.json"), "w") as f:
        json.dump(stopped, f)
      continue
    regime = step
    config = experiment_config(regime)
    workdir = os.path.join(out_dir, regime)
    loop.run_experiment(config, workdir)
    params = final_params(config, workdir)
    if process_id == 0:
      np.savez(os.path.join(workdir, "final_params.npz"), **params)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), NUM_PROCESSES, sys.argv[3], sys.argv[4],
       sys.argv[5].split(","), sys.argv[6] if len(sys.argv) > 6 else None)
