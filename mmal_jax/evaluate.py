"""The pool metrics, re-exported from `mmal_jax.evaluators` (their home)."""
from mmal_jax.evaluators.colorswap import colorswap_scores, groupmatch_score  # noqa: F401
from mmal_jax.evaluators.gap import modality_gap  # noqa: F401
from mmal_jax.evaluators.pool_metrics import pool_metrics  # noqa: F401
from mmal_jax.evaluators.pseudo_label import (margin_by_correctness,  # noqa: F401
                                              pseudo_label_accuracy)
from mmal_jax.evaluators.retrieval import retrieval_recall  # noqa: F401
