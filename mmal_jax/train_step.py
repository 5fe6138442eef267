"""Data-parallel training step for two-tower models (SigLIP, CLIP, LiT).

The state is a plain dict pytree, `{"params", "opt", "step", "rng"}`,
replicated over the mesh of `mmal_jax.sharding` (so orbax saves it as is).
Batches are dicts `{"image": (B, ...), "text": (B, ...)}` split along
`sharding.ROW_AXES`: each device runs both towers on its B/n rows (XLA sums the
gradients across devices), then the contrastive loss of the global batch is
computed with explicit collectives (`losses`, in `jax.shard_map`).

Compute precision is the towers' `dtype_mm` (e.g. "bfloat16", see
`presets`); parameters, optimizer state and the loss stay float32.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from mmal_jax import losses
from mmal_jax import sharding

TrainState = dict  # {"params": tree, "opt": optax state, "step", "rng"}


def make_state_init(optimizer: optax.GradientTransformation, mesh: Mesh
                    ) -> Callable[[Any, jax.Array], TrainState]:
  """Jitted `(params, rng) -> state`: fresh optimizer state, step 0.

  Build it once and call it for every fit: it compiles once per param shapes.
  """

  def init(params, rng):
    return {"params": params, "opt": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": rng}

  return jax.jit(init, out_shardings=sharding.replicated(mesh))


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation,
                     mesh: Mesh, rng: jax.Array, batch: dict[str, Any], *,
                     params=None) -> TrainState:
  """Initialises (or adopts `params`) and the optimizer, replicated on `mesh`.

  `batch` gives input shapes and dtypes only (arrays or ShapeDtypeStructs);
  init runs on one example. Cost: one compile + init of the model.
  """
  init_rng, state_rng = jax.random.split(rng)
  if params is None:
    example = {k: jnp.zeros((1,) + tuple(v.shape[1:]), v.dtype)
               for k, v in batch.items()}
    params = jax.jit(lambda r: model.init(r, example["image"],
                                          example["text"])["params"],
                     out_shardings=sharding.replicated(mesh))(init_rng)
  return make_state_init(optimizer, mesh)(params, state_rng)


def make_loss(name: str, mesh: Mesh, method: str = "all_gather") -> Callable:
  """`(zimg, ztxt, out) -> scalar` global-batch loss over row-sharded z's.

  name: "siglip" (needs the model's bias `b`) or "clip"; method: the SigLIP
  collective, "all_gather" or "ring" (CLIP always gathers).
  """
  rows = sharding.row_spec()
  if name == "siglip":
    fn = functools.partial(losses.siglip_loss, axis_name=sharding.ROW_AXES,
                           method=method)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, P(), P()),
                            out_specs=P())
    return lambda zimg, ztxt, out: sharded(zimg, ztxt, out["t"], out["b"])
  if name == "clip":
    fn = functools.partial(losses.clip_loss, axis_name=sharding.ROW_AXES)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, P()),
                            out_specs=P())
    return lambda zimg, ztxt, out: sharded(zimg, ztxt, out["t"])
  raise ValueError(f"Unknown loss {name!r}: 'siglip' or 'clip'.")


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    mesh: Mesh, *, loss: str = "siglip",
                    loss_method: str = "all_gather",
                    frozen: Optional[Any] = None) -> Callable:
  """Returns jitted `step(state, batch) -> (state, metrics)`.

  `frozen`: bool tree like the params (`optim.frozen_mask`); those leaves are
  cut from the gradient (`stop_gradient`), so XLA skips the backward pass of a
  locked tower (LiT), and the optimizer must leave them unchanged.
  metrics: loss, t, b (if the model has one), grad_norm (global L2 norm).
  The batch size must be divisible by the mesh size. The input state is
  donated (its buffers are reused for the output state).
  """
  loss_fn = make_loss(loss, mesh, loss_method)

  def step(state, batch):
    dropout_rng = jax.random.fold_in(state["rng"], state["step"])

    def objective(params):
      if frozen is not None:
        params = jax.tree.map(
            lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
      zimg, ztxt, out = model.apply(
          {"params": params}, batch["image"], batch["text"], train=True,
          rngs={"dropout": dropout_rng})
      return loss_fn(zimg, ztxt, out), out

    (value, out), grads = jax.value_and_grad(objective, has_aux=True)(
        state["params"])
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": value, "t": out["t"][0],
               "grad_norm": optax.tree.norm(grads)}
    if "b" in out:
      metrics["b"] = out["b"][0]
    new_state = {**state, "params": params, "opt": opt,
                 "step": state["step"] + 1}
    return new_state, metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, sharding.row_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
