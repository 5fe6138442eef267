"""The data-parallel train step: = single-device step; LiT; bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmal_jax import losses
from mmal_jax import optim
from mmal_jax import sharding
from mmal_jax import tokenizers
from mmal_jax import train_step
from mmal_jax.models import presets
from mmal_jax.models import two_towers

BATCH = 8  # divisible by 1 and 8 devices


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  captions = [f"picture {i} of a {w}" for i, w in
              enumerate(rng.choice(["cat", "dog", "car", "tree"], BATCH))]
  return {"image": rng.normal(size=(BATCH, 16, 16, 3)).astype(np.float32),
          "text": tokenizers.get_tokenizer("bytes").encode(captions, 8)}


def feature_batch():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(BATCH, 12)).astype(np.float32),
          "text": rng.normal(size=(BATCH, 20)).astype(np.float32)}


def setup(config, mesh, batch):
  model = two_towers.Model(**config.model)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["image"],
                          batch["text"])["params"]
  tx = optim.make_optimizer(config.optim, shapes)
  state = train_step.init_train_state(model, tx, mesh, jax.random.PRNGKey(0),
                                      batch)
  return model, tx, state


def test_step_equals_single_device_reference():
  """One ring-SigLIP step on every device = the plain full-batch step."""
  mesh = sharding.make_mesh()
  config = presets.tiny("siglip")
  batch = make_batch()
  model, tx, state = setup(config, mesh, batch)
  params0 = jax.device_get(state["params"])

  @jax.jit
  def reference_step(params):
    def loss_fn(params):
      zimg, ztxt, out = model.apply({"params": params}, batch["image"],
                                    batch["text"])
      return losses.siglip_loss(zimg, ztxt, out["t"], out["b"])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return loss, optax.tree.norm(grads), optax.apply_updates(params, updates)

  want_loss, want_grad_norm, want_params = reference_step(params0)
  step = train_step.make_train_step(model, tx, mesh, loss="siglip",
                                    loss_method="ring")
  global_batch = {k: sharding.put_global(v, sharding.row_sharding(mesh))
                  for k, v in batch.items()}
  new_state, metrics = step(state, global_batch)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], want_grad_norm, rtol=1e-4)
  np.testing.assert_allclose(metrics["t"], 10., rtol=1e-6)
  np.testing.assert_allclose(metrics["b"], -10., rtol=1e-6)
  assert int(new_state["step"]) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
               new_state["params"], want_params)


def test_lit_step_leaves_locked_tower_bit_identical():
  mesh = sharding.make_mesh()
  config = presets.features(12, 20, out_dim=16, kind="mlp", hidden_dims=(16,),
                            loss="clip")
  config.optim.update(locked_tower="img", warmup_steps=0)
  batch = feature_batch()
  model, tx, state = setup(config, mesh, batch)
  image_before = jax.device_get(state["params"]["img"])
  text_before = jax.device_get(state["params"]["txt"])
  opt_floats = sum(x.size for x in jax.tree.leaves(state["opt"])
                   if jnp.issubdtype(x.dtype, jnp.floating))
  unlocked = sum(x.size for name, tree in state["params"].items()
                 if name != "img" for x in jax.tree.leaves(tree))
  assert opt_floats == 2 * unlocked

  step = train_step.make_train_step(
      model, tx, mesh, loss="clip",
      frozen=optim.frozen_mask(config.optim, state["params"]))
  for _ in range(2):
    state, metrics = step(state, batch)
  assert np.isfinite(metrics["loss"]) and "b" not in metrics
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state["params"]["img"]), image_before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(state["params"]["txt"]), text_before)
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_feature_towers_train(dtype):
  mesh = sharding.make_mesh()
  config = presets.features(12, 20, out_dim=16, kind="mlp", hidden_dims=(16,),
                            dtype=dtype)
  config.optim.update(lr=1e-2, warmup_steps=0)
  batch = feature_batch()
  model, tx, state = setup(config, mesh, batch)
  step = train_step.make_train_step(model, tx, mesh, loss="siglip")
  history = []
  for _ in range(10):
    state, metrics = step(state, batch)
    history.append(float(metrics["loss"]))
  assert history[-1] < history[0], history
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
