"""The tests' tiny experiment (`test_loop.tiny_config`) as a config file for
the command line:

  python -m mmal_jax.main --config tests/tiny_experiment.py:mmal --workdir W

The argument is a comma-separated list of strategies (default "random,mmal").
"""
import os
import sys


def get_config(strategies: str = "random,mmal"):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import test_loop  # pylint: disable=g-import-not-at-top
  return test_loop.tiny_config(strategies=tuple(strategies.split(",")))
