r"""MMCSAL cold start on generated `shapes` scenes (image, caption), CPU scale.

  python -m mmal_jax.main --config configs/mmcsal_shapes.py \
      --workdir /tmp/mmcsal_shapes

Pairs: 700 ColorSwap-like groups (1400 image-caption pairs, no files; 20%
held out), labelled by the shape of the first object (6 classes,
`data.label="colour"` for its colour, 8 classes). Stage 1: a one-block ViT
(patch 8 on 32 px) and a byte-level text transformer, width 64, trained by
MMSSL with and without 20 prototypes per modality. The downstream
classifier is linear on each selector's own Stage-1 representations
(`downstream.features="stage1"`: captions are not feature vectors). The
caption names the label, so the text tower alone makes this task easy: the
config exercises the image-text pipeline end to end rather than separating
the selectors. 3 seeds.
"""
import ml_collections

from mmal_jax import mmcsal


def get_config():
  config = mmcsal.base_config()
  config.data.update(source="shapes", num_groups=700, image_size=32,
                     label="shape", test_fraction=0.2, seed=0)
  config.seeds = (0, 1, 2)
  tower = dict(width=64, depth=1, mlp_dim=256, num_heads=2)
  config.model = ml_collections.ConfigDict(dict(
      image_model="vit", text_model="text_transformer",
      image=dict(variant="mu/8", pool_type="map", **tower),
      text=dict(variant="mu", vocab_size=259, **tower),
      # No image head (MAP output, width 64): a zero-initialised head would
      # give ||z|| = 0 at the start.
      out_dim=(None, 64), temperature_init=1 / 0.07, bias_init=None))
  config.res = 32
  config.text_len = 56
  config.tokenizer = "bytes"
  config.stage1.update(epochs=30, warmup_epochs=10, batch_size=128,
                       num_prototypes=20, kmeans_iters=30)
  config.downstream.update(features="stage1", hidden_dims=(), steps=300,
                           lr=1e-2, wd=1e-4)
  return config
