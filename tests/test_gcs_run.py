"""The command line on a gs:// workdir (a local GCS emulator): killed, resumed,
every output in the bucket, the results of an uninterrupted local run, and
nothing written to the local disk.

Not covered: tf.data reading *data* from gs:// (TensorFlow's own GCS client,
whose endpoint is fixed to https://www.googleapis.com and cannot be pointed
at an emulator). The tiny experiment's data is generated, so every file of
this run goes through `mmal_jax.fs` (gcsfs) and orbax (tensorstore).
"""
import os
import subprocess
import sys

import gcsfs
import jax
import pytest

import conftest
from tensorboard.backend.event_processing import event_file_loader

import test_loop
from mmal_jax import fs
from mmal_jax import loop
from mmal_jax import report
from mmal_jax.data import AnnotationState

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = os.path.join(_ROOT, "tests", "tiny_experiment.py") + ":mmal"
# Every training step is checkpointed, so a kill mid-training resumes there.
_OVERRIDES = {"train.checkpoint_every": 1}
_TIMING = set(report.TIMING_KEYS)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        jax.device_count() > 1, reason="runs in the 1-device pass only: the "
        "gs:// layer does not depend on the device count, and the 8-device "
        "pass would double a ~40 s test")]


def _main(workdir, cwd, env, kill_at=None):
  """`python -m mmal_jax.main` on the tiny experiment; (status, stderr)."""
  env = dict(env, PYTHONPATH=_ROOT, **conftest.child_cache_env(private=False))
  env.pop("MMAL_KILL_AT", None)
  if kill_at:
    env["MMAL_KILL_AT"] = kill_at
  cmd = [sys.executable, "-m", "mmal_jax.main", "--config", _CONFIG,
         "--workdir", workdir,
         *(f"--config.{k}={v}" for k, v in _OVERRIDES.items())]
  result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
  return result.returncode, result.stderr


def _events(path, tmp_path):
  """(step, tag) of every scalar of an event file (local or gs://)."""
  local = tmp_path / os.path.basename(path)
  local.write_bytes(fs.read_bytes(path))
  return {(e.step, v.tag) for e in event_file_loader.LegacyEventFileLoader(
      str(local)).Load() for v in e.summary.value}


def _strays():
  """Paths a gs:// workdir written through `open`/`os` would leave here."""
  return [p for d in (_ROOT, os.path.join(_ROOT, "tests"), os.getcwd())
          for p in (os.path.join(d, "gs:"), os.path.join(d, "gs"))
          if os.path.exists(p)]


def test_killed_and_resumed_cli_run_on_gcs(gcs_emulator, gcs_bucket,
                                           tmp_path):
  reference = str(tmp_path / "reference")
  loop.run_experiment(test_loop.tiny_config(
      strategies=("mmal",), **_OVERRIDES), reference)
  strays = _strays()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  workdir = f"{gcs_bucket}/run"
  env = {**os.environ, **gcs_emulator.env()}
  # Killed in round 2's training (steps: round 1 has 2, round 2 has 4).
  status, stderr = _main(workdir, cwd, env, kill_at="train_checkpoint:4")
  assert status == -9, stderr[-3000:]
  assert not fs.exists(f"{workdir}/results.md")
  status, stderr = _main(workdir, cwd, env)
  assert status == 0, stderr[-3000:]

  files = [f"gs://{p}" for p in gcsfs.GCSFileSystem().find(workdir)]
  names = {p[len(workdir) + 1:] for p in files}
  run = "runs/mmal/seed_0"
  for name in ("config.json", "metrics.jsonl", "results.md", "al_curves.png",
               "logs/process_0.log", f"{run}/annotation.json",
               f"{run}/annotated/round_1.json",
               f"{run}/annotated/round_2.json", f"{run}/final_params.npz"):
    assert name in names, name
  assert any(n.startswith(f"{run}/ckpt/") and n.endswith("_CHECKPOINT_METADATA")
             for n in names), sorted(names)
  assert any(n.startswith("pretrained/") for n in names), sorted(names)
  # Nothing local: no `gs:` folder, nothing in the working directory.
  assert list(cwd.iterdir()) == []
  assert _strays() == strays

  want = report.read_rows(os.path.join(reference, "metrics.jsonl"))
  got = report.read_rows(f"{workdir}/metrics.jsonl")
  drop = lambda row: {k: v for k, v in row.items() if k not in _TIMING}
  key = lambda row: row["round"]
  assert [drop(r) for r in sorted(got, key=key)] == [
      drop(r) for r in sorted(want, key=key)]
  for name in ("annotation.json", "annotated/round_1.json",
               "annotated/round_2.json"):
    assert AnnotationState.load(f"{workdir}/{run}/{name}").log == (
        AnnotationState.load(os.path.join(reference, run, name)).log), name

  # TensorBoard: every scalar of the reference run, across both processes'
  # event files.
  # (tensorboard/report/ holds results.md as text, written at the end.)
  events = [f for f in files if "/tensorboard/" in f
            and "/tensorboard/report/" not in f]
  assert len(events) == 2, events  # One file per process.
  local_events = [str(p) for p in (tmp_path / "reference" / "tensorboard"
                                   ).rglob("events.out.*")
                  if p.parent.name != "report"]
  want = set().union(*(_events(p, tmp_path) for p in local_events))
  got = set().union(*(_events(p, tmp_path) for p in events))
  assert want and want <= got
  # The log keeps the killed process' lines (those written before the kill)
  # and all of the resumed one's.
  log = fs.read_text(f"{workdir}/logs/process_0.log")
  assert log.count("1 process(es)") == 2 and "restarted at" in log, log
  assert "Finished in" in log.splitlines()[-1], log[-2000:]
