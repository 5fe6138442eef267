r"""MMCSAL on Food101 (image-text): the paper's protocol on features.

  python -m mmal_jax.main --config configs/mmcsal_food101.py --workdir DIR \
      --config.data.train_features=img_train.npy,txt_train.npy \
      --config.data.train_labels=labels_train.npy \
      --config.data.test_features=img_test.npy,txt_test.npy \
      --config.data.test_labels=labels_test.npy

Needs your files (nothing is downloaded): one float `.npy` `(N, F_m)` per
modality, row i of each = recipe i (UPMC Food101: 45,719 training and 15,294
test pairs), and int `.npy` labels `(N,)` in [0, 101); paths may be gs://.
E.g. ResNet-101 image and BERT-base text features. Without test files, a
`data.test_fraction` of the pairs is held out.

Paper settings (Sec. 4.3, App. 6): 512-d representations from one linear
projector per modality, MMSSL 25 epochs with a 5-epoch warm-up (prototypes
after it), batch 256, 1000 prototypes, tau = 0.07, AdamW betas (0.9, 0.95)
wd 0.02, lr 1e-3 for the projectors; selection lr 1e-3 (cosine), 300
iterations, lambda_div = lambda_align = 1; budgets 1/2/5/10%; 10 runs.
Deviation: on features only the projectors train in Stage 1 (the paper also
fine-tunes the backbones), and the downstream model is a linear classifier
on the concatenated features.
"""
from mmal_jax import mmcsal


def get_config():
  return mmcsal.feature_protocol(
      ("image", "text"), test_fraction=0.25, num_seeds=10,
      epochs=25, warmup_epochs=5, num_prototypes=1000)
