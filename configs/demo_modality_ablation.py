r"""Paper 1, Table 2: the modality-selection ablation, at the demo's CPU scale.

  for m in auto random text image; do
    python -m mmal_jax.main --config configs/demo_modality_ablation.py:$m \
        --workdir /tmp/ablation_$m
  done

`configs/demo.py` with mmal only, its Step 1 replaced by `modality`: "auto"
(Algorithm 1's least-covered modality), "random", "text" or "image" (the
argument after ":" in --config; default "auto"). One workdir each, then one
table and figure over the four (`mmal_jax.sweep`):

  python -m mmal_jax.report --out /tmp/ablation \
      --workdirs /tmp/ablation_auto,/tmp/ablation_random,/tmp/ablation_text,/tmp/ablation_image

Each workdir's modality_queries.png shows which modality was bought per round.
"""
import os

from mmal_jax import config_lib


def get_config(modality: str = "auto"):
  if modality not in ("auto", "random", "text", "image"):
    raise ValueError(f"modality must be auto, random, text or image, got "
                     f"{modality!r}.")
  config = config_lib.from_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  config.strategies = ("mmal",)
  config.strategy_hparams.mmal.modality = modality
  return config
