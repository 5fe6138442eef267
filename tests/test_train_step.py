"""The data-parallel train step: = single-device step; LiT; bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

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


# FSDP (issue 10.1): `pytest -k fsdp`.
EIGHT = pytest.mark.skipif(jax.device_count() != 8,
                           reason="needs 8 devices: XLA_FLAGS="
                           "--xla_force_host_platform_device_count=8")
MESHES = [(1, 8), (2, 4), (8, 1)]  # (data, fsdp)


def test_fsdp_spec_splits_the_largest_dimension_that_divides():
  spec = sharding.fsdp_spec
  assert spec((768, 3072), 8, min_elements=0) == P(None, "fsdp")
  assert spec((12, 768, 3072), 256, min_elements=0) == P(None, None, "fsdp")
  assert spec((1152, 4304), 256, min_elements=0) == P()  # nothing divides
  assert spec((1152, 4304), 8, min_elements=0) == P(None, "fsdp")
  assert spec((64, 64), 8, min_elements=0) == P("fsdp", None)  # first of ties
  assert spec((768, 3072), 1, min_elements=0) == P()
  assert spec((), 8, min_elements=0) == P()
  assert spec((768, 3072), 8) == P(None, "fsdp")  # 2.4M elements >= 2**20
  assert spec((768, 768), 8) == P()  # under big_vision's 4 MiB


def test_fsdp_bytes_per_device_from_shapes():
  tree = {"w": jax.ShapeDtypeStruct((1024, 512), jnp.float32),
          "m": jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16),
          "odd": jax.ShapeDtypeStruct((7, 5), jnp.float32),
          "count": jax.ShapeDtypeStruct((), jnp.int32)}
  whole = 1024 * 512 * 6 + 35 * 4 + 4
  assert sharding.bytes_per_device(tree, 1, min_elements=0) == whole
  assert sharding.bytes_per_device(tree, 256, min_elements=0) == (
      1024 * 512 * 6 // 256 + 35 * 4 + 4)


def _fsdp_setup(data, fsdp, loss="siglip", loss_method="all_gather",
                tx=None):
  mesh = sharding.make_mesh(data=data, fsdp=fsdp)
  config = presets.tiny(loss)
  config.optim.update(warmup_steps=0)
  batch = make_batch()
  model = two_towers.Model(**config.model)
  host_params = jax.device_get(jax.jit(model.init)(
      jax.random.PRNGKey(0), batch["image"][:1], batch["text"][:1])["params"])
  tx = tx or optim.make_optimizer(config.optim, host_params)
  state = train_step.make_state_init(tx, mesh, min_elements=0)(
      host_params, jax.random.PRNGKey(1))
  step = train_step.make_train_step(model, tx, mesh, loss=loss,
                                    loss_method=loss_method, min_elements=0)
  global_batch = {k: sharding.put_global(v, sharding.row_sharding(mesh))
                  for k, v in batch.items()}
  return mesh, tx, state, step, global_batch, host_params


def _device0_bytes(tree):
  device = jax.devices()[0]
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree)
             for shard in x.addressable_shards if shard.device == device)


@EIGHT
@pytest.mark.parametrize("loss,loss_method", [
    ("siglip", "all_gather"), ("siglip", "ring"), ("clip", "all_gather")])
def test_fsdp_step_is_the_same_on_every_mesh_shape(loss, loss_method):
  # SGD with momentum: parameters move linearly with the gradients (Adam's
  # first step is ~lr * sign(g): rounding-level gradients would flip weights).
  tx = optax.sgd(0.1, momentum=0.9)
  results = []
  for data, fsdp in MESHES:
    _, _, state, step, batch, _ = _fsdp_setup(data, fsdp, loss, loss_method,
                                              tx)
    for _ in range(2):
      state, metrics = step(state, batch)
    kernel = state["params"]["img"]["embedding"]["kernel"]
    assert kernel.sharding.spec == (P(None, None, None, "fsdp") if fsdp > 1
                                    else P())
    results.append((jax.device_get(metrics), jax.device_get(state)))
  want_metrics, want_state = results[0]
  for metrics, state in results[1:]:
    for name, value in metrics.items():
      np.testing.assert_allclose(value, want_metrics[name], rtol=1e-5)
    # Updates are ~1e-2; float32 sums in another order differ by ~1e-6.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=5e-6),
                 state, want_state)


@EIGHT
def test_fsdp_shrinks_per_device_state_bytes():
  per_device = {}
  for data, fsdp in MESHES:
    mesh, tx, state, step, batch, host_params = _fsdp_setup(data, fsdp)
    state, _ = step(state, batch)
    per_device[fsdp] = (_device0_bytes(state["params"]),
                        _device0_bytes(state["opt"]))
    want = sharding.bytes_per_device(
        train_step.abstract_state(tx, host_params, mesh, min_elements=0),
        fsdp, min_elements=0)
    assert sum(per_device[fsdp]) + _device0_bytes(
        {k: state[k] for k in ("step", "rng")}) == want
  whole = sum(x.nbytes for x in jax.tree.leaves(host_params))
  assert per_device[1][0] == whole
  assert per_device[8][0] < per_device[4][0] < per_device[1][0]
  assert per_device[8][1] < per_device[4][1] < per_device[1][1]
  assert per_device[8][0] < whole / 4  # Only tiny leaves stay whole.


@EIGHT
def test_fsdp_state_restores_onto_another_mesh_with_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _, tx, state, step, batch, host_params = _fsdp_setup(2, 4)
  state, _ = step(state, batch)
  saved = jax.device_get(state)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
  for data, fsdp in [(8, 1), (1, 8)]:
    mesh = sharding.make_mesh(data=data, fsdp=fsdp)
    target = train_step.abstract_state(tx, host_params, mesh, min_elements=0)
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(tmp_path / "state", target)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
                 saved)
    jax.tree.map(lambda x, t: assert_sharding(x, t.sharding), restored,
                 target)


def assert_sharding(x, want):
  assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)


LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def lowered_programs(fn):
  """(fn(), names of the programs jax lowered meanwhile): one per compile or
  compilation-cache lookup."""
  names = []
  listen = lambda event, _, **kw: names.append(kw.get("fun_name")) if (
      event == LOWERING) else None
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    return fn(), names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def test_state_init_is_one_program_compiled_once():
  """Parameters and optimizer state come from one jitted program (layout
  from jax.eval_shape, no separate parameter compile); a parameter init
  compiles once for any seed."""
  mesh, config, batch = sharding.make_mesh(), presets.tiny(), make_batch()
  model = two_towers.Model(**config.model)
  init = train_step.make_params_init(model, mesh, batch)
  params, names = lowered_programs(lambda: [init(jax.random.PRNGKey(seed))
                                            for seed in (0, 1)])
  assert names == ["jit(init_params)"]
  tx = optim.make_optimizer(config.optim, params[0])
  state, names = lowered_programs(lambda: train_step.init_train_state(
      model, tx, mesh, jax.random.PRNGKey(0), batch))
  assert names == ["jit(init_state)"]
  # The same values as init_params on the first half of the split key.
  jax.tree.map(np.testing.assert_array_equal, state["params"],
               init(jax.random.split(jax.random.PRNGKey(0))[0]))


def test_fsdp_state_init_schedule_lengths_without_recompiling():
  mesh = sharding.make_mesh()
  config = presets.tiny()
  batch = make_batch()
  model = two_towers.Model(**config.model)
  params = train_step.init_params(model, mesh, jax.random.PRNGKey(0), batch)
  tx = optim.make_optimizer(config.optim, params)
  init = train_step.make_state_init(tx, mesh)
  for total in (10, 20):
    state = init(params, jax.random.PRNGKey(0), warmup_steps=2,
                 total_steps=total)
    schedule = [x for x in jax.tree.leaves(
        state["opt"], is_leaf=lambda x: isinstance(x, optim.ScheduleState))
                if isinstance(x, optim.ScheduleState)]
    assert [int(s.total_steps) for s in schedule] == [total]
  with pytest.raises(ValueError, match="both"):
    init(params, jax.random.PRNGKey(0), warmup_steps=2)
