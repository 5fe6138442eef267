r"""Runs an active-learning experiment.

  python -m mmal_jax.main --config configs/demo.py --workdir /tmp/demo \
      [--config.num_rounds=3 --config.seeds=0,1 ...]

Rerunning the same command resumes a preempted run. With the file oracle the
run stops when a round's answers are missing; write them and rerun.
Multi-host (TPU pods, several GPU hosts): pass --multihost so that
`jax.distributed` connects the processes (see launch/).

Exit status: 0 done (or nothing left to do); 2 a problem with the command,
its config, its data or its workdir (also: another process holds its lock,
a gs:// path cannot be reached, the disk is full: "no space left on device"
and the path), named in one line on stderr (nothing bought or checkpointed
is lost: fix it and rerun the same command);
3 (`EXIT_AWAITING_ANNOTATIONS`) the file oracle waits for a round's answers;
143 / 130 stopped by SIGTERM / Ctrl-C (SIGINT) after the checkpoint saves in
flight committed, one line on stderr (`interrupt`): rerun to resume;
1 anything else (a bug: a traceback).
"""
from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mmal_jax import cli
from mmal_jax import compile_cache
from mmal_jax import config_lib
from mmal_jax import interrupt
from mmal_jax import logfile

# Else TensorFlow (the input pipeline; imported later, maybe by the config
# file) prints 4 lines about oneDNN on stderr; it only decodes and resizes.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

EXIT_USAGE = cli.EXIT_USAGE
EXIT_AWAITING_ANNOTATIONS = 3

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and resume directory.",
                               required=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (coordinator "
    "and process ids from the environment, as on Cloud TPU / SLURM).")

class _QuietCheckpointing(std_logging.Filter):
  """Drops orbax's per-save INFO lines; its warnings and errors stay, but
  one caused by a full disk loses its traceback (the run then stops with
  one line saying so, instead of a traceback per failed write)."""

  def filter(self, record):
    if "/orbax/" not in record.pathname:
      return True
    if record.exc_info and record.exc_info[1] is not None:
      from mmal_jax import fs  # pylint: disable=g-import-not-at-top
      if fs.no_space_left(record.exc_info[1]) is not None:
        record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING


def _fail(message: str) -> NoReturn:
  """Exits with status 2 and one readable line instead of a traceback."""
  cli.fail("mmal_jax.main", message)


def _first_line(error: BaseException) -> str:
  """The longest message in an exception chain, on one line."""
  messages = []
  while error is not None:
    messages += [a for a in error.args[:1] if isinstance(a, str)]
    error = error.__cause__ or error.__context__
  return max(messages, key=len, default="").replace("\n", "; ")


def disk_full_line(error: BaseException, workdir: str) -> str | None:
  """The one-line message for an error caused by a full disk (or quota) in
  any write of the run (config.json, checkpoints, logs, outputs), else
  None. Everything saved before it is intact, so freeing space and rerunning
  resumes."""
  from mmal_jax import fs  # pylint: disable=g-import-not-at-top
  path = fs.no_space_left(error)
  if path is None:
    return None
  return (f"no space left on device writing {path or workdir}: free space "
          f"there (or pass another --workdir) and rerun the same command; "
          f"nothing saved before is lost.")


def _parse_flags(argv):
  """absl's flag parsing; every command-line mistake becomes one line, 2.

  ml_collections reports an unknown `--config.KEY` with an AttributeError /
  KeyError from deep inside flag parsing (its message names the key and the
  nearest one), a value of the wrong type with absl's IllegalFlagValueError,
  and a config file it cannot load with OSError / an import-time error.
  """
  path = next((b if a == "--config" else a.removeprefix("--config=")
               for a, b in zip(argv, argv[1:] + [""])
               if a == "--config" or a.startswith("--config=")), "")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _fail(f"unknown config key in the command line: {_first_line(e)} The "
          f"config file lists every key; --config.KEY=VALUE may only change "
          f"one.")
  except flags.IllegalFlagValueError as e:
    if "Error whilst parsing config file" in str(e):  # Its get_config raised.
      _fail(f"cannot load --config {path}: {_innermost(e)}")
    detail = _first_line(e).removeprefix("flag ")
    _fail(f"bad value in the command line: {detail}. Give a value of the "
          f"field's type (see the config file).")
  except flags.Error as e:
    _fail(f"{_first_line(e)} (see --helpfull).")
  except Exception as e:  # pylint: disable=broad-except
    # The config file itself failed while the flag loaded it (syntax, import).
    _fail(f"cannot load --config {path}: {_innermost(e)}")


def _innermost(error: BaseException) -> str:
  """`Type: message` of the first cause in an exception chain (with the
  file and line of a syntax error)."""
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  where = ""
  if isinstance(error, SyntaxError) and error.filename:
    where = f" ({error.filename}:{error.lineno})"
  return f"{type(error).__name__}: {_first_line(error)}{where}"


def _load_config():
  """The config (checked later, with the data and workdir, all at once);
  a config file that cannot load is one line, exit 2."""
  path = flags.FLAGS["config"].config_filename
  if not os.path.isfile(path.partition(":")[0]):
    _fail(f"--config {path}: no such file; see configs/ for the configs.")
  try:
    config = _CONFIG.value
    config.keys()  # ml_collections reports a failed load on first use.
  except Exception as e:  # pylint: disable=broad-except
    # Any error of the user's config file (syntax, import, raise).
    _fail(f"cannot load --config {path}: {_innermost(e)}")
  return config


def main(argv):
  interrupt.install()
  try:
    _main(argv)
  except interrupt.Interrupted as e:
    message = (f"mmal_jax.main: {e}: the checkpoint saves in flight were "
               f"completed; rerun the same command to resume (exit status "
               f"{e.exit_status}).")
    logfile.note(message)
    print(message, file=sys.stderr)
    sys.exit(e.exit_status)


def _main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}: settings are "
          f"--config.KEY=VALUE.")
  config = _load_config()
  # Imported once the command line and config file are read: a mistake in
  # them is reported without the seconds TensorFlow and the models take.
  # pylint: disable=g-import-not-at-top
  from mmal_jax import loop
  from mmal_jax import mmcsal
  from mmal_jax import report
  from mmal_jax import run_state
  from mmal_jax import train
  from mmal_jax.data import image_check
  from mmal_jax import workdir_lock
  from mmal_jax.data import oracle
  # pylint: enable=g-import-not-at-top
  # Problems a user fixes (config, data, workdir files, answers): one line, 2.
  user_errors = (config_lib.ConfigError, run_state.RunStateError,
                 report.MetricsFileError, oracle.AnswerFileError,
                 train.TrainingDiverged, image_check.UndecodableImage,
                 workdir_lock.WorkdirBusy)
  logging.get_absl_handler().addFilter(_QuietCheckpointing())
  logfile.install()
  cache = compile_cache.enable()  # Before the first compile.
  if _MULTIHOST.value:
    jax.distributed.initialize()
  try:
    logging.info("%d process(es), %d device(s): %s", jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
    logging.info("Compilation cache: %s ($%s)", cache or "off",
                 compile_cache.ENV)
    if config.get("kind", None) == mmcsal.KIND:
      text = mmcsal.run_cold_start(mmcsal.normalize(config), _WORKDIR.value)
    else:
      text = loop.run_experiment(config_lib.normalize(config), _WORKDIR.value)
  except user_errors as e:
    logfile.note(f"error: {e}")
    _fail(str(e))
  except oracle.AwaitingAnnotations as e:
    logging.warning("%s", e)
    print(e)
    sys.exit(EXIT_AWAITING_ANNOTATIONS)
  except Exception as e:  # pylint: disable=broad-except
    line = disk_full_line(e, _WORKDIR.value)
    if line is None:
      raise  # A bug: the traceback.
    logfile.note(f"error: {line}")
    _fail(line)
  if jax.process_index() == 0:
    print(text)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.exit(app.run(main, flags_parser=_parse_flags))
