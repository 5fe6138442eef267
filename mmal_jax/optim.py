"""AdamW with warm-up + cosine schedule, clipping, and locked (frozen) params.

Config fields (`ml_collections.ConfigDict`, see `presets.optimizer`):
  lr, wd, b1, b2, eps, mu_dtype (e.g. "bfloat16" for the first moment),
  grad_clip_norm (0/None: off), warmup_steps, total_steps,
  locked_tower: None, "img" or "txt" (LiT locks "img"): adds "<tower>/.*" to
    frozen (named so because `ConfigDict.lock` is a method),
  frozen: regexes matched in full against '/'-joined parameter paths,
  wd_regex: which parameters decay (big_vision's default: every `kernel`).

Update, as big_vision composes it: u = -s(t) * (lr * adam(clip(g)) + wd * p),
s the warm-up + cosine multiplier in [0, 1]; wd is decoupled and *not*
multiplied by lr (big_vision's convention; optax.adamw's wd equals wd / lr
here). Locked parameters get no update and carry no optimizer state: the
optimizer is an `optax.multi_transform` whose "trainable" branch only sees the
unlocked leaves (its moments hold no arrays for the locked ones).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax


def param_names(tree) -> Any:
  """A tree like `tree` whose leaves are their '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"),
      tree)


def frozen_mask(config: ml_collections.ConfigDict, params) -> Any:
  """Bool tree like `params`: True where `locked_tower` / `frozen` match."""
  patterns = list(config.get("frozen", None) or ())
  if config.get("locked_tower", None):
    patterns.append(f"{config.locked_tower}/.*")
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda name: any(p.fullmatch(name) for p in compiled),
                      param_names(params))


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Multiplier: linear 0 -> 1 over `warmup_steps`, cosine to 0 at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0., peak_value=1., warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1))


def make_optimizer(config: ml_collections.ConfigDict,
                   params) -> optax.GradientTransformation:
  """The optimizer for `params` (arrays or shapes): see the module docstring.

  Memory: Adam's two moments for the unlocked parameters only.
  """
  wd_regex = re.compile(config.get("wd_regex", r"(.*/)?kernel"))
  decays = lambda tree: jax.tree.map(lambda n: bool(wd_regex.fullmatch(n)),
                                     param_names(tree))
  trainable = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm)
      if config.get("grad_clip_norm") else optax.identity(),
      optax.scale_by_adam(b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                          eps=config.get("eps", 1e-8),
                          mu_dtype=config.get("mu_dtype", None)),
      optax.scale(config.lr),
      optax.add_decayed_weights(config.get("wd", 0.), mask=decays),
      optax.scale_by_schedule(make_schedule(config)),
      optax.scale(-1.))
  labels = jax.tree.map(lambda f: "frozen" if f else "trainable",
                        frozen_mask(config, params))
  return optax.multi_transform(
      {"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
