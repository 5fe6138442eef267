r"""Paper 1, Fig. 4 right: missing data, at the demo's CPU scale.

  python -m mmal_jax.main --config configs/demo_missing_data.py \
      --workdir /tmp/missing

`configs/demo.py` with half of the pool's images removed (their captions
stay, partner-less: `data.missing_image_fraction`), and queries only from
the image modality, since a caption may have no image to be matched with.
Strategies: mmal and badge (`modality="image"`). The paper also restricts
random, coreset and uncertainty to images; they take no `modality` yet.
"""
import os

import ml_collections

from mmal_jax import config_lib


def get_config():
  config = config_lib.from_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  config.data.missing_image_fraction = 0.5
  config.strategies = ("mmal", "badge")
  config.strategy_hparams.mmal.modality = "image"
  config.strategy_hparams.badge = ml_collections.ConfigDict(dict(
      modality="image", logit_scale=10.))
  return config
