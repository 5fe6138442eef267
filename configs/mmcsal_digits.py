r"""MMCSAL cold start on scikit-learn's digits (no download), CPU scale.

  python -m mmal_jax.main --config configs/mmcsal_digits.py \
      --workdir /tmp/mmcsal_digits

Pairs: the left and right 8x4 halves of each 8x8 digit (1797 images; 20%
held out for testing, 1438 pairs in the pool), labels 0-9. Stage 1: MLP
feature towers (32 -> 256 -> 64) trained by MMSSL, with and without 30
per-modality prototypes (K-means on the whole pool every epoch after a
10-epoch warm-up), for each seed. Then every selector (random, KGC, K-means,
ActiveFT, MMCSAL-proto, MMCSAL-align, MMCSAL) buys 1 / 2 / 5 / 10% of the
labels, and a linear classifier on the concatenated (standardised) pixels of
the bought pairs is scored on the test pairs: the paper's supervised
protocol (Table 1), where only the selection differs between strategies.
10 seeds: about 7 minutes on 2 CPU cores (README, MMCSAL section).
"""
from mmal_jax import mmcsal


def get_config():
  config = mmcsal.base_config()
  config.data.update(source="digits", test_fraction=0.2, seed=0)
  config.seeds = tuple(range(10))  # The paper's 10 runs.
  config.model.update(image=dict(kind="mlp", hidden_dims=(256,)),
                      text=dict(kind="mlp", hidden_dims=(256,)), out_dim=64)
  config.stage1.update(epochs=40, warmup_epochs=10, batch_size=256,
                       num_prototypes=30, kmeans_iters=30)
  config.downstream.update(features="inputs", hidden_dims=(), steps=300,
                           lr=1e-2, wd=1e-4)
  return config
