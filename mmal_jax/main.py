r"""Runs an active-learning experiment.

  python -m mmal_jax.main --config configs/demo.py --workdir /tmp/demo \
      [--config.num_rounds=3 --config.seeds=0,1 ...]

Rerunning the same command resumes a preempted run. With the file oracle the
run stops when a round's answers are missing; write them and rerun.
Multi-host (TPU pods, several GPU hosts): pass --multihost so that
`jax.distributed` connects the processes (see launch/).
"""
from __future__ import annotations

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mmal_jax import config_lib
from mmal_jax import loop
from mmal_jax.data.oracle import AwaitingAnnotations

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and resume directory.",
                               required=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (coordinator "
    "and process ids from the environment, as on Cloud TPU / SLURM).")


class _QuietCheckpointing(std_logging.Filter):
  """Drops orbax's per-save INFO lines; its warnings and errors stay."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING
            or "/orbax/" not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietCheckpointing())
  if _MULTIHOST.value:
    jax.distributed.initialize()
  config = config_lib.validate(_CONFIG.value)
  logging.info("%d process(es), %d device(s): %s", jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  try:
    text = loop.run_experiment(config, _WORKDIR.value)
  except AwaitingAnnotations as e:
    logging.warning("%s", e)
    print(e)
    return
  if jax.process_index() == 0:
    print(text)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.exit(app.run(main))
