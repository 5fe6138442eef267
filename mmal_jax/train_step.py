"""Sharded training step for two-tower models (SigLIP, CLIP, LiT).

The state is a plain dict pytree, `{"params", "opt", "step", "rng"}`, laid out
on the `("data", "fsdp")` mesh of `mmal_jax.sharding`: every leaf (parameters,
Adam moments, schedule scalars) by `sharding.fsdp_spec`, i.e. split over
`"fsdp"` along its largest dimension that divides, replicated over `"data"`
(with `fsdp=1` everything is replicated: plain data parallelism). The state is
created directly in that layout (`make_state_init`, `init_params`) and orbax
saves and restores it onto any mesh (`abstract_state`).

Batches are dicts `{"image": (B, ...), "text": (B, ...)}` split over both mesh
axes (`sharding.ROW_AXES`): each device runs both towers on its B/n rows, XLA
gathers the sharded weights it needs and reduce-scatters the gradients, and
the contrastive loss of the global batch is computed with explicit
collectives over every device (`losses`, in `jax.shard_map`).

Compute precision is the towers' `dtype_mm` (e.g. "bfloat16", see
`presets`); parameters, optimizer state and the loss stay float32.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from mmal_jax import losses
from mmal_jax import optim
from mmal_jax import sharding

TrainState = dict  # {"params": tree, "opt": optax state, "step", "rng"}


def _new_state(optimizer, params, rng) -> TrainState:
  return {"params": params, "opt": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": rng}


def _constrain(tree, mesh: Mesh, min_elements: int):
  """`tree` (traced) pinned to its FSDP layout; shapes decide, see module."""
  return jax.lax.with_sharding_constraint(
      tree, sharding.param_shardings(tree, mesh, min_elements=min_elements))


def state_shapes(optimizer: optax.GradientTransformation, params
                 ) -> TrainState:
  """The train state's `jax.ShapeDtypeStruct`s for `params` (arrays or
  ShapeDtypeStructs); no compute or allocation (`jax.eval_shape`)."""
  return jax.eval_shape(functools.partial(_new_state, optimizer), params,
                        jax.ShapeDtypeStruct((2,), jnp.uint32))


def abstract_state(optimizer: optax.GradientTransformation, params,
                   mesh: Mesh, *,
                   min_elements: int = sharding.FSDP_MIN_ELEMENTS
                   ) -> TrainState:
  """The train state as `jax.ShapeDtypeStruct`s carrying their shardings.

  `params`: arrays or ShapeDtypeStructs. The target of an orbax
  `StandardRestore`, which then puts every array in this layout on `mesh`,
  whatever mesh the state was saved from. No compute (`jax.eval_shape`).
  """
  shapes = state_shapes(optimizer, params)
  shardings = sharding.param_shardings(shapes, mesh, min_elements=min_elements)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shardings)


def state_shardings(optimizer: optax.GradientTransformation, params,
                    mesh: Mesh, *,
                    min_elements: int = sharding.FSDP_MIN_ELEMENTS):
  """The `NamedSharding` of every leaf of the train state (see
  `abstract_state`)."""
  return jax.tree.map(lambda x: x.sharding,
                      abstract_state(optimizer, params, mesh,
                                     min_elements=min_elements))


def place_params(params, mesh: Mesh, *,
                 min_elements: int = sharding.FSDP_MIN_ELEMENTS):
  """`params` in their FSDP layout on `mesh`.

  Host arrays (e.g. from `checkpoint.load`) are copied shard by shard, each
  process its own devices' shards (`sharding.put_global`); device arrays in
  another layout are resharded (`jax.device_put`); arrays already in place
  are returned as they are.
  """
  def place(x, target):
    if isinstance(x, jax.Array):
      return x if x.sharding == target else jax.device_put(x, target)
    return sharding.put_global(np.asarray(x), target)

  return jax.tree.map(place, params, sharding.param_shardings(
      params, mesh, min_elements=min_elements))


def _example_init(model: nn.Module, batch: dict[str, Any]) -> Callable:
  """`init(rng) -> params` of `model` on one example shaped like `batch`."""
  shapes = {k: ((1,) + tuple(batch[k].shape[1:]), batch[k].dtype)
            for k in ("image", "text")}

  def init_params(rng):  # The name shows in compile logs.
    return model.init(
        rng, *(jnp.zeros(*shapes[k]) for k in ("image", "text")))["params"]

  return init_params


def make_params_init(model: nn.Module, mesh: Mesh, batch: dict[str, Any], *,
                     min_elements: int = sharding.FSDP_MIN_ELEMENTS
                     ) -> Callable[[jax.Array], dict]:
  """Jitted `init(rng) -> params`, each leaf created in its FSDP layout.

  `batch` gives input shapes and dtypes only (arrays or ShapeDtypeStructs).
  The layout comes from `jax.eval_shape` (tracing, no compile) and is the
  program's `out_shardings`, so no device ever holds more than its shards.
  Cost: one compile on the first call (any rng after that reuses it), then
  the initialisation of the model (the traced example's forward pass is dead
  code XLA removes).
  """
  init = _example_init(model, batch)
  shardings = sharding.param_shardings(
      jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32)), mesh,
      min_elements=min_elements)
  return jax.jit(init, out_shardings=shardings)


def init_params(model: nn.Module, mesh: Mesh, rng: jax.Array,
                batch: dict[str, Any], *,
                min_elements: int = sharding.FSDP_MIN_ELEMENTS):
  """Random parameters of `model`, created directly in their FSDP layout
  (`make_params_init`; build that once to initialise several times)."""
  return make_params_init(model, mesh, batch, min_elements=min_elements)(rng)


def make_state_init(optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    min_elements: int = sharding.FSDP_MIN_ELEMENTS
                    ) -> Callable[..., TrainState]:
  """`init(params, rng, *, warmup_steps=None, total_steps=None) -> state`.

  Fresh optimizer state, step 0, every leaf created in its FSDP layout on
  `mesh` (`params` are first placed there by `place_params`, so host arrays
  never land whole on one device). `warmup_steps` / `total_steps` set the
  schedule's lengths (`optim.set_schedule`) as traced values: build `init`
  once and call it for every fit; it compiles once per parameter shapes.
  """

  @jax.jit
  def init(params, rng, warmup_steps, total_steps):
    state = _new_state(optimizer, params, rng)
    if warmup_steps is not None:
      state["opt"] = optim.set_schedule(state["opt"], warmup_steps,
                                        total_steps)
    return _constrain(state, mesh, min_elements)

  def call(params, rng, *, warmup_steps=None, total_steps=None):
    if (warmup_steps is None) != (total_steps is None):
      raise ValueError("Give both warmup_steps and total_steps, or neither.")
    lengths = [None if n is None else jnp.asarray(n, jnp.int32)
               for n in (warmup_steps, total_steps)]
    rng = sharding.put_global(np.asarray(rng), sharding.replicated(mesh))
    return init(place_params(params, mesh, min_elements=min_elements), rng,
                *lengths)

  call._cache_size = init._cache_size  # Compilations so far, as a jit's.
  return call


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation,
                     mesh: Mesh, rng: jax.Array, batch: dict[str, Any], *,
                     params=None,
                     min_elements: int = sharding.FSDP_MIN_ELEMENTS
                     ) -> TrainState:
  """Initialises (or adopts `params`) and the optimizer, sharded on `mesh`.

  `batch` gives input shapes and dtypes only. Without `params`, one jitted
  program creates parameters and optimizer state together, every leaf in its
  FSDP layout (`out_shardings` from `jax.eval_shape`): one compile, no
  separate one for the parameters. Cost: that compile + the initialisation.
  """
  if params is not None:
    return make_state_init(optimizer, mesh, min_elements=min_elements)(
        params, jax.random.split(rng)[1])
  init_model = _example_init(model, batch)

  def init_state(key):
    init_key, state_key = jax.random.split(key)
    return _new_state(optimizer, init_model(init_key), state_key)

  shardings = sharding.param_shardings(jax.eval_shape(init_state, rng), mesh,
                                       min_elements=min_elements)
  rng = sharding.put_global(np.asarray(rng), sharding.replicated(mesh))
  return jax.jit(init_state, out_shardings=shardings)(rng)


def make_loss(name: str, mesh: Mesh, method: str = "all_gather") -> Callable:
  """`(zimg, ztxt, out, valid=None) -> scalar` global-batch loss over
  row-sharded z's.

  name: "siglip" (needs the model's bias `b`) or "clip"; method: the SigLIP
  collective, "all_gather" or "ring" (CLIP always gathers). The rows are
  split over both mesh axes, the collectives run over `sharding.ROW_AXES`.
  valid: optional (B,) bool, the real rows of a padded batch (`losses`).
  """
  rows = sharding.row_spec()
  if name == "siglip":
    fn = functools.partial(losses.siglip_loss, axis_name=sharding.ROW_AXES,
                           method=method)
    scalars = lambda out: (out["t"], out["b"])
  elif name == "clip":
    fn = functools.partial(losses.clip_loss, axis_name=sharding.ROW_AXES)
    scalars = lambda out: (out["t"],)
  else:
    raise ValueError(f"Unknown loss {name!r}: 'siglip' or 'clip'.")

  def loss(zimg, ztxt, out, valid=None):
    args = (zimg, ztxt, *scalars(out)) + (() if valid is None else (valid,))
    specs = (rows, rows) + (P(),) * len(scalars(out)) + (
        () if valid is None else (rows,))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P())(*args)

  return loss


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    mesh: Mesh, *, loss: str = "siglip",
                    loss_method: str = "all_gather",
                    frozen: Optional[Any] = None,
                    min_elements: int = sharding.FSDP_MIN_ELEMENTS
                    ) -> Callable:
  """Returns jitted `step(state, batch) -> (state, metrics)`.

  `state` as `make_state_init` lays it out; the new state keeps that layout
  (parameters, gradients and optimizer state stay FSDP-sharded), metrics are
  replicated. `frozen`: bool tree like the params (`optim.frozen_mask`);
  those leaves are cut from the gradient (`stop_gradient`), so XLA skips the
  backward pass of a locked tower (LiT), and the optimizer must leave them
  unchanged. metrics: loss, t, b (if the model has one), grad_norm (global
  L2 norm). The batch size must be divisible by the mesh size; a batch
  padded to it (`data.pipeline.train_batches`) carries `"valid"`, (B,) bool,
  and its padded rows take part in no pair of the loss (`losses`), so the
  step equals that of the real rows alone. The input
  state is donated (its buffers are reused for the output state).
  Cost: forward + backward of both towers on B examples; per device
  parameter memory 1/fsdp of the sharded leaves plus one gathered layer's
  weights at a time (XLA schedules the all-gathers).
  """
  loss_fn = make_loss(loss, mesh, loss_method)
  constrain = functools.partial(_constrain, mesh=mesh,
                                min_elements=min_elements)

  def step(state, batch):
    dropout_rng = jax.random.fold_in(state["rng"], state["step"])

    def objective(params):
      if frozen is not None:
        params = jax.tree.map(
            lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
      zimg, ztxt, out = model.apply(
          {"params": params}, batch["image"], batch["text"], train=True,
          rngs={"dropout": dropout_rng})
      return loss_fn(zimg, ztxt, out, batch.get("valid")), out

    (value, out), grads = jax.value_and_grad(objective, has_aux=True)(
        state["params"])
    grads = constrain(grads)
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": value, "t": out["t"][0],
               "grad_norm": optax.tree.norm(grads)}
    if "b" in out:
      metrics["b"] = out["b"][0]
    new_state = {**state, "params": params, "opt": opt,
                 "step": state["step"] + 1}
    return constrain(new_state), metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(None, sharding.row_sharding(mesh)),
                 out_shardings=(None, replicated), donate_argnums=(0,))
