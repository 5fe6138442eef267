"""The filesystem layer on local disk and on gs:// (a local GCS emulator)."""
import errno
import os
import stat
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmal_jax import fs


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_bucket") + "/root"


def test_write_read_list_remove(root):
  path = os.path.join(root, "a", "b.txt")
  assert not fs.exists(path)
  fs.write_text(path, "hello")
  assert fs.exists(path) and fs.isfile(path) and fs.isdir(os.path.join(root, "a"))
  assert fs.read_text(path) == "hello"
  fs.write_bytes(path, b"again")  # Replaces.
  assert fs.read_bytes(path) == b"again"
  fs.write_text(os.path.join(root, "a", "c.json"), "{}")
  assert fs.listdir(os.path.join(root, "a")) == ["b.txt", "c.json"]
  assert [os.path.basename(p) for p in
          fs.glob(os.path.join(root, "a"), "*.json")] == ["c.json"]
  with fs.open(os.path.join(root, "d", "e.bin"), "wb") as f:
    f.write(b"xyz")
  with fs.open(os.path.join(root, "d", "e.bin"), "rb") as f:
    assert f.read() == b"xyz"
  fs.remove(path)
  fs.remove(path)  # Absent: no-op.
  assert not fs.exists(path)
  fs.rmtree(os.path.join(root, "d"))
  assert not fs.exists(os.path.join(root, "d", "e.bin"))
  assert fs.check_writable_dir(os.path.join(root, "new")) is None


def test_orbax_checkpoints_go_through_the_same_layer(root):
  manager = ocp.CheckpointManager(
      os.path.join(root, "ckpt"),
      options=ocp.CheckpointManagerOptions(create=True))
  tree = {"w": np.arange(6.0).reshape(2, 3)}
  manager.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({"round": 3})))
  manager.wait_until_finished()
  restored = manager.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(tree), meta=ocp.args.JsonRestore()))
  np.testing.assert_array_equal(restored["state"]["w"], tree["w"])
  assert restored["meta"] == {"round": 3}
  assert fs.isdir(os.path.join(root, "ckpt", "3"))


def test_atomic_local_writes_are_world_readable_and_leave_no_temporaries(
    tmp_path):
  old = os.umask(0o077)  # A cautious user's umask; collaborators must read.
  try:
    fs.write_text(str(tmp_path / "x" / "config.json"), "{}")
  finally:
    os.umask(old)
  mode = stat.S_IMODE(os.stat(tmp_path / "x" / "config.json").st_mode)
  assert mode == 0o644
  assert os.listdir(tmp_path / "x") == ["config.json"]


def test_unwritable_folders_are_named(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("")
  assert "is a file" in fs.check_writable_dir(str(a_file))
  assert "cannot be written" in fs.check_writable_dir(str(a_file / "under"))
  assert "cannot be written" in fs.check_writable_dir("/proc/mmal_x")


def test_checking_a_new_folder_leaves_nothing_behind(tmp_path):
  assert fs.check_writable_dir(str(tmp_path / "a" / "b")) is None
  assert not (tmp_path / "a").exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "f.json"
  fs.write_text(path, "old")

  def fail(*args):
    raise OSError("disk full")

  monkeypatch.setattr(fs.os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    fs.write_text(path, "new")
  assert path.read_text() == "old"
  assert [f.name for f in tmp_path.iterdir()] == ["f.json"]


def test_writability_probe_writes_real_bytes(tmp_path, monkeypatch):
  """#17 item 7: an empty probe file is created even on a full disk."""
  written = []
  monkeypatch.setattr(fs, "write_bytes",
                      lambda path, data: written.append(len(data)) or
                      (_ for _ in ()).throw(OSError(
                          errno.ENOSPC, "No space left on device", path)))
  reason = fs.check_writable_dir(str(tmp_path / "w"))
  assert written and written[0] > 0
  assert reason == f"{tmp_path / 'w'} cannot be written: no space left on device"
  assert not (tmp_path / "w").exists()


def test_unreachable_store_is_one_line_after_a_bounded_wait(tmp_path,
                                                            monkeypatch):
  """#17 item 15: a gs:// path whose endpoint does not answer (here a
  closed local port as the emulator endpoint) stops the up-front checks
  within MMAL_FS_TIMEOUT_S with one line naming it, writing nothing."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  from mmal_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mmal_jax import loop  # pylint: disable=g-import-not-at-top
  from test_loop import tiny_config  # pylint: disable=g-import-not-at-top
  closed = f"http://127.0.0.1:{gcs_emulator._free_port()}"  # pylint: disable=protected-access
  for key, value in {"STORAGE_EMULATOR_HOST": closed,
                     "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                     "GOOGLE_CLOUD_PROJECT": "test",
                     "MMAL_FS_TIMEOUT_S": "1"}.items():
    monkeypatch.setenv(key, value)
  gcsfs.GCSFileSystem.clear_instance_cache()
  try:
    config = tiny_config(**{"init.kind": "checkpoint",
                            "init.checkpoint": "gs://nowhere/towers.npz"})
    start = time.monotonic()
    with pytest.raises(config_lib.ConfigError) as error:
      loop.Experiment.create(config, str(tmp_path / "w"))
    assert time.monotonic() - start < 15
    message = str(error.value)
    assert "\n" not in message
    assert "gs://nowhere/towers.npz cannot be reached" in message, message
    assert not (tmp_path / "w").exists()
  finally:
    gcsfs.GCSFileSystem.clear_instance_cache()
