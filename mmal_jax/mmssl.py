"""Stage 1 of MMCSAL: multimodal self-supervised learning (MMSSL).

The two towers are trained on all N pairs of the pool (no labels) with
L = L_cross (InfoNCE, temperature tau) during the warm-up, then 0.5 L_cross
+ 0.5 L_uni, L_uni the prototypical loss against per-modality K-means
prototypes recomputed on the whole pool at the start of every epoch
(`acquisition.kmeans`, sharded, k-means++ seeds) with their concentrations
phi (`losses.prototype_concentration`). The variant without prototypes
("cross") trains L_cross throughout. The cold-start selectors then work on
the trained representations (`mmcsal`).

Training goes through the shared host loop (`train.run_steps`): per-step
loss and throughput in TensorBoard, progress lines, and orbax checkpoints of
the whole train state at epoch ends, from which a stopped run resumes
exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmal_jax import experiment as experiment_lib
from mmal_jax import faults
from mmal_jax import losses
from mmal_jax import optim
from mmal_jax import run_state
from mmal_jax import sharding
from mmal_jax import summaries as summaries_lib
from mmal_jax import tokenizers
from mmal_jax import train
from mmal_jax.acquisition import kmeans as kmeans_lib
from mmal_jax.data import paired
from mmal_jax.data import preprocess
from mmal_jax.models import two_towers

VARIANTS = {False: "cross", True: "proto"}  # Without / with prototypes.


@dataclasses.dataclass
class Stage1Result:
  """L2-normalised representations `{m: (N, D)}` of the pool and test
  pairs, the loss at the end of each epoch, seconds, and the loss of every
  training step `(epochs x steps per epoch,)` (empty in a cache written
  before it was recorded)."""
  pool: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  losses: np.ndarray
  seconds: float
  step_losses: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(0, np.float32))

  def to_bytes(self) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, losses=self.losses, seconds=self.seconds,
             step_losses=self.step_losses,
             **{f"pool/{m}": z for m, z in self.pool.items()},
             **{f"test/{m}": z for m, z in self.test.items()})
    return buffer.getvalue()

  @classmethod
  def from_bytes(cls, data: bytes, modalities) -> Stage1Result:
    with np.load(io.BytesIO(data)) as f:
      return cls({m: f[f"pool/{m}"] for m in modalities},
                 {m: f[f"test/{m}"] for m in modalities}, f["losses"],
                 float(f["seconds"]), f["step_losses"]
                 if "step_losses" in f.files else np.zeros(0, np.float32))


class Stage1:
  """The two towers of `config.model` trained by MMSSL, compiled once.

  Modality 0 of the data goes through the model's image slot, modality 1
  through its text slot (feature towers, or a ViT and a text transformer
  for images and captions). Data-parallel: batches are split over every
  device (`ROW_AXES`), parameters replicated; the contrastive loss of the
  global batch is partitioned by XLA.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               data: paired.PairedData, mesh):
    self.config = config.stage1
    self.data = data
    self.mesh = mesh
    self.modalities = data.modalities
    self.model = two_towers.Model(**config.model)
    tokenizer = train.EosPadded(tokenizers.get_tokenizer(config.tokenizer))
    self.prepare = {
        name: functools.partial(preprocess.prepare_items, pool,
                                image_size=config.res, tokenizer=tokenizer,
                                text_length=config.text_len)
        for name, pool in (("pool", data.pool), ("test", data.test))}
    # The configured batch on any device count: a batch the devices do not
    # divide is padded and its padding masked (`preprocess.pair_batches`).
    self.batch_size = min(self.config.batch_size, data.size)
    self.per_epoch = data.size // self.batch_size
    optim_config = ml_collections.ConfigDict(dict(self.config.optim))
    optim_config.warmup_steps = self.config.warmup_epochs * self.per_epoch
    optim_config.total_steps = self.config.epochs * self.per_epoch
    example = [jnp.asarray(self.prepare["pool"](m, np.zeros(1, np.int64)))
               for m in self.modalities]
    replicated = sharding.replicated(mesh)
    self._init = jax.jit(
        lambda key: self.model.init(key, *example)["params"],
        out_shardings=replicated)
    key = jax.random.PRNGKey(0)
    self.optimizer = optim.make_optimizer(optim_config,
                                          jax.eval_shape(self._init, key))
    # The loss of every step rides in the state: a resumed run has them all.
    self._state = jax.jit(
        lambda params, key: {"params": params,
                             "opt": self.optimizer.init(params),
                             "step": jnp.zeros((), jnp.int32), "rng": key,
                             "losses": jnp.zeros(optim_config.total_steps,
                                                 jnp.float32)},
        out_shardings=replicated)
    self._steps = {p: self._make_step(p) for p in (False, True)}
    apply = lambda params, x0, x1: self.model.apply({"params": params}, x0, x1)
    self._embed = [jax.jit(lambda p, x: apply(p, x, None)[0],
                           out_shardings=replicated),
                   jax.jit(lambda p, x: apply(p, None, x)[1],
                           out_shardings=replicated)]

  def _make_step(self, prototypes: bool):
    tau = self.config.tau

    def step(state, x0, x1, i0, i1, protos, assignments, phis, valid):
      rng = jax.random.fold_in(state["rng"], state["step"])

      def objective(params):
        z0, z1, _ = self.model.apply({"params": params}, x0, x1, train=True,
                                     rngs={"dropout": rng})
        if not prototypes:
          return losses.clip_loss(z0, z1, 1. / tau, valid)
        return losses.mmcsal_loss(
            z0, z1, protos, (assignments[0][i0], assignments[1][i1]), phis,
            tau, valid)

      loss, grads = jax.value_and_grad(objective)(state["params"])
      updates, opt = self.optimizer.update(grads, state["opt"],
                                           state["params"])
      return {**state, "params": optax.apply_updates(state["params"], updates),
              "opt": opt, "step": state["step"] + 1,
              "losses": state["losses"].at[state["step"]].set(loss)}, {
                  "loss": loss}

    replicated = sharding.replicated(self.mesh)
    return jax.jit(step, out_shardings=(replicated, replicated),
                   donate_argnums=(0,))

  def _state_like(self):
    """Shapes, dtypes and shardings of a train state (a restore's target);
    traced only, nothing allocated."""
    key = jax.random.PRNGKey(0)
    replicated = sharding.replicated(self.mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(self._state, jax.eval_shape(self._init, key), key))

  def embed(self, params, split: str, modality: str) -> np.ndarray:
    """`(N, D)` normalised representations of one modality of `split`."""
    pool = self.data.pool if split == "pool" else self.data.test
    devices = self.mesh.size
    batch = -(-self.config.embed_batch_size // devices) * devices
    slot = self.modalities.index(modality)
    out = []
    for inputs, valid in preprocess.item_batches(
        modality, np.arange(pool.num_items(modality)), batch,
        self.prepare[split], mesh=self.mesh):
      out.append(np.asarray(self._embed[slot](params, inputs))[:valid])
    return np.concatenate(out).astype(np.float32)

  def prototypes(self, params, seed: int):
    """Per modality: K-means centroids (C, D), assignments (N,) and
    concentrations phi (C,) of the current representations of the pool."""
    out = []
    for k, m in enumerate(self.modalities):
      z = self.embed(params, "pool", m)
      result = kmeans_lib.kmeans(z, self.config.num_prototypes,
                                 seed=experiment_lib.derived_seed(seed, k),
                                 max_iters=self.config.kmeans_iters,
                                 mesh=self.mesh)
      phi = losses.prototype_concentration(
          jnp.asarray(z), jnp.asarray(result.centroids),
          jnp.asarray(result.labels), self.config.alpha)
      out.append((result.centroids, result.labels.astype(np.int32), phi))
    put = lambda x: jax.device_put(x, sharding.replicated(self.mesh))
    return tuple(tuple(put(o[i]) for o in out) for i in range(3))

  def fit(self, prototypes: bool, seed: int, label: str = "", *,
          checkpoint_dir: str | None = None,
          summaries: summaries_lib.SummaryWriter | None = None
          ) -> Stage1Result:
    """Trains from scratch with `seed` (init, batches, K-means seeds).

    With `checkpoint_dir`, the whole train state is saved there (orbax,
    `run_state.RunCheckpoints`) every `stage1.checkpoint_every_epochs`
    epochs and after the last, and training resumes from the newest
    checkpoint found: at an epoch's end, where the prototypes are
    recomputed anyway, so a resumed fit equals an uninterrupted one.
    `summaries` gets `stage1/loss` per step and the throughput
    (`train.run_steps`). Cost: epochs x N pairs through both towers; with
    prototypes, from the warm-up on, per epoch one embedding pass and
    K-means (`O(iters N C D)`) per modality.
    """
    start_time = time.perf_counter()
    total = self.config.epochs * self.per_epoch
    checkpoints = (None if checkpoint_dir is None
                   else run_state.RunCheckpoints(checkpoint_dir))
    try:
      start, state, seconds = 0, None, 0.0
      latest = (checkpoints.latest(None, self._state_like)
                if checkpoints else None)
      if latest:
        meta, state = latest
        start, seconds = meta["train_step"], meta["seconds"]
        logging.info("%s Stage 1 (%s) resumed at step %d/%d", label,
                     VARIANTS[prototypes], start, total)
      else:
        state = self._state(self._init(jax.random.PRNGKey(seed)),
                            jax.random.PRNGKey(
                                experiment_lib.derived_seed(seed, 1)))
      index = np.arange(self.data.size)
      batches = preprocess.pair_batches(
          np.stack([index, index], axis=1), self.batch_size,
          self.prepare["pool"], seed=seed, modalities=self.modalities,
          num_epochs=self.config.epochs, mesh=self.mesh, start_step=start)
      m0, m1 = self.modalities
      unused = ((jnp.zeros(()),) * 2,) * 3  # The L_cross step ignores these.
      current = [unused]

      def step_fn(state, step, batch):
        epoch = (step - 1) // self.per_epoch
        active = prototypes and epoch >= self.config.warmup_epochs
        if active and (step - 1) % self.per_epoch == 0:
          current[0] = self.prototypes(
              state["params"], experiment_lib.derived_seed(seed, 2, epoch))
        return self._steps[active](
            state, batch[m0], batch[m1], batch[m0 + "_index"],
            batch[m1 + "_index"], *(current[0] if active else unused),
            batch.get("valid"))

      def save(step, state):
        checkpoints.save({"round": 0, "phase": "training", "train_step": step,
                          "seconds": seconds + time.perf_counter()
                                     - start_time}, train=state)
        faults.point("stage1_checkpoint")

      state, _ = train.run_steps(
          step_fn, state, batches, start=start, total=total,
          per_epoch=self.per_epoch, batch_size=self.batch_size,
          num_devices=self.mesh.size,
          label=f"{label} Stage 1 ({VARIANTS[prototypes]})",
          diverged_hint=(f"Lower config.stage1.optim.lr (now "
                         f"{self.config.optim.lr}) or check the data."),
          summaries=summaries, prefix="stage1",
          on_checkpoint=save if checkpoints else None,
          checkpoint_every=self.config.checkpoint_every_epochs
          * self.per_epoch)
    finally:  # An error or a signal: the save in flight still commits.
      if checkpoints:
        checkpoints.close()
    step_losses = np.asarray(jax.device_get(state["losses"]), np.float32)
    params = state["params"]
    embed_start = time.perf_counter()
    reps = {split: {m: self.embed(params, split, m) for m in self.modalities}
            for split in ("pool", "test")}
    logging.info("%s Stage 1 (%s): embedded %d pool + %d test pairs in %.1fs",
                 label, VARIANTS[prototypes], self.data.size,
                 len(self.data.test_labels), time.perf_counter() - embed_start)
    seconds += time.perf_counter() - start_time
    logging.info("%s Stage 1 (%s): %d epochs, final loss %.4f, %.1fs", label,
                 VARIANTS[prototypes], self.config.epochs, step_losses[-1],
                 seconds)
    return Stage1Result(reps["pool"], reps["test"],
                        step_losses[self.per_epoch - 1::self.per_epoch],
                        seconds, step_losses)
