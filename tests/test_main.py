"""The command line: bad input exits with status 2 and one line naming it."""
import errno
import json
import os
import subprocess
import sys

import jax
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ONE_PASS = pytest.mark.skipif(
    jax.device_count() > 1, reason="1-device pass only: the command line's "
    "checks come before any device work (CI time)")


def _run_main(workdir, *overrides):
  cmd = [sys.executable, "-m", "mmal_jax.main", "--config", "configs/demo.py",
         "--workdir", str(workdir), *overrides]
  result = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True,
                          timeout=300)
  return result.returncode, result.stderr


@_ONE_PASS
@pytest.mark.parametrize("overrides, expected", [
    (["--config.budgt=3"], ["unknown config key", "budgt", "budget"]),
    (["--config.train.nope=1"], ["unknown config key", "nope"]),
    (["--config.strategies=mmal,bald"], ["unknown strategy 'bald'"]),
    (["--config.data.num_groups=20", "--config.data.num_eval_groups=5",
      "--config.data.pretrain_size=8", "--config.budget=50"],
     ["config.budget x config.num_rounds = 300", "40 matched units"]),
])
def test_bad_config_is_a_one_line_error(tmp_path, overrides, expected):
  code, stderr = _run_main(tmp_path / "w", *overrides)
  assert code == 2, stderr
  assert not (tmp_path / "w" / "config.json").exists()  # Fixing it can resume.
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("mmal_jax.main: error:")
  for text in expected:
    assert text in last


@_ONE_PASS
def test_workdir_of_another_config_is_refused_and_kept(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  saved = {"budget": 1}
  (workdir / "config.json").write_text(json.dumps(saved))
  (workdir / "metrics.jsonl").write_text('{"round": 0}\n')
  code, stderr = _run_main(workdir)
  assert code == 2, stderr
  assert "holds a run of a different config" in stderr
  assert "--workdir" in stderr
  assert json.loads((workdir / "config.json").read_text()) == saved
  assert (workdir / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_full_disk_writing_config_json_is_one_line(tmp_path, monkeypatch):
  """#17 item 7: the first write of a run (config.json) on a full disk: the
  error names the path and "no space left"; nothing is left behind (no
  config.json, no lock), so the same command runs once space is freed."""
  from mmal_jax import fs  # pylint: disable=g-import-not-at-top
  from mmal_jax import loop  # pylint: disable=g-import-not-at-top
  from mmal_jax import main  # pylint: disable=g-import-not-at-top
  from test_loop import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  write_text = fs.write_text

  def full(path, text):
    if path.endswith("config.json"):
      raise OSError(errno.ENOSPC, "No space left on device", path)
    write_text(path, text)

  monkeypatch.setattr(fs, "write_text", full)
  with pytest.raises(OSError) as error:
    loop.run_experiment(tiny_config(strategies=("mmal",)), workdir)
  line = main.disk_full_line(error.value, workdir)
  assert line.startswith(
      f"no space left on device writing {workdir}/config.json: free space")
  assert "\n" not in line
  assert sorted(os.listdir(workdir)) == []  # Lock released, nothing written.
  assert main.disk_full_line(ValueError("other"), workdir) is None


def test_a_seed_or_strategy_named_twice_is_refused():
  """#17 item 10: `--config.seeds=0,0` would run one run twice in a workdir
  (rebuying every round); refused up front, for both experiment kinds."""
  from mmal_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mmal_jax import mmcsal  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.seeds, config.strategies = (0, 1, 0), ("mmal", "random")
  found = config_lib.problems(config)
  assert ("config.seeds names 0 more than once ((0, 1, 0)); each run is one "
          "strategy and one seed: list each once (e.g. --config.seeds=0,1)."
          ) in found
  config.seeds, config.strategies = (0,), ("mmal", "mmal")
  assert any(p.startswith("config.strategies names 'mmal' more than once")
             for p in config_lib.problems(config))
  cold = config_lib.from_file(os.path.join(_ROOT, "configs",
                                           "mmcsal_digits.py"))
  cold.seeds = (3, 3)
  with pytest.raises(config_lib.ConfigError, match="config.seeds names 3 "):
    mmcsal.validate(cold)


def test_orbax_errors_of_a_full_disk_lose_their_traceback():
  """#17 item 7: orbax logs a failed background write with its traceback;
  for a full disk the line stays, the traceback goes."""
  import logging  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from mmal_jax import main  # pylint: disable=g-import-not-at-top
  try:
    raise OSError(errno.ENOSPC, "No space left on device", "/w/ckpt/x")
  except OSError:
    exc_info = sys.exc_info()
  record = logging.LogRecord("orbax", logging.ERROR,
                             "/site-packages/orbax/checkpoint/async.py", 1,
                             "write failed", None, exc_info)
  assert main._QuietCheckpointing().filter(record)  # pylint: disable=protected-access
  assert record.exc_info is None
  assert logging.Formatter().format(record) == "write failed"
  other = logging.LogRecord("orbax", logging.INFO,
                            "/site-packages/orbax/checkpoint/x.py", 1,
                            "saved", None, None)
  assert not main._QuietCheckpointing().filter(other)  # pylint: disable=protected-access
