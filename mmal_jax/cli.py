"""What every command of mmal_jax does with bad input.

A mistake in a command line (an unknown or missing flag, a bad value, an
output folder that cannot be written) is one line on stderr,
`PROG: error: WHAT; what to change`, and exit status 2 (`EXIT_USAGE`),
before any work. absl alone would print two lines and exit with status 1,
the status of a crash; these helpers give the absl commands (`main`,
`report`, `annotate`, the absl benchmarks) and the argparse ones the same
answer.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from absl import flags

EXIT_USAGE = 2


def fail(prog: str, message: str) -> NoReturn:
  """Prints `PROG: error: MESSAGE` (whitespace folded onto one line) on
  stderr and exits with status 2."""
  print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def absl_flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `absl.app.run(main, flags_parser=...)`: absl's
  own parsing, with every flag error (unknown flag, missing required flag,
  bad value, failed validator) as `fail`'s one line."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, f"{e} (see --helpfull).")

  return parse


def output_folder_problem(path: str) -> str | None:
  """Why folder `path` (local or gs://) cannot take a command's output, or
  None: its store does not answer (`fs.check_reachable`, a bounded wait) or
  it cannot be written (`fs.check_writable_dir`: a probe file written and
  removed, nothing left behind). Cost: a few small requests."""
  from mmal_jax import fs  # pylint: disable=g-import-not-at-top
  return fs.check_reachable(path) or fs.check_writable_dir(path)


def output_folder(path: str) -> str:
  """An argparse `type=` for an output folder: `path`, or an
  ArgumentTypeError (argparse's one line and status 2) saying why it
  cannot be used."""
  problem = output_folder_problem(path)
  if problem:
    raise argparse.ArgumentTypeError(
        f"{problem}; give a folder this process can write")
  return path


def check_output_folder(prog: str, flag: str, path: str) -> None:
  """`fail`s, naming `flag`, if `path` cannot take output (see
  `output_folder_problem`); for absl commands, first thing in `main`."""
  problem = output_folder_problem(path)
  if problem:
    fail(prog, f"{flag}: {problem}; give a folder this process can write.")
