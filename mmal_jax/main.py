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
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mmal_jax import config_lib
from mmal_jax import loop
from mmal_jax import mmcsal
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


def _fail(message: str) -> NoReturn:
  """Exits with status 2 and one readable line instead of a traceback."""
  print(f"mmal_jax.main: error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing; an unknown `--config.KEY` becomes a usage error.

  ml_collections reports unknown keys with an AttributeError/KeyError from
  deep inside flag parsing; its message names the key and the nearest one.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    messages, error = [], e
    while error is not None:
      messages += [a for a in error.args[:1] if isinstance(a, str)]
      error = error.__context__
    detail = max(messages, key=len, default=repr(e)).replace("\n", "; ")
    _fail(f"unknown config key in the command line: {detail} The config "
          f"file lists every key; --config.KEY=VALUE may only change one.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietCheckpointing())
  if _MULTIHOST.value:
    jax.distributed.initialize()
  logging.info("%d process(es), %d device(s): %s", jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  try:
    if _CONFIG.value.get("kind", None) == mmcsal.KIND:
      text = mmcsal.run_cold_start(mmcsal.validate(_CONFIG.value),
                                   _WORKDIR.value)
    else:
      config = config_lib.validate(_CONFIG.value)
      text = loop.run_experiment(config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    _fail(str(e))
  except AwaitingAnnotations as e:
    logging.warning("%s", e)
    print(e)
    return
  if jax.process_index() == 0:
    print(text)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.exit(app.run(main, flags_parser=_parse_flags))
