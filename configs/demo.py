r"""The embedded default: the paper's ColorSwap protocol at CPU scale.

  python -m mmal_jax.main --config configs/demo.py --workdir /tmp/mmal_demo

Generated `shapes` data (no files): towers pre-trained once on single-object
images (cached in the workdir), then pool-based active learning on 700 groups
(1400 image-caption pairs): 70 queries (5%) per round up to 30%, strategies
random / coreset / uncertainty / mmal, 3 seeds, ColorSwap text / image / group
scores on 150 held-out groups (plus GroupMatch, retrieval and pseudo-label
accuracy). SigLIP loss; one-block ViT (patch 8 on 32 px) and text
transformer over byte tokens, width 64: about 5 minutes on 2 CPU cores.
"""
from mmal_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.data.update(num_groups=700, num_eval_groups=150, image_size=32,
                     pretrain_size=4000)
  config.seeds = (0, 1, 2)
  config.budget = 70  # 5% of 1400 pairs; 6 rounds (the default) reach 30%.
  config_lib.use_small_towers(config, width=64, depth=1, patch=8, res=32,
                              text_len=56)
  config.optim.update(lr=3e-4, wd=1e-4)
  config.pretrain.update(epochs=10, batch_size=128, lr=1e-3)
  config.train.update(epochs=20, batch_size=70)
  # A model this small learns which colours and shapes a scene holds, not
  # which colour goes with which shape: retrieval is the informative metric.
  config.report.main_metric = "retrieval/i2t_r@10"
  config.report.metrics = (
      "colorswap/text", "colorswap/image", "colorswap/group", "groupmatch",
      "retrieval/i2t_r@10", "retrieval/t2i_r@10", "pseudo_label/mean")
  return config
