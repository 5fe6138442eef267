r"""The paper's MS-COCO stream run (Sec. 5.1, App. B.2, Table 7).

  python -m mmal_jax.main --config configs/coco_stream.py \
      --config.data.train_json=COCO/annotations/captions_train2017.json \
      --config.data.train_images=COCO/train2017 \
      --config.data.eval_json=COCO/annotations/captions_val2017.json \
      --config.data.eval_images=COCO/val2017 --workdir gs://bucket/coco

Stream of buffers of 1024 images (with their first caption: the paper keeps
one caption per image), 256 queries per round; 10 epochs, batch 256, AdamW
with weight decay 0.2 (0.2 * lr in big_vision's convention). Retrieval R@1
on the 5k val images.

The paper fine-tunes OpenAI's CLIP B/32, whose weights do not load here (see
`colorswap_clip_b32.py`). This config fine-tunes big_vision's released SigLIP
B/16 at 224 px instead (gs://big_vision/siglip/webli_en_b16_224_63724782.npz,
c4_en vocabulary, 64 tokens, sigmoid loss); the strategies compare the same
way.
"""
from mmal_jax import config_lib
from mmal_jax.models import presets


def get_config():
  config = config_lib.base_config()
  config_lib.use_preset(config, presets.siglip("B/16", res=224, text_len=64))
  config.data.update(source="coco", first_caption_only=True, image_size=0)
  config.regime = "stream"
  config.stream_buffer = 1024
  config.budget = 256
  config.num_rounds = 40
  config.init.update(
      kind="checkpoint",
      checkpoint="gs://big_vision/siglip/webli_en_b16_224_63724782.npz")
  lr = 1e-5
  config.optim.update(lr=lr, wd=0.2 * lr)
  config.train.update(epochs=10, batch_size=256)
  config.eval.embed_batch_size = 1024
  config.report.main_metric = "retrieval/i2t_r@1"
  config.report.metrics = ("retrieval/i2t_r@1", "retrieval/t2i_r@1",
                           "retrieval/i2t_r@5", "retrieval/t2i_r@5")
  return config
