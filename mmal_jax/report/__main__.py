"""Compares several workdirs of a sweep (`mmal_jax.sweep`):

  python -m mmal_jax.report --workdirs A,B,... --out DIR [--metric NAME]

writes DIR/sweep.md and DIR/sweep.png. Exit status 2 with one line on
stderr for a workdir or output folder that cannot be used.

The command line only: the report of one workdir is `mmal_jax.report` (the
package), which `mmal_jax.sweep` builds on.
"""
from __future__ import annotations

import sys
from typing import Sequence

from absl import app
from absl import flags

from mmal_jax import cli
from mmal_jax import sweep

_PROG = "mmal_jax.report"

flags.DEFINE_list("workdirs", None, "Workdirs to compare (local or gs://).",
                  required=True)
flags.DEFINE_string("out", None, "Folder for sweep.md and sweep.png.",
                    required=True)
flags.DEFINE_string("metric", "", "Metric to compare; default: the "
                    "workdirs' report.main_metric.")


def main(argv: Sequence[str]) -> None:
  """`python -m mmal_jax.report --workdirs A,B --out DIR`: the sweep report."""
  if len(argv) > 1:
    cli.fail(_PROG, f"unexpected arguments {argv[1:]}; pass only flags.")
  f = flags.FLAGS
  sys.exit(sweep.command(f.workdirs or [], f.out, f.metric))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser(_PROG))
