r"""MMCSAL on KineticsSound (audio-video), the paper's protocol on features.

  python -m mmal_jax.main --config configs/mmcsal_kineticssound.py \
      --workdir DIR \
      --config.data.train_features=audio_train.npy,video_train.npy \
      --config.data.train_labels=labels_train.npy \
      --config.data.test_features=audio_test.npy,video_test.npy \
      --config.data.test_labels=labels_test.npy

Needs your files (nothing is downloaded): one float `.npy` `(N, F_m)` per
modality, row i of each = clip i (the paper's 31 classes of Kinetics-400:
22,588 training and 3,012 test clips), int `.npy` labels in [0, 31); paths
may be gs://. E.g. ResNet-18 spectrogram and R(2+1)D-18 video features.

Paper settings: 512-d linear projectors, MMSSL 45 epochs with a 15-epoch
warm-up, batch 256, 500 prototypes, tau = 0.07, lr 1e-3; selection as
Food101's; 10 runs. Same deviation as configs/mmcsal_food101.py.
"""
from mmal_jax import mmcsal


def get_config():
  return mmcsal.feature_protocol(
      ("audio", "video"), test_fraction=0.12, num_seeds=10,
      epochs=45, warmup_epochs=15, num_prototypes=500)
