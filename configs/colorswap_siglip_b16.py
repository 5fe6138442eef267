r"""The paper's ColorSwap pool run with SigLIP ViT-B/16 (App. B.2, Table 6).

  python -m mmal_jax.main --config configs/colorswap_siglip_b16.py \
      --config.data.dir=COLORSWAP --workdir gs://bucket/colorswap_siglip_b16

Starts from big_vision's released SigLIP B/16 at 224 px (WebLI, English),
gs://big_vision/siglip/webli_en_b16_224_63724782.npz, with its c4_en
SentencePiece vocabulary (gs://t5-data/vocabs/cc_en.32000/sentencepiece.model,
32k pieces), 64 tokens padded with EOS: `presets.siglip("B/16")` is that
model. 80 epochs, batch 70, AdamW with weight decay 0.1 (0.1 * lr in
big_vision's convention), 70 queries per round up to 30%.
The learning rate (lost in the paper's text extraction) is a usual
fine-tuning value.
"""
from mmal_jax import config_lib
from mmal_jax.models import presets


def get_config():
  config = config_lib.base_config()
  config_lib.use_preset(config, presets.siglip("B/16", res=224, text_len=64))
  config.data.source = "colorswap"
  config.init.update(
      kind="checkpoint",
      checkpoint="gs://big_vision/siglip/webli_en_b16_224_63724782.npz")
  lr = 1e-5
  config.optim.update(lr=lr, wd=0.1 * lr, b2=0.95)
  config.train.update(epochs=80, batch_size=70)
  config.eval.embed_batch_size = 512
  return config
