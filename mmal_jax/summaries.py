"""TensorBoard scalar and text summaries, buffered, through `mmal_jax.fs` (gs:// too).

Event protos are framed by tensorboard's own `RecordWriter` (TFRecord length,
payload and masked CRC-32C), without importing TensorFlow, whose start-up
would add seconds to every run and whose `tf.io.gfile` bypasses `fs`.

`scalars` only queues its values (device arrays are not fetched, so calling it
every training step does not wait for the step); the queue is written every
`flush_secs` seconds, on `flush()` and on `close()` (also run at interpreter
exit). Locally events are appended to the file. Objects in a bucket cannot be
appended to, so on gs:// each flush rewrites the current file whole (what
TensorFlow's own GCS writer does, and TensorBoard reads a grown object on);
past `max_file_bytes` a new file starts, so a flush uploads at most that
much.
"""
from __future__ import annotations

import atexit
import io
import itertools
import os
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer import record_writer

from mmal_jax import fs

_uids = itertools.count()


class SummaryWriter:
  """Writes scalar summaries to event files in `directory` (local or gs://).

  `enabled=False` (processes other than the first of a multi-host job) makes
  every method a no-op and creates nothing. Usable as a context manager.
  """

  def __init__(self, directory: str, enabled: bool = True, *,
               flush_secs: float = 30.0, max_file_bytes: int = 8 << 20):
    self.enabled = enabled
    self.directory = directory
    self.flush_secs = flush_secs
    self.max_file_bytes = max_file_bytes
    self.path = None
    self._pending = []  # (wall_time, step, {tag: value}) not yet written.
    self._contents = b""  # The current file's bytes (remote files only).
    self._file_time = 0
    self._last_flush = time.monotonic()
    self._closed = False
    if not enabled:
      return
    fs.makedirs(directory)
    self._new_file()
    atexit.register(self.close)

  def _new_file(self) -> None:
    """Starts an event file named after a later second than the last one's
    (TensorBoard reads a folder's files in name order) with its header."""
    self._file_time = max(int(time.time()), self._file_time + 1)
    self.path = os.path.join(
        self.directory, f"events.out.tfevents.{self._file_time:010d}."
        f"{socket.gethostname()}.{os.getpid()}.{next(_uids)}")
    self._contents = b""
    self._write(_frame([event_pb2.Event(wall_time=time.time(),
                                        file_version="brain.Event:2")]))

  def _write(self, data: bytes) -> None:
    if not fs.is_remote(self.path):
      with fs.open(self.path, "ab") as f:
        f.write(data)
      return
    if self._contents and len(self._contents) + len(data) > self.max_file_bytes:
      self._new_file()
    self._contents += data
    fs.write_bytes(self.path, self._contents)

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Queues `values` (tag -> Python, numpy or jax scalar) at `step`.

    Costs a dict copy; every `flush_secs` seconds it also flushes (one
    device-to-host transfer for everything queued, one write).
    """
    if not self.enabled:
      return
    if self._closed:
      raise ValueError(f"SummaryWriter for {self.directory} is closed.")
    for tag, value in values.items():
      if np.ndim(value) != 0:
        raise TypeError(f"Summary {tag!r} must be a scalar, got shape "
                        f"{np.shape(value)}.")
    self._pending.append((time.time(), int(step), dict(values)))
    if time.monotonic() - self._last_flush >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    """Writes everything queued (a no-op when nothing is)."""
    self._last_flush = time.monotonic()
    if not self.enabled or not self._pending:
      return
    pending, self._pending = self._pending, []
    fetched = jax.device_get([values for _, _, values in pending])
    self._write(_frame([
        event_pb2.Event(wall_time=wall_time, step=step,
                        summary=summary_pb2.Summary(value=[
                            summary_pb2.Summary.Value(
                                tag=tag, simple_value=float(values[tag]))
                            for tag in order]))  # device_get sorts dicts.
        for (wall_time, step, order), values in zip(pending, fetched)]))

  def text(self, step: int, tag: str, markdown: str) -> None:
    """Writes `markdown` as a text summary (TensorBoard's Text tab renders
    it) at `step`, after flushing what is queued. Cost: one write."""
    if not self.enabled:
      return
    if self._closed:
      raise ValueError(f"SummaryWriter for {self.directory} is closed.")
    self.flush()
    value = summary_pb2.Summary.Value(
        tag=tag, metadata=text_metadata.create_summary_metadata(
            display_name=tag, description=""),
        tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, string_val=[markdown.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto()))
    self._write(_frame([event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=summary_pb2.Summary(value=[value]))]))

  def close(self) -> None:
    """Flushes; later `scalars` calls raise. Closing twice is fine."""
    if self._closed:
      return
    self.flush()
    self._closed = True
    if self.enabled:
      atexit.unregister(self.close)

  def __enter__(self) -> SummaryWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _frame(events) -> bytes:
  """The events as TFRecords, framed by tensorboard's RecordWriter."""
  buffer = io.BytesIO()
  writer = record_writer.RecordWriter(buffer)
  for event in events:
    writer.write(event.SerializeToString())
  return buffer.getvalue()
