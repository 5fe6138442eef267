r"""The paper's ColorSwap pool run with LiT (App. B.2, Table 6), at L/16.

  python -m mmal_jax.main --config configs/colorswap_lit_l14.py \
      --config.data.dir=COLORSWAP --workdir gs://bucket/colorswap_lit

The paper's LiT-L14 weights are not public, and no LiT with a ViT-L/14 image
tower is released. This config starts from the released LiT-L16S instead
(google-research/vision_transformer): ViT-L/16 image tower (class token, no
head) locked, a 12-layer width-384 ("S") text tower with a head to 1024,
gs://vit_models/lit/LiT-L16S.npz, with its SentencePiece vocabulary
gs://vit_models/lit/LiT-L16S.model (16k pieces), 16 tokens padded with EOS.
Its old (pre-linen) layout converts on load. (LiT-B16B / L16L have BERT text
towers, which these towers do not implement.)

The image tower is locked (`optim.locked_tower="img"`, no optimizer state for
it); only the text tower and the temperature learn. 50 epochs, batch 35,
AdamW with weight decay 0.1 (0.1 * lr in big_vision's convention), 70 queries
per round up to 30%.
"""
from mmal_jax import config_lib
from mmal_jax import tokenizers
from mmal_jax.models import presets


def get_config():
  config = config_lib.base_config()
  config_lib.use_preset(config, presets.lit(
      "L/16", text_variant="S", res=224, text_len=16,
      tokenizer=tokenizers.LIT_L16S))
  config.data.source = "colorswap"
  config.init.update(kind="checkpoint",
                     checkpoint="gs://vit_models/lit/LiT-L16S.npz")
  lr = 1e-4
  config.optim.update(lr=lr, wd=0.1 * lr)
  config.train.update(epochs=50, batch_size=35)
  config.eval.embed_batch_size = 512
  return config
