r"""The paper's ColorSwap pool run with LiT ViT-L/14 (App. B.2, Table 6).

  python -m mmal_jax.main --config configs/colorswap_lit_l14.py \
      --config.init.checkpoint=PATH.npz --config.data.dir=COLORSWAP \
      --workdir gs://bucket/colorswap_lit_l14

The image tower is locked (LiT: `optim.locked_tower="img"`, no optimizer
state for it); only the text tower and the temperature learn. 50 epochs,
batch 35, AdamW with weight decay 0.1 (0.1 * lr in big_vision's convention),
70 queries per round up to 30%. Start from a LiT (or ViT + text) .npz whose
image tower is an L/14.
"""
from mmal_jax import config_lib
from mmal_jax.models import presets


def get_config():
  config = config_lib.base_config()
  config_lib.use_preset(config, presets.lit("L/14", text_variant="L"))
  config.data.source = "colorswap"
  config.init.kind = "checkpoint"
  lr = 1e-4
  config.optim.update(lr=lr, wd=0.1 * lr)
  config.train.update(epochs=50, batch_size=35)
  config.eval.embed_batch_size = 512
  return config
