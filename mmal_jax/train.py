"""Training the two towers on (annotated) pairs, and embedding pools with them.

`Towers` holds everything compiled once per experiment (the model, its
data-parallel train steps, per-modality embedding functions), so that the
hundreds of short fits of an active-learning run share one compilation: the
length of the warm-up + cosine schedule lives in the optimizer state
(`optim.set_schedule`), not in the compiled step.

Inputs come from the tf.data pipeline (`data.pipeline`): each process reads
and preprocesses only its own devices' rows, with the pp strings of
`pipeline.default_pp` or `config.pp`.

`fit` resumes from a given train state and step with the same batches it
would have seen, and hands its state to a callback every `checkpoint_every`
steps (the loop saves it with `run_state.RunCheckpoints`). It logs every
step's loss, learning rate, t, b and gradient norm, and stops with
`TrainingDiverged` on a NaN / inf loss before saving such a state.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmal_jax import optim
from mmal_jax import progress as progress_lib
from mmal_jax import sharding
from mmal_jax import tokenizers
from mmal_jax import train_step
from mmal_jax.data import pipeline
from mmal_jax.data import preprocess
from mmal_jax.data.pool import UnalignedPool
from mmal_jax.models import two_towers

MODALITIES = ("image", "text")


class EosPadded:
  """Pads with EOS, as big_vision's SigLIP pipeline, so `last` pooling sees EOS."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self.tokenizer = tokenizer

  def encode(self, texts, length):
    return self.tokenizer.encode(texts, length, pad_id=self.tokenizer.eos_id)


class TrainingDiverged(ValueError):
  """The loss became NaN or inf; the message names the step."""


@dataclasses.dataclass
class FitResult:
  params: dict
  steps: int
  seconds: float
  final_loss: float | None



def run_steps(step_fn: Callable, state, batches, *, start: int, total: int,
              per_epoch: int, batch_size: int, num_devices: int, label: str,
              diverged_hint: str, summaries=None, summary_step: int = 0,
              prefix: str = "train", extra_scalars: Callable | None = None,
              on_checkpoint: Callable[[int, dict], None] | None = None,
              checkpoint_every: int = 0, log_every: int = 10):
  """The host side of a training loop, shared by every trainer.

  Runs `state, metrics = step_fn(state, step, batch)` for steps `start + 1
  .. total` over `batches` (`metrics`: device scalars, "loss" among them),
  without waiting on the devices between steps: metrics are fetched every
  `log_every` steps, before each checkpoint and each progress line (one
  transfer for the steps pending). On each fetch: a NaN / inf loss raises
  `TrainingDiverged` naming the step (then `diverged_hint`), and
  `summaries` (a `summaries.SummaryWriter`) gets `<prefix>/<metric>` and
  `extra_scalars(step)` per step, and `<prefix>/examples_per_s`,
  `steps_per_s`, `examples_per_s_per_device` (`progress.Throughput`, from
  the second fetch on: the first holds the compilation) at `summary_step +
  step`. Five times over the run it logs the epoch, step, loss, elapsed
  time, throughput and an ETA. Every `checkpoint_every` steps and after the
  last, `summaries` is flushed (a resume starts after that point) and
  `on_checkpoint(step, state)` called with a state whose loss was checked.

  Returns (final state, last loss; None if no step ran). Cost: the steps,
  plus one device-to-host transfer of a few scalars per `log_every` steps.
  """
  start_time = time.perf_counter()
  pending, loss, rates = [], None, None
  log_epochs = per_epoch * max(1, total // per_epoch // 5)
  throughput = progress_lib.Throughput(batch_size, num_devices)

  def drain():
    """Fetches the pending steps' metrics, logs them, checks the loss."""
    nonlocal loss, rates
    fetched = jax.device_get([m for _, m in pending])
    rates = throughput.mark(pending[-1][0]) or rates
    for (step, _), metrics in zip(pending, fetched):
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        raise TrainingDiverged(f"{label} step {step}/{total}: the loss is "
                               f"{loss}. {diverged_hint}")
      if summaries is not None:
        values = {k: float(v) for k, v in metrics.items()}
        values.update(extra_scalars(step) if extra_scalars else {})
        summaries.scalars(summary_step + step,
                          {f"{prefix}/{k}": v for k, v in values.items()})
    if summaries is not None and rates is not None:
      summaries.scalars(summary_step + pending[-1][0],
                        {f"{prefix}/{k}": v for k, v in rates.items()})
    pending.clear()

  for step, batch in enumerate(batches, start + 1):
    state, metrics = step_fn(state, step, batch)
    pending.append((step, metrics))
    checkpoint = on_checkpoint is not None and (
        step == total or (checkpoint_every and step % checkpoint_every == 0))
    progress = step % log_epochs == 0 or step == total
    if checkpoint or progress or len(pending) >= log_every:
      drain()
    if progress:
      speed = ""
      if rates is not None:
        speed = (f", {rates['examples_per_s']:.1f} examples/s "
                 f"({rates['examples_per_s_per_device']:.1f}/device), "
                 f"{rates['steps_per_s']:.2f} steps/s, ETA "
                 f"{progress_lib.hms((total - step) / rates['steps_per_s'])}")
      logging.info("%s epoch %d/%d step %d/%d loss %.4f (%s%s)", label,
                   -(-step // per_epoch), total // per_epoch, step, total,
                   loss, progress_lib.hms(time.perf_counter() - start_time),
                   speed)
    if checkpoint:
      if summaries is not None:
        summaries.flush()
      on_checkpoint(step, state)
  return state, loss


class Towers:
  """A two-tower model, compiled once over `mesh`, for fitting and embedding.

  `config` holds `model`, `loss`, `optim`, `res`, `text_len`, `tokenizer`
  (see `models.presets`).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    self.config = config
    self.mesh = mesh
    self.model = two_towers.Model(**config.model)
    self.tokenizer = EosPadded(tokenizers.get_tokenizer(
        config.tokenizer, vocab_size=config.model.text.get("vocab_size")))
    self._compiled = {}
    self._init = {}  # Input shapes -> jitted parameter init.
    self._pp = (None, None)  # (pool, its pp strings): the latest pool's.
    # One function object per modality, so embed_pool compiles once per bucket.
    self._apply = {
        "image": lambda p, x: self.model.apply({"params": p}, x, None)[0],
        "text": lambda p, x: self.model.apply({"params": p}, None, x)[1]}
    # The towers' outputs before their L2 normalisation.
    self._apply_raw = {
        "image": lambda p, x: self.model.apply({"params": p}, x, None)[2][
            "img/raw"],
        "text": lambda p, x: self.model.apply({"params": p}, None, x)[2][
            "txt/raw"]}

  def pp(self, pool: UnalignedPool) -> dict[str, str]:
    """The pp string per modality of `pool`: `config.pp.<modality>` where
    given, else `pipeline.default_pp` for the model's resolution, text
    length and tokenizer."""
    if self._pp[0] is not pool:  # Cached for the latest pool only.
      out = pipeline.default_pp(pool, res=self.config.res,
                                text_len=self.config.text_len,
                                tokenizer=self.config.tokenizer)
      given = self.config.get("pp", None) or {}
      out.update({m: given[m] for m in out if given.get(m)})
      self._pp = (pool, out)
    return self._pp[1]

  def prepare(self, pool: UnalignedPool) -> preprocess.PrepareFn:
    """`prepare(modality, indices)`: model inputs for items of `pool`."""
    return functools.partial(
        preprocess.prepare_items, pool, image_size=self.config.res,
        tokenizer=self.tokenizer, text_length=self.config.text_len)

  def init_params(self, pool: UnalignedPool, seed: int) -> dict:
    """Random initial parameters in their FSDP layout on the mesh; input
    shapes from `pool`'s first items. Compiles once per input shapes."""
    prepare = self.prepare(pool)
    example = {m: jnp.asarray(prepare(m, np.zeros(1, np.int64)))
               for m in MODALITIES}
    key = tuple((x.shape, str(x.dtype)) for x in example.values())
    if key not in self._init:  # One compile per input shapes, any seed.
      self._init[key] = train_step.make_params_init(self.model, self.mesh,
                                                    example)
    return self._init[key](jax.random.PRNGKey(seed))

  def _compile(self, optim_config, params) -> tuple[Callable, Callable]:
    """(state init, train step) for an optimizer config, built once each."""
    key = optim_config.to_json()
    if key not in self._compiled:
      optimizer = optim.make_optimizer(optim_config, params)
      self._compiled[key] = (
          train_step.make_state_init(optimizer, self.mesh),
          train_step.make_train_step(
              self.model, optimizer, self.mesh, loss=self.config.loss,
              frozen=optim.frozen_mask(optim_config, params)))
    return self._compiled[key]

  def state_like(self, optim_config, params):
    """Shapes, dtypes and shardings of a train state as `fit` makes it (the
    target of a restore). Allocates nothing."""
    optimizer = optim.make_optimizer(optim_config, params)
    return train_step.abstract_state(optimizer, params, self.mesh)

  def batch_size(self, requested: int, num_pairs: int) -> int:
    """The global batch: min(requested, num_pairs), on any device count (a
    batch the devices do not divide is padded and its padding masked out of
    the loss, `data.pipeline.train_batches`)."""
    return min(requested, num_pairs)

  def fit(self, params, pool: UnalignedPool, pairs: np.ndarray, *,
          optim_config: ml_collections.ConfigDict, epochs: int,
          batch_size: int, warmup_fraction: float, seed: int,
          resume: tuple[int, dict] | None = None,
          on_checkpoint: Callable[[int, dict], None] | None = None,
          checkpoint_every: int = 0, summaries=None, summary_step: int = 0,
          log_every: int = 10, label: str = "",
          lr_name: str = "config.optim.lr") -> FitResult:
    """Contrastive training of `params` on `pairs` of `pool`.

    Args:
      params: starting parameters.
      pool, pairs: `(P, 2)` (image index, text index) rows of `pool`.
      optim_config: `optim.make_optimizer` fields (the schedule length is
        set here: `epochs` x batches per epoch, `warmup_fraction` of it).
      epochs, batch_size: the batch is cut to at most P pairs, the last
        partial batch dropped; the same batches and steps on any mesh (a
        batch the device count does not divide is padded to a multiple of it
        and the padding masked out of the loss).
      seed: shuffling and dropout.
      resume: `(step, train state)` saved by an earlier, interrupted call
        with the same arguments: training continues after that step.
      on_checkpoint: `on_checkpoint(step, state)` every `checkpoint_every`
        steps and after the last one (the state is checked finite first).
      summaries: a `summaries.SummaryWriter` for per-step scalars
        (`train/loss`, `train/lr`, `train/t`, `train/b`, `train/grad_norm`;
        `train/examples_per_s`, `train/steps_per_s`,
        `train/examples_per_s_per_device` from the second fetch on, the
        first holding the compilation) at `summary_step + step`; fetched from the devices every `log_every`
        steps (one transfer each time, not one per step).
      label: prefix of the progress log lines and error messages.
      lr_name: the config field of `optim_config.lr`, named on divergence.

    Returns:
      The trained parameters, the round's steps (resumed ones included),
      seconds and last loss; with no pairs, `params` unchanged and 0 steps.
      Cost: epochs x P pairs through both towers, forward and backward.

    Raises:
      TrainingDiverged: a step's loss was NaN or inf (its step is named).
    """
    start_time = time.perf_counter()
    if not len(pairs):
      logging.warning("%s no pairs: not training this time.", label)
      return FitResult(params, 0, 0.0, None)
    batch_size = self.batch_size(batch_size, len(pairs))
    per_epoch = len(pairs) // batch_size
    total = epochs * per_epoch
    warmup = int(round(warmup_fraction * total))
    init_state, step_fn = self._compile(optim_config, params)
    start = 0
    if resume is not None and 0 < resume[0] <= total:
      start, state = resume
      logging.info("%s resumed at step %d/%d", label, start, total)
    else:
      state = init_state(params, jax.random.PRNGKey(seed),
                         warmup_steps=warmup, total_steps=total)
    batches = pipeline.train_batches(
        pool, pairs, batch_size, self.pp(pool), seed=seed, mesh=self.mesh,
        num_epochs=epochs, start_step=start)
    lr_at = lambda step: {"lr": optim_config.lr * float(
        optim.warmup_cosine(step - 1, warmup, total))}
    state, loss = run_steps(
        lambda state, step, batch: step_fn(state, batch), state, batches,
        start=start, total=total, per_epoch=per_epoch, batch_size=batch_size,
        num_devices=self.mesh.size, label=label,
        diverged_hint=(f"Lower {lr_name} (now {optim_config.lr}) or check "
                       f"the data; what was bought is kept and a rerun "
                       f"redoes this training."),
        summaries=summaries, summary_step=summary_step, extra_scalars=lr_at,
        on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every,
        log_every=log_every)
    return FitResult(state["params"], total,
                     time.perf_counter() - start_time, loss)

  def embed_rows(self, params, pool: UnalignedPool, modality: str, indices,
                 batch_size: int, *, raw: bool = False) -> jax.Array:
    """Embeddings of items `indices` of `pool`, left on the mesh.

    One `pipeline.embed_pool` pass: each process reads and embeds its own
    devices' rows; only `modality`'s tower runs. Returns a `(padded_rows, D)`
    float32 array row-sharded over the mesh whose first `len(indices)` rows
    are the L2-normalised embeddings (`raw`: the tower's outputs before that
    normalisation), the layout the acquisition kernels take without a copy.
    Cost: one forward pass per item.
    """
    apply = (self._apply_raw if raw else self._apply)[modality]
    return pipeline.embed_pool(apply, params, pool, modality, indices,
                               self.mesh, batch_size, self.pp(pool)[modality])

  def embed(self, params, pool: UnalignedPool, modality: str, indices,
            batch_size: int) -> np.ndarray:
    """`(len(indices), D)` float32 embeddings (`embed_rows`) on every host.
    Cost: `embed_rows` plus one gather of `len(indices) x D` floats."""
    rows = self.embed_rows(params, pool, modality, indices, batch_size)
    return sharding.to_host(rows)[:len(indices)].astype(np.float32)
