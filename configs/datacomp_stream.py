r"""The paper's DataComp stream run, from scratch (Sec. 5.1, App. B.2, Table 7).

  python -m mmal_jax.main --config configs/datacomp_stream.py \
      --config.data.dir=DATACOMP --workdir gs://bucket/datacomp

Pre-training regime: random initial towers, buffers of 2048 pairs, 512
queries per round, 1 epoch over the annotated pairs per round, batch 512,
CLIP ViT-B/32 with the softmax loss (as DataComp's small track), texts in the
c4_en SentencePiece vocabulary (32k pieces, 77 tokens; DataComp's own runs use
OpenAI's BPE, which is not implemented here).
"""
from mmal_jax import config_lib
from mmal_jax.models import presets


def get_config():
  config = config_lib.base_config()
  config_lib.use_preset(config, presets.clip("B/32", res=224, text_len=77))
  config.data.update(source="datacomp", image_size=224)
  config.regime = "stream"
  config.stream_buffer = 2048
  config.budget = 512
  config.num_rounds = 100
  config.init.kind = "scratch"
  config.optim.update(lr=5e-4, wd=0.2 * 5e-4, warmup_steps=500)
  config.train.update(epochs=1, batch_size=512, reinit_each_round=False)
  config.eval.embed_batch_size = 1024
  config.report.main_metric = "retrieval/i2t_r@1"
  return config
