r"""Your own precomputed features: the pool loop over `.npy` vectors.

  python -m mmal_jax.main --config configs/features.py --workdir DIR \
      --config.data.image_features=img.npy \
      --config.data.text_features=txt.npy --config.data.pairs=pairs.npy \
      --config.feature_dims=512,384

Feature rows of each modality (`(N_m, F_m)` float arrays, `.npy` or `.npz`),
the true pairs (`(P, 2)` int: image row, text row; `.npy` or `.csv`), and
optionally a held-out split of your own (`--config.data.eval_pairs=...`;
otherwise `data.eval_fraction` of the pairs, seeded). Each modality passes
an MLP tower into a shared 128-d space trained with the SigLIP loss;
`feature_dims` must be the files' widths (checked before any work).

Where the towers start:
  configs/features.py            from scratch (init.kind="scratch");
  configs/features.py:pretrain   pre-trained, then fine-tuned each round
      (the paper's regime): `data.pretrain_fraction` (0.2, seeded) of the
      pool's pairs are held out of the pool and the eval set and the towers
      are trained contrastively on them (`config.pretrain`) before round 1.
      To name the pairs yourself instead:
      --config.data.pretrain_fraction=0 --config.data.pretrain_pairs=FILE
      (rows of the pairs file; `.npy` flags or indices, or `.txt`).
"""
from mmal_jax import config_lib
from mmal_jax.models import presets


def get_config(start: str = "scratch"):
  if start not in ("scratch", "pretrain"):
    raise ValueError(f"configs/features.py:{start}: expected "
                     f"configs/features.py:scratch or :pretrain.")
  config = config_lib.base_config()
  config_lib.use_preset(config, presets.features(512, 512, out_dim=128))
  config.data.source = "features"
  config.init.kind = start
  if start == "pretrain":
    config.data.pretrain_fraction = 0.2
  config.train.update(epochs=20, batch_size=64)
  config.budget = 64
  config.report.main_metric = "retrieval/t2i_r@1"
  config.report.metrics = ("retrieval/i2t_r@1", "pseudo_label/mean")
  return config
