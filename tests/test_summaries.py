"""Event files read back in TensorBoard's loader: buffering, flushes, gs://."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

from mmal_jax import fs
from mmal_jax import summaries


def _events(path, tmp_path=None):
  """The events of one file (a gs:// one is copied to tmp_path first)."""
  if fs.is_remote(path):
    local = tmp_path / os.path.basename(path)
    local.write_bytes(fs.read_bytes(path))
    path = str(local)
  return list(event_file_loader.LegacyEventFileLoader(path).Load())


def _scalars(events):
  return [(e.step, v.tag, v.simple_value) for e in events
          for v in e.summary.value]


def test_scalars_round_trip(tmp_path):
  writer = summaries.SummaryWriter(str(tmp_path))
  writer.scalars(3, {"train/loss": 1.5, "eval/r@1": 20.0})
  writer.scalars(7, {"train/loss": 0.5})
  writer.close()
  events = _events(writer.path)
  assert events[0].file_version == "brain.Event:2"
  assert _scalars(events[1:]) == [(3, "train/loss", 1.5), (3, "eval/r@1", 20.0),
                                  (7, "train/loss", 0.5)]


def test_scalars_wait_for_flush(tmp_path):
  writer = summaries.SummaryWriter(str(tmp_path), flush_secs=3600)
  assert len(_events(writer.path)) == 1  # The header, written at once.
  for step in range(5):
    writer.scalars(step, {"train/loss": jnp.float32(step) / 2,
                          "train/lr": np.float32(0.1), "train/t": step + 1})
  assert len(_events(writer.path)) == 1
  writer.flush()
  got = _scalars(_events(writer.path))
  assert got[:3] == [(0, "train/loss", 0.0), (0, "train/lr",
                                               pytest.approx(0.1)),
                     (0, "train/t", 1.0)]
  assert len(got) == 15 and got[-3][2] == 2.0
  writer.scalars(9, {"train/loss": 1.0})
  writer.flush()
  writer.flush()  # Nothing queued: writes nothing.
  assert _scalars(_events(writer.path))[-1] == (9, "train/loss", 1.0)


def test_flushes_every_flush_secs(tmp_path, monkeypatch):
  now = [100.0]
  monkeypatch.setattr(summaries.time, "monotonic", lambda: now[0])
  writer = summaries.SummaryWriter(str(tmp_path), flush_secs=10)
  writer.scalars(1, {"a": 1.0})
  now[0] += 9
  writer.scalars(2, {"a": 2.0})
  assert len(_events(writer.path)) == 1
  now[0] += 1
  writer.scalars(3, {"a": 3.0})
  assert [s for s, _, _ in _scalars(_events(writer.path))] == [1, 2, 3]


def test_close_flushes_and_context_manager(tmp_path):
  with summaries.SummaryWriter(str(tmp_path), flush_secs=3600) as writer:
    writer.scalars(1, {"a": 1.0})
  assert _scalars(_events(writer.path)) == [(1, "a", 1.0)]
  writer.close()
  with pytest.raises(ValueError, match="closed"):
    writer.scalars(2, {"a": 2.0})


def test_non_scalar_is_refused(tmp_path):
  writer = summaries.SummaryWriter(str(tmp_path))
  with pytest.raises(TypeError, match="'train/loss'.*scalar"):
    writer.scalars(0, {"train/loss": jnp.zeros(3)})


def test_disabled_writes_nothing(tmp_path):
  writer = summaries.SummaryWriter(str(tmp_path / "tb"), enabled=False)
  writer.scalars(0, {"a": 1.0})
  writer.close()
  assert not (tmp_path / "tb").exists()


def test_gcs_log_dir(gcs_bucket, tmp_path):
  directory = f"{gcs_bucket}/tensorboard/mmal_seed_0"
  writer = summaries.SummaryWriter(directory, flush_secs=3600)
  writer.scalars(1, {"train/loss": 2.0})
  writer.flush()
  assert _scalars(_events(writer.path, tmp_path)) == [(1, "train/loss", 2.0)]
  writer.scalars(2, {"train/loss": 1.0})
  writer.close()
  assert fs.listdir(directory) == [os.path.basename(writer.path)]
  assert _scalars(_events(writer.path, tmp_path)) == [(1, "train/loss", 2.0),
                                                      (2, "train/loss", 1.0)]


def test_gcs_files_roll_over(gcs_bucket, tmp_path):
  directory = f"{gcs_bucket}/tb"
  writer = summaries.SummaryWriter(directory, flush_secs=0, max_file_bytes=200)
  for step in range(12):
    writer.scalars(step, {"train/loss": float(step)})
  writer.close()
  paths = fs.glob(directory, "events.out.tfevents.*")
  assert len(paths) > 2
  events = [e for p in paths for e in _events(p, tmp_path)]
  assert sum(e.file_version == "brain.Event:2" for e in events) == len(paths)
  assert [s for s, _, _ in _scalars(events)] == list(range(12))
  assert all(len(fs.read_bytes(p)) <= 200 for p in paths)


def test_import_does_not_load_tensorflow():
  code = ("import sys, mmal_jax.summaries; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  subprocess.run([sys.executable, "-c", code], check=True, env=env)
