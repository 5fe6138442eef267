"""A tiny TFDS image-text-classification dataset written by the tests.

`prepare(data_dir)` writes `tiny_captions` (splits train: 6, test: 4) to
`data_dir`. Example k: a 12 x 16 image of one colour, `COLOURS[k % 3]`, its
label (that colour's class) and two captions ("a <colour> image k",
"picture k").
"""
import numpy as np
import tensorflow_datasets as tfds

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}
SPLITS = {"train": range(0, 6), "test": range(6, 10)}


def image(k: int) -> np.ndarray:
  return np.full((12, 16, 3), list(COLOURS.values())[k % 3], np.uint8)


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Solid-colour images with captions and a colour label."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        "label": tfds.features.ClassLabel(names=list(COLOURS)),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(ks) for name, ks in SPLITS.items()}

  def _generate_examples(self, ks):
    colours = list(COLOURS)
    for k in ks:
      yield k, {"image": image(k), "label": k % 3,
                "captions": {"text": [f"a {colours[k % 3]} image {k}",
                                      f"picture {k}"]}}


def prepare(data_dir: str) -> str:
  """Writes the dataset under `data_dir`; returns its name."""
  TinyCaptions(data_dir=data_dir).download_and_prepare()
  return "tiny_captions"
