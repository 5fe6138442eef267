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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


def warmup_cosine(step, warmup_steps, total_steps):
  """Multiplier in [0, 1]: linear 0 -> 1 over `warmup_steps`, cosine to 0 at
  `total_steps` (optax's `warmup_cosine_decay_schedule`); jnp, so the step
  counts may be traced arrays."""
  step = jnp.asarray(step, jnp.float32)
  warmup = jnp.asarray(warmup_steps, jnp.float32)
  decay = jnp.maximum(jnp.asarray(total_steps, jnp.float32) - warmup, 1.)
  rising = step / jnp.maximum(warmup, 1.)
  progress = jnp.clip((step - warmup) / decay, 0., 1.)
  return jnp.where(step < warmup, rising, 0.5 * (1 + jnp.cos(jnp.pi * progress)))


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """`warmup_cosine` with the config's `warmup_steps` and `total_steps`."""
  return lambda step: warmup_cosine(step, config.warmup_steps,
                                    config.total_steps)


class ScheduleState(NamedTuple):
  """Step count and schedule length, as arrays: changing the length (e.g. a
  new active-learning round with more pairs) needs no recompilation."""
  count: jax.Array
  warmup_steps: jax.Array
  total_steps: jax.Array


def scale_by_warmup_cosine(warmup_steps: int, total_steps: int
                           ) -> optax.GradientTransformation:
  """Scales updates by `warmup_cosine(count, ...)`, the lengths in the state."""

  def init(params):
    del params
    return ScheduleState(jnp.zeros([], jnp.int32),
                         jnp.asarray(warmup_steps, jnp.int32),
                         jnp.asarray(total_steps, jnp.int32))

  def update(updates, state, params=None):
    del params
    factor = warmup_cosine(state.count, state.warmup_steps, state.total_steps)
    updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
    return updates, state._replace(count=state.count + 1)

  return optax.GradientTransformation(init, update)


def set_schedule(opt_state, warmup_steps: int, total_steps: int):
  """`opt_state` with the schedule restarted at step 0 over `total_steps`."""
  is_schedule = lambda x: isinstance(x, ScheduleState)
  return jax.tree.map(
      lambda x: ScheduleState(jnp.zeros_like(x.count),
                              jnp.full_like(x.warmup_steps, warmup_steps),
                              jnp.full_like(x.total_steps, total_steps))
      if is_schedule(x) else x, opt_state, is_leaf=is_schedule)


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
      scale_by_warmup_cosine(config.warmup_steps, config.total_steps),
      optax.scale(-1.))
  labels = jax.tree.map(lambda f: "frozen" if f else "trainable",
                        frozen_mask(config, params))
  return optax.multi_transform(
      {"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
