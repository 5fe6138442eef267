"""Every command answers a bad command line with one line and status 2,
before any work (`mmal_jax.cli`): the absl commands, which alone would print
two lines and exit 1, and the benchmarks, whose output folder is checked up
front rather than when their results are written."""
import os
import re
import subprocess
import sys

import jax
import pytest

from mmal_jax import cli

pytestmark = pytest.mark.skipif(
    jax.device_count() > 1, reason="1-device pass only: each case is a "
    "command in a subprocess that sets up no mesh")


def _command(module, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], env=env,
                        capture_output=True, text=True, timeout=120)


def _error_lines(stderr):
  return [line for line in stderr.splitlines()
          if line.strip() and "WARNING" not in line]


@pytest.mark.parametrize("module,args,message", [
    ("mmal_jax.report", ["--out=OUT"],
     "flag --workdirs=None: Flag --workdirs must have a value other than "
     "None"),
    ("mmal_jax.annotate", [], "Flag --workdir must have a value"),
    ("mmal_jax.benchmarks.acquisition", ["--quick", "--bogus"],
     "Unknown command line flag 'bogus'"),
    ("mmal_jax.benchmarks.acquisition", ["--quick"], "--out is required"),
    ("mmal_jax.benchmarks.acquisition", ["--quick", "--out=BAD"],
     "--out: BAD cannot be written: .*; give a folder this process can "
     "write"),
    ("mmal_jax.benchmarks.compare", ["--quick", "--out=BAD"],
     "--out: BAD cannot be written"),
    ("mmal_jax.benchmarks.compare", ["--plot", "--out=OUT"],
     "no rows to plot in OUT/compare.jsonl"),
])
def test_absl_commands_refuse_in_one_line(tmp_path, module, args, message):
  (tmp_path / "file").write_text("not a folder")
  paths = {"BAD": str(tmp_path / "file" / "out"), "OUT": str(tmp_path)}
  args = [re.sub("BAD|OUT", lambda m: paths[m.group()], a) for a in args]
  message = re.sub("BAD|OUT", lambda m: re.escape(paths[m.group()]), message)
  result = _command(module, *args)
  assert result.returncode == cli.EXIT_USAGE, result.stderr[-2000:]
  lines = _error_lines(result.stderr)
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"{module}: error: "), lines
  assert re.search(message, lines[0]), lines[0]
  assert sorted(os.listdir(tmp_path)) == ["file"]  # Nothing written.


@pytest.mark.parametrize("module", ["mmal_jax.benchmarks.train_step",
                                    "mmal_jax.benchmarks.input_pipeline"])
def test_argparse_benchmarks_check_their_output_folder_first(tmp_path,
                                                             module):
  """Before: each ran its whole benchmark, then stopped with a
  NotADirectoryError traceback writing its JSON."""
  (tmp_path / "file").write_text("not a folder")
  bad = tmp_path / "file" / "out"
  result = _command(module, "--quick" if "pipeline" in module else
                    "--steps=1", f"--out={bad}")
  assert result.returncode == cli.EXIT_USAGE, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and not result.stdout
  assert _error_lines(result.stderr)[-1].endswith(
      f"error: argument --out: {bad} cannot be written: Not a directory; "
      f"give a folder this process can write")


def test_output_folder_leaves_nothing_behind(tmp_path):
  new = tmp_path / "a" / "b"
  assert cli.output_folder(str(new)) == str(new)
  assert not (tmp_path / "a").exists()  # Created for the probe, removed.
  assert cli.output_folder_problem(str(tmp_path)) is None
