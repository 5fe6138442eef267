r"""The paper's ColorSwap pool run with CLIP ViT-B/32 (App. B.2, Table 5).

  python -m mmal_jax.main --config configs/colorswap_clip_b32.py \
      --config.init.checkpoint=PATH.npz --config.data.dir=COLORSWAP \
      --workdir gs://bucket/colorswap_clip_b32

Pool of 1400 pairs, 70 queries (5%) per round up to 30%, 4 seeds; 50 epochs,
batch 70, AdamW with weight decay 0.1, fine-tuned from pre-trained weights
each round. The paper's learning rate was lost in its text extraction; 1e-5
is the usual CLIP fine-tuning rate. Weight decay follows big_vision's
convention (not multiplied by the learning rate): PyTorch's 0.1 is 0.1 * lr
here.

The paper fine-tunes OpenAI's CLIP B/32. Those weights are not released in
big_vision's layout and mmal_jax does not convert them (OpenAI's ViT has a
LayerNorm before the encoder, QuickGELU MLPs, pools text at the EOT position
and uses its own BPE tokenizer), so no public checkpoint loads here: pass a
CLIP B/32 .npz in this layout (`presets.clip("B/32")`: c4_en vocabulary,
77 tokens), or run the same protocol on released weights with
`colorswap_siglip_b16.py` or `colorswap_lit_l14.py`.
"""
from mmal_jax import config_lib
from mmal_jax.models import presets


def get_config():
  config = config_lib.base_config()
  config_lib.use_preset(config, presets.clip("B/32", res=224, text_len=77))
  config.data.source = "colorswap"
  config.init.kind = "checkpoint"
  lr = 1e-5
  config.optim.update(lr=lr, wd=0.1 * lr, grad_clip_norm=1.0)
  config.train.update(epochs=50, batch_size=70)
  config.eval.embed_batch_size = 512
  return config
