"""TensorBoard scalar summaries without TensorFlow.

Writes `events.out.tfevents.*` files (TFRecord framing of `Event` protos) that
TensorBoard reads; importing TensorFlow for this would add seconds to every
run's start-up.
"""
from __future__ import annotations

import os
import socket
import struct
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`. Pure Python: for small records only."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data +
          struct.pack("<I", _masked_crc(data)))


class SummaryWriter:
  """Appends scalar summaries to a new event file in `directory`.

  `enabled=False` (processes other than the first of a multi-host job)
  writes nothing.
  """

  def __init__(self, directory: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(directory, exist_ok=True)
    now = time.time()
    self.path = os.path.join(
        directory, f"events.out.tfevents.{int(now)}.{socket.gethostname()}."
        f"{os.getpid()}")
    self._write(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

  def _write(self, event) -> None:
    with open(self.path, "ab") as f:
      f.write(tfrecord(event.SerializeToString()))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """Writes `values` (tag -> number) at `step`; flushed on return."""
    if not self.enabled:
      return
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in values.items()])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary))
