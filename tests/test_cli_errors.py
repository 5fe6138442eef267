"""The command line's up-front checks: exit 2, one line, workdir untouched.

Issue 8 (items 1-5, 7) and 13.12. Each case is a `python -m mmal_jax.main`
process (seconds of imports each): they run a few at a time.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import conftest

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
_PARALLEL = 4


def _tree(folder) -> dict:
  """Relative path -> bytes of every file under `folder`."""
  return {os.path.relpath(os.path.join(d, n), folder):
          open(os.path.join(d, n), "rb").read()
          for d, _, names in os.walk(folder) for n in names}


def write_config(path, overrides: str = "") -> str:
  """A config file returning `test_loop.tiny_config(<overrides>)`."""
  path.write_text(
      f"import sys\nsys.path.insert(0, {_TESTS!r})\n"
      f"from test_loop import tiny_config\n\n\n"
      f"def get_config():\n  return tiny_config({overrides})\n")
  return str(path)


def main_env() -> dict:
  """The test's environment (`run_main` adds each process's own copy of
  the compilation cache)."""
  return dict(os.environ)


def run_main(commands: dict, env: dict | None = None) -> dict:
  """name -> argv of mmal_jax.main; returns name -> (rc, stdout, stderr),
  running `_PARALLEL` processes at a time."""
  env = env or main_env()
  out, names = {}, list(commands)
  for start in range(0, len(names), _PARALLEL):
    batch = names[start:start + _PARALLEL]
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "mmal_jax.main", *commands[name]], cwd=_ROOT,
        env={**env, **conftest.child_cache_env(private=len(batch) > 1)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in batch}
    for name, proc in procs.items():
      stdout, stderr = proc.communicate(timeout=300)
      out[name] = (proc.returncode, stdout, stderr)
  return out


def error_line(result, *, alone: bool = True) -> str:
  """The one-line error of exit status 2: the last line of stderr, and
  (`alone`: the run had not started) the only one."""
  rc, _, stderr = result
  assert rc == 2, stderr
  assert "Traceback" not in stderr, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 or not alone, stderr
  assert lines[-1].startswith("mmal_jax.main: error:"), stderr
  return lines[-1]


@pytest.mark.slow
def test_config_that_cannot_run_is_one_line_and_leaves_no_trace(tmp_path):
  if jax.device_count() > 1:
    pytest.skip("The command line's checks come before any device work; the "
                "1-device pass runs this (CI time).")
  tiny = write_config(tmp_path / "tiny.py", 'strategies=("mmal",), **{'
                      '"oracle.kind": "file", "init.kind": "scratch"}')
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n  return None\n")
  raises = tmp_path / "raises.py"  # get_config raises a ConfigError.
  raises.write_text(
      "from mmal_jax import config_lib\n\ndef get_config():\n"
      "  config = config_lib.base_config()\n"
      "  config.data.source = 'features'\n"
      "  return config_lib.validate(config)\n")
  features = tmp_path / "features"
  features.mkdir()
  rng = np.random.default_rng(0)
  np.save(features / "image.npy", rng.normal(size=(40, 8)))
  np.save(features / "text.npy", rng.normal(size=(40, 8)))
  np.save(features / "pairs.npy", np.stack([np.arange(40)] * 2, 1))
  features_config = str(tmp_path / "features.py")  # configs/features.py
  pathlib.Path(features_config).write_text(
      "from mmal_jax import config_lib\n\n\ndef get_config():\n"
      f"  config = config_lib.from_file("
      f"{os.path.join(_ROOT, 'configs', 'features.py')!r})\n"
      f"  config.data.update(image_features={str(features / 'image.npy')!r},"
      f" text_features={str(features / 'text.npy')!r},"
      f" pairs={str(features / 'pairs.npy')!r})\n"
      "  config.feature_dims = (8, 8)\n  return config\n")
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  w = {name: str(tmp_path / name) for name in (
      "several", "demoo", "syntax", "raises", "budget")}
  # Kept few: each case is a process that imports TensorFlow and the models
  # (the first four fail before those imports).
  cases = {  # name: (argv, words the line must hold)
      "demoo": (["--config", "configs/demoo.py", "--workdir", w["demoo"]],
                ["configs/demoo.py", "no such file"]),
      "syntax": (["--config", str(broken), "--workdir", w["syntax"]],
                 [f"{broken}:1", "SyntaxError"]),
      "raises": (["--config", str(raises), "--workdir", w["raises"]],
                 [f"--config {raises}: ConfigError:", "config.init.kind=",
                  "config.model.image_model='vit' takes images"]),
      "budget": (["--config", "configs/demo.py", "--workdir", w["budget"],
                  "--config.budget=abc"], ["config.budget", "'abc'"]),
      "several": (["--config", tiny, "--workdir", w["several"],
                   "--config.strategy_hparams.mmal.modality=audio",
                   "--config.strategy_hparams.mmal.metric=manhattan",
                   "--config.init.kind=checkpoint",
                   "--config.init.checkpoint=/nonexistent.npz"],
                  ["3 problems", "strategy_hparams.mmal.modality='audio'",
                   "metric='manhattan'", "/nonexistent.npz"]),
      "proc": (["--config", tiny, "--workdir", "/proc/x",
                "--config.train.epochs=0"],
               ["2 problems", "--workdir /proc/x", "train.epochs"]),
      "under_file": (["--config", features_config, "--workdir",
                      str(a_file / "w"), "--config.init.kind=pretrain"],
                     ["2 problems", f"--workdir {a_file}/w",
                      "init.kind='pretrain'", "'features'"]),
      "is_file": (["--config", tiny, "--workdir", str(a_file)],
                  [f"--workdir {a_file}"]),
  }
  results = run_main({name: argv for name, (argv, _) in cases.items()})
  for name, (_, words) in cases.items():
    line = error_line(results[name])
    for word in words:
      assert word in line, (name, line)
  for workdir in w.values():  # Nothing written: fixing it can resume.
    assert not os.path.exists(os.path.join(workdir, "config.json")), workdir
    assert not os.path.exists(os.path.join(workdir, "logs")), workdir
  assert a_file.read_text() == ""

  # The corrected command runs in the same workdir (the file oracle stops
  # after writing round 1's queries: exit 3), and a bad answers file is one
  # line naming file:line (13.12), also in the workdir's log.
  rc, stdout, stderr = run_main({"fixed": [
      "--config", tiny, "--workdir", w["several"]]})["fixed"]
  assert rc == 3, stderr
  assert "Round 1 awaits annotations" in stdout
  queries = [json.loads(line) for line in open(os.path.join(
      w["several"], "queries", "round_1.jsonl")).read().splitlines()]
  assert len(queries) == 8
  good = [json.dumps({"modality": q["modality"], "index": q["index"],
                      "partners": []}) for q in queries]
  other = "text" if queries[1]["modality"] == "image" else "image"
  # test_oracle checks every kind of bad answers file (partial, unqueried,
  # duplicate, bad JSON, out of range); all raise AnswerFileError, which
  # reaches the command line like this.
  bad = {  # name: (lines, the line named)
      "out_of_range": (good[:1] + [json.dumps({
          "modality": queries[1]["modality"], "index": queries[1]["index"],
          "partners": [[other, 10 ** 6]]})] + good[2:], 2),
  }
  commands = {}
  for name, (lines, _) in bad.items():
    workdir = str(tmp_path / f"answers_{name}")
    shutil.copytree(w["several"], workdir)
    os.makedirs(os.path.join(workdir, "answers"))
    with open(os.path.join(workdir, "answers", "round_1.jsonl"), "w") as f:
      f.write("".join(line + "\n" for line in lines))
    commands[name] = ["--config", tiny, "--workdir", workdir]
  # #17 item 5: a second process on a workdir whose lock a live process
  # holds (this one, on this host) is refused, the workdir left as it was.
  busy = str(tmp_path / "busy")
  shutil.copytree(w["several"], busy)
  with open(os.path.join(busy, "lock"), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid(),
               "started": time.time(), "started_utc": "now",
               "heartbeat": time.time(), "token": "t"}, f)
  before = _tree(busy)
  commands["busy"] = ["--config", tiny, "--workdir", busy]
  # #17 item 11: lines appended to the run's queries file (which would buy
  # more than the budget) are named by file and line.
  appended = str(tmp_path / "appended")
  shutil.copytree(w["several"], appended)
  queries_path = os.path.join(appended, "queries", "round_1.jsonl")
  bought = {(q["modality"], q["index"]) for q in queries}
  extra = next(i for i in range(10 ** 6) if ("text", i) not in bought)
  with open(queries_path, "a") as f:
    f.write(json.dumps({"round": 1, "query": 8, "modality": "text",
                        "index": extra}) + "\n")
  os.makedirs(os.path.join(appended, "answers"))
  with open(os.path.join(appended, "answers", "round_1.jsonl"), "w") as f:
    f.write("".join(line + "\n" for line in good))
  commands["appended"] = ["--config", tiny, "--workdir", appended]
  results = run_main(commands)
  line = error_line(results["busy"])
  assert f"{busy} is in use by process {os.getpid()}" in line, line
  assert _tree(busy) == before
  line = error_line(results["appended"], alone=False)
  assert f"{queries_path}:9: ('text', {extra}) is not one of the 8 " in line, (
      line)
  for name, (_, lineno) in bad.items():
    line = error_line(results[name], alone=False)
    path = os.path.join(str(tmp_path / f"answers_{name}"), "answers",
                        "round_1.jsonl")
    assert f"{path}:{lineno}:" in line, (name, line)
    log = os.path.join(str(tmp_path / f"answers_{name}"), "logs",
                       "process_0.log")
    assert line.removeprefix("mmal_jax.main: error: ") in open(log).read()
