"""A local GCS emulator (`gcp-storage-emulator`, in memory) on 127.0.0.1.

`Emulator()` starts the server in a subprocess; `env()` gives the variables
that point gcsfs (`STORAGE_EMULATOR_HOST`) and tensorstore
(`TENSORSTORE_GCS_HTTP_URL`), hence every path of `mmal_jax.fs` and orbax, at
it. `use_in_this_process()` applies them here and drops gcsfs' cached
clients. Buckets are created on first use by `bucket(name)`.

`python gcs_emulator.py start ...` runs the emulator with two fixes: its
downloads carry the object's `x-goog-generation` header, as GCS' do.
Without it tensorstore reads generation 0 and rejects its own next
conditional write ("Malformed StorageGeneration"), which OCDBT (orbax's
array store) makes for every array after the first of a checkpoint. And
uploads and deletes with `ifGenerationMatch=G` answer 412 Precondition
Failed when the object has another generation (G = 0: when it exists), as
GCS' do (the workdir lock relies on them).
"""
from __future__ import annotations

from http import HTTPStatus
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """An in-memory GCS emulator process; `stop()` ends it."""

  def __init__(self, timeout_s: float = 30.0):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "start", "--host",
         "127.0.0.1", "--port", str(self.port), "--in-memory", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
        break
      except OSError:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError("The GCS emulator did not start.") from None
        time.sleep(0.1)

  def env(self) -> dict[str, str]:
    """Environment variables that send gcsfs and tensorstore here."""
    return {"STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # No bucket-type lookups over gRPC (not emulated: 60 s timeouts).
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "test", "EPATH_USE_TF": "false"}

  def bucket(self, name: str) -> str:
    """Creates bucket `name` (if needed); returns "gs://name"."""
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", method="POST",
        data=('{"name": "%s"}' % name).encode(),
        headers={"Content-Type": "application/json"})
    try:
      urllib.request.urlopen(request, timeout=10).read()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: exists already.
        raise
    return f"gs://{name}"

  def use_in_this_process(self) -> None:
    """Points this process' gcsfs and tensorstore at the emulator."""
    os.environ.update(self.env())
    import gcsfs  # pylint: disable=g-import-not-at-top
    gcsfs.GCSFileSystem.clear_instance_cache()

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      self.proc.wait(timeout=10)


def _serve(argv: list[str]) -> None:
  """The emulator's command line, downloads with generation headers."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import storage as storage_lib  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"],
                                 request.params["object_id"])
    except NotFound:
      return  # The 404 is already set.
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]

  insert, delete = objects.insert, objects.delete
  uploading = threading.local()  # The upload's precondition, if any.
  create_file = storage_lib.Storage.create_file

  class PreconditionFailed(Exception):
    pass

  def create_file_if_matching(self, bucket_name, file_name, *args, **kwargs):
    match = getattr(uploading, "match", None)
    if match is not None:
      try:
        generation = str(self.get_file_obj(bucket_name, file_name)
                         ["generation"])
      except NotFound:
        generation = "0"
      if generation != match:
        raise PreconditionFailed(file_name)
    return create_file(self, bucket_name, file_name, *args, **kwargs)

  def insert_with_precondition(request, response, storage, *args, **kwargs):
    uploading.match = (request.query.get("ifGenerationMatch") or [None])[0]
    try:
      return insert(request, response, storage, *args, **kwargs)
    except PreconditionFailed:
      response.status = HTTPStatus.PRECONDITION_FAILED
    finally:
      uploading.match = None

  def delete_with_precondition(request, response, storage, *args, **kwargs):
    match = request.query.get("ifGenerationMatch")
    if match:
      try:
        obj = storage.get_file_obj(request.params["bucket_name"],
                                   request.params["object_id"])
      except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return None
      if str(obj["generation"]) != match[0]:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return delete(request, response, storage, *args, **kwargs)

  # Before the server module builds its routing table from `objects`.
  objects.download = download_with_generation
  objects.insert = insert_with_precondition
  objects.delete = delete_with_precondition
  storage_lib.Storage.create_file = create_file_if_matching
  from gcp_storage_emulator import __main__ as cli  # pylint: disable=g-import-not-at-top
  cli.main(argv)


if __name__ == "__main__":
  _serve(sys.argv[1:])
