"""Optimizer: schedule, decoupled weight decay, locking without state memory."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmal_jax import optim
from mmal_jax.models import presets

PARAMS = {
    "img": {"Dense_0": {"kernel": jnp.full((3, 4), 2.), "bias": jnp.ones(4)}},
    "txt": {"head": {"kernel": jnp.full((4, 2), 3.), "bias": jnp.ones(2)}},
    "t": jnp.zeros(1),
}


def test_schedule_warms_up_linearly_then_decays_by_cosine():
  schedule = optim.make_schedule(presets.optimizer(warmup_steps=10,
                                                   total_steps=110))
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)],
                             [0., .5, 1.], atol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.5, atol=1e-6)  # cosine midpoint
  np.testing.assert_allclose(schedule(110), 0., atol=1e-6)


def test_weight_decay_is_decoupled_and_only_on_kernels():
  config = presets.optimizer(lr=0.1, wd=0.01, warmup_steps=0, total_steps=100)
  tx = optim.make_optimizer(config, PARAMS)
  zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
  # Step 0 has s = 1 (no warm-up); Adam's direction of a zero gradient is 0.
  updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["img"]["Dense_0"]["kernel"], -0.01 * 2.)
  np.testing.assert_allclose(updates["txt"]["head"]["kernel"], -0.01 * 3.)
  np.testing.assert_array_equal(updates["img"]["Dense_0"]["bias"], 0.)
  np.testing.assert_array_equal(updates["t"], 0.)


def test_adam_step_with_clipping():
  config = presets.optimizer(lr=0.1, wd=0., grad_clip_norm=1.0, warmup_steps=0,
                             total_steps=100, b1=0.9, b2=0.95)
  tx = optim.make_optimizer(config, PARAMS)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.), PARAMS)
  updates, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  # First Adam step: bias-corrected m / sqrt(v) = sign(g), whatever clipping.
  for u in jax.tree.leaves(updates):
    np.testing.assert_allclose(u, -0.1, rtol=1e-5)
  adam_state = state.inner_states["trainable"].inner_state[1]
  clipped = 100. / optax.tree.norm(grads)  # every clipped entry
  np.testing.assert_allclose(adam_state.mu["t"], 0.1 * clipped, rtol=1e-5)


def test_locked_tower_gets_no_updates_and_no_state():
  config = presets.optimizer(locked_tower="img", frozen=("t",), warmup_steps=0)
  mask = optim.frozen_mask(config, PARAMS)
  assert mask == {"img": {"Dense_0": {"kernel": True, "bias": True}},
                  "txt": {"head": {"kernel": False, "bias": False}},
                  "t": True}
  tx = optim.make_optimizer(config, PARAMS)
  state = tx.init(PARAMS)
  state_floats = sum(x.size for x in jax.tree.leaves(state)
                     if jnp.issubdtype(x.dtype, jnp.floating))
  trainable = 4 * 2 + 2
  assert state_floats == 2 * trainable  # Adam's mu and nu, unlocked only
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  params = PARAMS
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  jax.tree.map(np.testing.assert_array_equal, params["img"], PARAMS["img"])
  np.testing.assert_array_equal(params["t"], PARAMS["t"])
  assert not np.allclose(params["txt"]["head"]["kernel"],
                         PARAMS["txt"]["head"]["kernel"])


def test_set_schedule_restarts_with_new_lengths_without_recompiling():
  config = presets.optimizer(lr=1.0, wd=0., b1=0., b2=0., eps=0.,
                             grad_clip_norm=0., warmup_steps=0,
                             total_steps=100)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PARAMS)
  tx = optim.make_optimizer(config, params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(lambda state: tx.update(grads, state, params))
  set_schedule = jax.jit(optim.set_schedule)  # As train.Towers uses it.
  state = set_schedule(jax.jit(tx.init)(params), 10, 30)
  scales = []
  for _ in range(31):
    updates, state = update(state)
    scales.append(-float(updates["t"][0]))  # Adam(b=0) of a unit gradient: 1.
  want = [float(optim.warmup_cosine(s, 10, 30)) for s in range(31)]
  np.testing.assert_allclose(scales, want, atol=1e-6)
  assert want[5] == 0.5 and want[10] == 1.0 and want[30] == 0.0
  restarted = set_schedule(state, 0, 5)
  updates, _ = update(restarted)  # Step 0 of a 5-step schedule.
  assert -float(updates["t"][0]) == 1.0
  assert update._cache_size() == 1
