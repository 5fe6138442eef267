"""Event files written without TensorFlow read back in TensorBoard's loader."""

from tensorboard.backend.event_processing import event_file_loader

from mmal_jax import summaries


def test_crc32c_known_vector():
  assert summaries.crc32c(b"123456789") == 0xE3069283


def test_scalars_round_trip(tmp_path):
  writer = summaries.SummaryWriter(str(tmp_path))
  writer.scalars(3, {"train/loss": 1.5, "eval/r@1": 20.0})
  writer.scalars(7, {"train/loss": 0.5})
  events = list(event_file_loader.LegacyEventFileLoader(writer.path).Load())
  assert events[0].file_version == "brain.Event:2"
  got = [(e.step, v.tag, v.simple_value) for e in events[1:]
         for v in e.summary.value]
  assert got == [(3, "train/loss", 1.5), (3, "eval/r@1", 20.0),
                 (7, "train/loss", 0.5)]
