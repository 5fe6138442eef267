r"""MMCSAL on VGGSound (audio-video), the paper's protocol on features.

  python -m mmal_jax.main --config configs/mmcsal_vggsound.py --workdir DIR \
      --config.data.train_features=audio_train.npy,video_train.npy \
      --config.data.train_labels=labels_train.npy \
      --config.data.test_features=audio_test.npy,video_test.npy \
      --config.data.test_labels=labels_test.npy

Needs your files (nothing is downloaded): one float `.npy` `(N, F_m)` per
modality (the paper had 180,911 training and 14,843 test clips, 309
classes), int `.npy` labels; paths may be gs://. Use an accelerator: a
selection at 10% optimises 18k centroids against 181k pairs.

Paper settings: 512-d linear projectors, MMSSL 45 epochs with a 15-epoch
warm-up, batch 256, 5000 prototypes, tau = 0.07, lr 1e-3; selection as
Food101's (about 100k rows sampled per iteration, as ActiveFT on
ImageNet); 5 runs. Same deviation as configs/mmcsal_food101.py.
"""
from mmal_jax import mmcsal


def get_config():
  return mmcsal.feature_protocol(
      ("audio", "video"), test_fraction=0.08, num_seeds=5,
      epochs=45, warmup_epochs=15, num_prototypes=5000)
