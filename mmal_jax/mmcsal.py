"""Multimodal cold-start active learning (MMCSAL, the second paper).

Setting (docs/algorithms.md, "MMCSAL"): N pre-aligned pairs with class
labels; what is bought is labels; nothing is labelled at the start. A run
(one selector, one seed) does, for each budget B (1/2/5/10% of N by
default), one independent cold-start selection:

  Stage 1 (MMSSL, once per Stage-1 variant and seed, cached in the workdir;
    `mmssl`): the two towers trained on all pairs with InfoNCE, then (the
    "proto" variant, after the warm-up) also the prototypical loss against
    per-modality K-means prototypes recomputed every epoch; the "cross"
    variant trains InfoNCE throughout.
  select(B): a cold-start selector (`acquisition.cold_start.SELECTORS`) on
    the Stage-1 representations of the pool;
  train_and_evaluate(picks): a classifier (linear or MLP, optax) on the
    concatenated features of the bought pairs and their labels; top-1
    accuracy on the held-out test pairs.

Strategy names map to (selector, Stage-1 variant) through
`strategy_hparams.<name>.selector` (default: the name) and `.prototypes`
(default: True for "mmcsal", else False); the other hparams go to the
selector. So the paper's baselines and ablations are (Table 1):
  random / kcenter (KGC) / kmeans / activeft   selector = name, no prototypes
  mmcsal_proto   activeft selection on prototype-trained representations
  mmcsal_align   mmcsal selection (alignment term) without prototypes
  mmcsal         both (MMCSAL-final)

Downstream features (`downstream.features`): "inputs", the concatenated
input features of both modalities (standardised), the same for every
selector, so only the selection differs (the paper's supervised protocol,
Table 1, where the downstream model is not the MMSSL model); or "stage1",
the selector's own Stage-1 representations (closer to the semi-supervised
protocol, Table 2, where the learner keeps its MMSSL model).

Workdir (as the unaligned loop's): config.json, metrics.jsonl (a row per
strategy, seed and budget: `round` = budget index, `queries` = B, `percent`,
accuracy, Stage-1 / acquire / train seconds, device_hours so far),
results.md (accuracy per strategy and
budget, mean ± std over seeds, and the modality-gap table of eq. 10 with and
without prototypes), al_curves.png, seconds_per_round.png, stage1_loss.png
(the Stage-1 loss of every training step, per variant and seed),
stage1/<variant>_seed_<s>.npz (the Stage-1 representations and losses;
while Stage 1 trains, its orbax checkpoints in stage1/<variant>_seed_<s>_ckpt/),
tensorboard/stage1_<variant>_seed_<s>/ (`stage1/loss` per step and the
throughput, `train.run_steps`),
tensorboard/<strategy>_seed_<s>/ (each row, step: B), logs/,
runs/<strategy>/seed_<s>/round_<r>.json (the bought pairs), embedding.png
on request. Rerunning resumes (`experiment.run`), also after a kill
anywhere: a round is done once its row is in metrics.jsonl, the picks and
Stage-1 files saved before it are reused, and a Stage 1 stopped mid-training
goes on from its last checkpoint (`mmssl.Stage1.fit`).
"""
from __future__ import annotations

import json
import os
import time
import zipfile

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np
import optax

from mmal_jax import config_lib
from mmal_jax import evaluate
from mmal_jax import experiment as experiment_lib
from mmal_jax import faults
from mmal_jax import fs
from mmal_jax import mmssl
from mmal_jax import plots
from mmal_jax import report
from mmal_jax import sharding
from mmal_jax import strict_json
from mmal_jax import summaries as summaries_lib
from mmal_jax.acquisition import cold_start
from mmal_jax.data import paired
from mmal_jax.models import feature_towers

KIND = "cold_start"
DOWNSTREAM_FEATURES = ("inputs", "stage1")
# strategy_hparams keys the experiment reads; the rest go to the selector.
_EXPERIMENT_KEYS = ("selector", "prototypes")


def base_config() -> ml_collections.ConfigDict:
  """Defaults of a cold-start experiment (configs/mmcsal_*.py start here)."""
  c = ml_collections.ConfigDict()
  c.kind = KIND
  c.seeds = (0, 1, 2, 3, 4)
  c.strategies = ("random", "kcenter", "kmeans", "activeft", "mmcsal_proto",
                  "mmcsal_align", "mmcsal")
  optimisation = dict(iterations=300, lr=1e-3, tau=0.07,
                      batch_rows=100_000)
  c.strategy_hparams = ml_collections.ConfigDict(dict(
      random={}, kcenter={}, kmeans=dict(max_iters=100),
      activeft=dict(optimisation),
      mmcsal_proto=dict(selector="activeft", prototypes=True, **optimisation),
      mmcsal_align=dict(selector="mmcsal", prototypes=False, lambda_align=1.,
                        **optimisation),
      mmcsal=dict(lambda_align=1., **optimisation),
      # MMCSAL with lr scaled to the pool (`cold_start` docstring): its
      # selection leaves random's picks also on small pools. Not in the
      # default strategies (the paper's setting is `mmcsal`).
      mmcsal_travel=dict(selector="mmcsal", prototypes=True, lambda_align=1.,
                         travel=2., **optimisation)))
  c.budgets = (1., 2., 5., 10.)  # % of the pool, one selection each.
  # None: the tile edge chosen per backend (`acquisition.layout.auto_tiling`).
  c.acquisition = ml_collections.ConfigDict(dict(
      block=config_dict.placeholder(int)))
  c.data = ml_collections.ConfigDict(dict(
      source="digits", seed=0, test_fraction=0.2,
      # shapes: ColorSwap-like scenes (image, caption), label of the first
      # object ("shape" or "colour").
      num_groups=700, image_size=32, noise_std=6.0, label="shape",
      # features: one .npy (N, F_m) per modality (row i = pair i) + labels
      # (N,) int .npy; test files, or test_fraction of the pairs held out.
      modalities=("image", "text"), train_features=("", ""),
      train_labels="", test_features=("", ""), test_labels=""))
  c.model = ml_collections.ConfigDict(dict(
      image_model="feature_tower", text_model="feature_tower",
      image=dict(kind="mlp", hidden_dims=(256,)),
      text=dict(kind="mlp", hidden_dims=(256,)),
      out_dim=64, temperature_init=1 / 0.07, bias_init=None))
  c.res = 32
  c.text_len = 16
  c.tokenizer = "bytes"
  c.stage1 = ml_collections.ConfigDict(dict(
      epochs=40, warmup_epochs=10, batch_size=256, num_prototypes=50,
      tau=0.07, alpha=10., kmeans_iters=50, per_seed=True,
      embed_batch_size=512,
      # Orbax checkpoints of the train state while Stage 1 trains (to resume
      # a preempted run), every this many epochs and after the last.
      checkpoint_every_epochs=5,
      # AdamW, betas (0.9, 0.95), weight decay 0.02 (paper 6.1) in
      # big_vision's convention (not multiplied by lr): 0.02 * lr.
      optim=dict(lr=1e-3, wd=2e-5, b1=0.9, b2=0.95, eps=1e-8,
                 grad_clip_norm=0.)))
  c.downstream = ml_collections.ConfigDict(dict(
      features="inputs", hidden_dims=(), steps=300, lr=1e-2, wd=1e-4))
  c.report = ml_collections.ConfigDict(dict(
      main_metric="accuracy", metrics=("accuracy", "classes_covered"),
      embedding_plot=False, embedding_plot_percent=5.,
      embedding_plot_points=1000))
  return c


def feature_protocol(modalities: tuple[str, str], *, test_fraction: float,
                     num_seeds: int, epochs: int, warmup_epochs: int,
                     num_prototypes: int) -> ml_collections.ConfigDict:
  """`base_config()` with the paper's protocol on precomputed features
  (Sec. 4.3): linear projectors to 512-d, batch 256, 20 K-means iterations,
  a linear classifier on the concatenated input features (500 steps)."""
  config = base_config()
  config.data.update(source="features", modalities=tuple(modalities),
                     test_fraction=test_fraction)
  config.seeds = tuple(range(num_seeds))
  tower = dict(kind="linear", hidden_dims=())
  config.model.update(image=tower, text=tower, out_dim=512)
  config.stage1.update(epochs=epochs, warmup_epochs=warmup_epochs,
                       batch_size=256, num_prototypes=num_prototypes,
                       kmeans_iters=20, per_seed=False, embed_batch_size=4096)
  config.downstream.update(features="inputs", hidden_dims=(), steps=500,
                           lr=1e-3, wd=1e-4)
  return config


def selector_of(config, name: str) -> tuple[str, bool, dict]:
  """(selector, Stage-1 prototypes, selector hparams) of strategy `name`."""
  hparams = dict(config.strategy_hparams.get(name, None) or {})
  selector = hparams.pop("selector", name)
  prototypes = hparams.pop("prototypes", selector == "mmcsal")
  return selector, bool(prototypes), hparams


def normalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `--config.strategies=a,b` (one string) split; locked."""
  config.strategies = tuple(
      s.strip() for entry in config.strategies for s in entry.split(",")
      if s.strip())
  config.lock()
  return config


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of a cold-start config's values (`normalize`d) that
  shows without data or files, one sentence each naming the field."""
  if config.get("kind", None) != KIND:
    return [f"config.kind must be {KIND!r} for a cold-start experiment."]
  found = []
  if not config.strategies:
    found.append("config.strategies is empty.")
  for name in config.strategies:
    selector, _, _ = selector_of(config, name)
    if selector not in cold_start.SELECTORS:
      found.append(
          f"config.strategies names {name!r}, whose selector {selector!r} is "
          f"not one of {sorted(cold_start.SELECTORS)} (set "
          f"config.strategy_hparams.{name}.selector).")
  if not config.seeds:
    found.append("config.seeds is empty.")
  found += config_lib.duplicate_problems(config)
  if not config.budgets or not all(0 < p <= 100 for p in config.budgets):
    found.append(f"config.budgets must be percentages in (0, 100], got "
                 f"{config.budgets!r}.")
  if config.downstream.features not in DOWNSTREAM_FEATURES:
    found.append(f"config.downstream.features={config.downstream.features!r}"
                 f" is not one of {list(DOWNSTREAM_FEATURES)}.")
  if config.data.source == "shapes" and config.downstream.features == "inputs":
    found.append("config.downstream.features='inputs' needs feature-vector "
                 "modalities; shapes has captions: use 'stage1'.")
  for name in ("stage1.epochs", "stage1.batch_size", "stage1.num_prototypes",
               "stage1.kmeans_iters", "stage1.embed_batch_size",
               "stage1.checkpoint_every_epochs", "downstream.steps"):
    group, field = name.split(".")
    value = config[group][field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      found.append(f"config.{name} must be a positive integer, got "
                   f"{value!r}.")
  warmup, epochs = config.stage1.warmup_epochs, config.stage1.epochs
  if not (isinstance(warmup, int) and isinstance(epochs, int)
          and 0 <= warmup < epochs):
    found.append("config.stage1.warmup_epochs must be in [0, "
                 "stage1.epochs).")
  return found


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`normalize`s a cold-start config and checks its values (`problems`,
  all at once in one ConfigError); returns it locked."""
  config = normalize(config)
  config_lib.raise_problems(problems(config))
  return config


# --------------------------------------------------------------------------
# Downstream classifier.


class Classifier:
  """A linear or MLP classifier (`feature_towers.Model`) trained full-batch
  with AdamW on up to `max_rows` labelled rows, scored on a fixed test set.
  Compiled once: the labelled rows are padded to `max_rows` with weight 0.
  Replicated (the labelled sets are small by design).
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               max_rows: int):
    self.max_rows = max_rows
    hidden = tuple(config.hidden_dims)
    self.model = feature_towers.Model(num_classes=num_classes,
                                      kind="mlp" if hidden else "linear",
                                      hidden_dims=hidden)
    optimizer = optax.adamw(config.lr, weight_decay=config.wd)
    steps = config.steps

    def fit_and_score(x, y, weight, x_test, y_test, key):
      params = self.model.init(key, x[:1])["params"]

      def objective(params):
        logits, _ = self.model.apply({"params": params}, x)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(nll * weight) / jnp.sum(weight)

      def step(_, carry):
        params, opt = carry
        grads = jax.grad(objective)(params)
        updates, opt = optimizer.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

      params, _ = jax.lax.fori_loop(0, steps, step,
                                    (params, optimizer.init(params)))
      logits, _ = self.model.apply({"params": params}, x_test)
      return 100. * jnp.mean(jnp.argmax(logits, axis=1) == y_test)

    self._fit_and_score = jax.jit(fit_and_score)

  def accuracy(self, x, y, x_test, y_test, seed: int) -> float:
    """Top-1 accuracy (%) on the test rows after training on (x, y).

    Cost: `steps` full-batch passes over `max_rows` rows.
    """
    n = len(y)
    if not 0 < n <= self.max_rows:
      raise ValueError(f"{n} labelled rows; the classifier takes 1 to "
                       f"{self.max_rows}.")
    pad = self.max_rows - n
    x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    weight = (np.arange(self.max_rows) < n).astype(np.float32)
    return float(self._fit_and_score(x, y, weight, x_test, y_test,
                                     jax.random.PRNGKey(seed)))


def _standardised_inputs(data: paired.PairedData,
                         prepare) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated, flattened input features of the pool and test pairs,
  standardised with the pool's statistics (no labels involved)."""
  def features(split, pool):
    return np.concatenate([
        np.asarray(prepare[split](m, np.arange(pool.num_items(m))),
                   np.float32).reshape(pool.num_items(m), -1)
        for m in data.modalities], axis=1)

  x, x_test = features("pool", data.pool), features("test", data.test)
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
  return (x - mean) / std, (x_test - mean) / std


# --------------------------------------------------------------------------
# The experiment.


class ColdStartExperiment:
  """Shared state of a cold-start experiment and its round body.

  `run_round` (`select`, then `train_and_evaluate`) is the round body, a
  round one budget; `experiment_lib.run` drives it over strategies and
  seeds (`start_run`) and writes the report (`report`).
  """
  unit = "selections"  # What `experiment_lib.run` counts in progress lines.

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh,
               data: paired.PairedData):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh
    self.data = data
    self.stage1 = mmssl.Stage1(config, data, mesh)
    self.budgets = [max(1, int(round(p / 100 * data.size)))
                    for p in config.budgets]
    self.classifier = Classifier(config.downstream, data.num_classes,
                                 max(self.budgets))
    self._inputs = None
    self._stage1 = {}
    self.num_rounds = len(self.budgets)
    self.rows = experiment_lib.Rows(workdir)
    self.metrics_path = self.rows.path

  @classmethod
  def create(cls, config, workdir, mesh=None) -> ColdStartExperiment:
    """Checks everything a run needs, then writes config.json.

    Every blocking problem (config values, stores, workdir, data files,
    what the data cannot do for the config) is collected and raised at
    once as one ConfigError; nothing is written before.
    """
    found = experiment_lib.workdir_problems(config, workdir,
                                            problems(config))
    data_problems = paired.problems(config.data)
    found += data_problems
    data = None
    if not data_problems:
      try:
        data = paired.build(config.data)
      except config_lib.ConfigError as e:
        found.append(str(e))
    if data is not None and config.stage1.num_prototypes > data.size:
      found.append(f"config.stage1.num_prototypes="
                   f"{config.stage1.num_prototypes} is more than the "
                   f"{data.size} pairs.")
    experiment_lib.raise_problems(found)
    experiment = cls(config, workdir,
                     sharding.make_mesh() if mesh is None else mesh, data)
    # Last: a config that cannot run leaves no trace.
    experiment_lib.check_workdir(config, workdir)
    return experiment

  def stage1_seed(self, seed: int) -> int:
    return seed if self.config.stage1.per_seed else self.config.data.seed

  def representations(self, prototypes: bool, seed: int) -> mmssl.Stage1Result:
    """Stage-1 result of a variant (trained once, cached in the workdir)."""
    seed = self.stage1_seed(seed)
    key = (prototypes, seed)
    if key not in self._stage1:
      name = f"{mmssl.VARIANTS[prototypes]}_seed_{seed}"
      path = os.path.join(self.workdir, "stage1", f"{name}.npz")
      result = None
      if fs.exists(path):
        try:
          result = mmssl.Stage1Result.from_bytes(fs.read_bytes(path),
                                                 self.data.modalities)
        except (ValueError, OSError, EOFError, KeyError,
                zipfile.BadZipFile) as e:
          # Torn (a kill mid-write by a version without atomic writes) or
          # damaged: recomputed, as a torn pretrained/params.npz is.
          logging.warning("%s cannot be read (%s: %s); training Stage 1 "
                          "again.", path, type(e).__name__, e)
      if result is None:
        checkpoint_dir = os.path.join(self.workdir, "stage1", f"{name}_ckpt")
        variant = mmssl.VARIANTS[prototypes]
        with experiment_lib.summary_writer(self.workdir, f"stage1_{variant}",
                                           seed) as writer:
          result = self.stage1.fit(prototypes, seed, f"[seed {seed}]",
                                   checkpoint_dir=checkpoint_dir,
                                   summaries=writer)
        if sharding.is_main_process():
          fs.write_bytes(path, result.to_bytes())
          fs.rmtree(checkpoint_dir)  # The .npz holds what a resume needs.
        sharding.barrier("stage1")
        faults.point("stage1_written")
      self._stage1[key] = result
    return self._stage1[key]

  def select(self, strategy: str, budget: int, seed: int) -> np.ndarray:
    """The `budget` pairs strategy `strategy` buys: `(budget,)` indices."""
    selector, prototypes, hparams = selector_of(self.config, strategy)
    reps = self.representations(prototypes, seed).pool
    return np.asarray(cold_start.SELECTORS[selector](
        reps, budget=budget, seed=experiment_lib.derived_seed(seed, budget),
        mesh=self.mesh,
        block=config_lib.tiling(self.config.acquisition)["block"], **hparams))

  def features(self, strategy: str, seed: int) -> tuple[np.ndarray,
                                                        np.ndarray]:
    """Downstream (pool, test) features for `strategy`'s runs."""
    if self.config.downstream.features == "inputs":
      if self._inputs is None:
        self._inputs = _standardised_inputs(self.data, self.stage1.prepare)
      return self._inputs
    _, prototypes, _ = selector_of(self.config, strategy)
    result = self.representations(prototypes, seed)
    return (cold_start.concat_normalized(result.pool),
            cold_start.concat_normalized(result.test))

  def train_and_evaluate(self, strategy: str, picks: np.ndarray,
                         seed: int) -> dict[str, float]:
    """Classifier trained on the bought pairs' labels, scored on the test
    pairs: accuracy (%) and the number of classes the picks cover."""
    x, x_test = self.features(strategy, seed)
    accuracy = self.classifier.accuracy(
        x[picks], self.data.labels[picks], x_test, self.data.test_labels,
        experiment_lib.derived_seed(seed, len(picks), 1))
    return {"accuracy": accuracy,
            "classes_covered": float(len(np.unique(self.data.labels[picks])))}

  def run_dir(self, strategy: str, seed: int) -> str:
    return os.path.join(self.workdir, "runs", strategy, f"seed_{seed}")

  def start_run(self, strategy: str, seed: int) -> ColdStartRun:
    return ColdStartRun(self, strategy, seed)

  def run_round(self, strategy: str, seed: int, round_index: int,
                writer: summaries_lib.SummaryWriter) -> dict:
    """One budget of one run: select (or reload the saved picks), train,
    evaluate; its row goes to `writer` (TensorBoard), then metrics.jsonl,
    which marks the round done. Returns the row."""
    budget = self.budgets[round_index - 1]
    picks = self.picks(strategy, seed, round_index)
    timing = {}
    if picks is not None:
      picks = np.asarray(picks, np.int64)
    else:
      # Stage 1 first (once per variant and seed): acquire_s times selection.
      start = time.perf_counter()
      self.representations(selector_of(self.config, strategy)[1], seed)
      timing["stage1_s"] = time.perf_counter() - start
      start = time.perf_counter()
      picks = self.select(strategy, budget, seed)
      timing["acquire_s"] = time.perf_counter() - start
      logging.info("[%s seed %d] selected %d of %d pairs in %.1fs", strategy,
                   seed, budget, self.data.size, timing["acquire_s"])
      if sharding.is_main_process():
        fs.write_text(self._picks_path(strategy, seed, round_index),
                      strict_json.dumps({"budget": budget,
                                         "picks": picks.tolist()}))
      faults.point("picks_written")
    start = time.perf_counter()
    metrics = self.train_and_evaluate(strategy, picks, seed)
    timing["train_s"] = time.perf_counter() - start
    earlier = [r for r in self.rows.of_run(strategy, seed)
               if r["round"] < round_index]
    row = experiment_lib.add_device_hours(strict_json.finite_or_none({
        "strategy": strategy, "seed": seed, "round": round_index,
        "queries": budget, "pairs": budget,
        "percent": 100. * budget / self.data.size, **timing, **metrics}),
        earlier[-1] if earlier else None, self.mesh.size)
    experiment_lib.row_scalars(writer, row)
    writer.flush()  # A resume starts after the row: TensorBoard has it.
    self.rows.add(row)
    logging.info("[%s seed %d] %d labels (%.1f%%): accuracy %.1f%%",
                 strategy, seed, budget, row["percent"], metrics["accuracy"])
    return row

  def _picks_path(self, strategy: str, seed: int, round_index: int) -> str:
    return os.path.join(self.run_dir(strategy, seed),
                        f"round_{round_index}.json")

  def picks(self, strategy: str, seed: int, round_index: int):
    """The pairs `strategy` bought at budget `round_index` for `seed` (a
    list, in the selector's order), or None if that selection is not in
    the workdir."""
    path = self._picks_path(strategy, seed, round_index)
    if not fs.exists(path):
      return None
    return json.loads(fs.read_text(path))["picks"]

  def overlap_markdown(self, baseline: str = "random") -> str:
    """Each selector's accuracy beside the overlap of its picks with
    `baseline`'s on the same seed and budget (which share the selection
    seed): Jaccard |A & B| / |A | B|, mean ± std over seeds. A selector
    near 1 picks what random picks. Empty without the baseline's picks."""
    rows = report.read_rows(self.metrics_path)
    accuracy = {(r["strategy"], r["seed"], r["round"]): r.get("accuracy")
                for r in rows}
    lines = []
    for strategy in self.config.strategies:
      cells = []
      for round_index, percent in enumerate(self.config.budgets, 1):
        scores, overlaps = [], []
        for seed in self.config.seeds:
          mine = self.picks(strategy, seed, round_index)
          theirs = self.picks(baseline, seed, round_index)
          if mine is None or theirs is None:
            continue
          mine, theirs = set(mine), set(theirs)
          overlaps.append(len(mine & theirs) / len(mine | theirs))
          if accuracy.get((strategy, seed, round_index)) is not None:
            scores.append(accuracy[strategy, seed, round_index])
        cells.append("-" if not overlaps else (
            (f"{np.mean(scores):.1f} ± {np.std(scores):.1f}" if scores
             else "-") + f" (J {np.mean(overlaps):.2f} ± "
            f"{np.std(overlaps):.2f})"))
      if any(c != "-" for c in cells):
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    if not lines:
      return ""
    head = " | ".join(f"{p:g}%" for p in self.config.budgets)
    return "\n".join([
        f"## Accuracy and overlap with {baseline}'s picks", "",
        f"Per budget: accuracy mean ± std over seeds, and (J: the Jaccard "
        f"overlap |A & B| / |A | B| of the strategy's picks A with "
        f"{baseline}'s picks B on the same seed and budget, mean ± std over "
        f"seeds). The optimising selectors start from {baseline}'s picks: "
        f"J near 1 means the selection did not move (`travel`, "
        f"acquisition.cold_start).", "",
        f"| strategy | {head} |", "|---|" + "---|" * len(self.config.budgets),
        *lines, ""])

  def stage1_losses(self) -> dict[str, np.ndarray]:
    """"<variant> seed <s>" -> `(steps,)` Stage-1 loss per training step,
    for every Stage-1 run loaded or trained (`plots.stage1_loss_figure`)."""
    return {f"{mmssl.VARIANTS[p]} seed {s}": r.step_losses
            for (p, s), r in sorted(self._stage1.items())
            if len(r.step_losses)}

  def modality_gap_markdown(self) -> str:
    """MMCSAL Table 3: eq. 10 on the Stage-1 pool representations, with and
    without prototypes, mean ± std over the Stage-1 seeds trained."""
    lines = []
    m0, m1 = self.data.modalities
    rows = []
    for prototypes in (False, True):
      gaps = [evaluate.modality_gap(r.pool[m0], r.pool[m1])
              for (p, _), r in sorted(self._stage1.items()) if p == prototypes]
      if gaps:
        cell = lambda k: (f"{np.mean([g[k] for g in gaps]):.4f} ± "
                          f"{np.std([g[k] for g in gaps]):.4f}")
        rows.append(f"| {'w/' if prototypes else 'w/o'} | {cell('gap')} | "
                    f"{cell('intra_image_cos')} | {cell('intra_text_cos')} | "
                    f"{cell('cross_cos')} |")
    if rows:
      lines += ["## Modality gap of the Stage-1 representations (eq. 10)", "",
                f"| prototypes | gap | mean cos within {m0} | mean cos within "
                f"{m1} | mean cos {m0}-{m1} |", "|---|---|---|---|---|", *rows,
                ""]
    return "\n".join(lines)

  def embedding_plot(self) -> str:
    """embedding.png: t-SNE of modality 0's Stage-1 (w/o prototypes)
    representations (`report.embedding_plot_points` of them, the bought
    ones always among them), the pairs each strategy bought at the budget
    nearest `report.embedding_plot_percent` (first seed) highlighted."""
    seed = self.config.seeds[0]
    target = self.config.report.embedding_plot_percent
    round_index = 1 + int(np.argmin([abs(p - target)
                                     for p in self.config.budgets]))
    picked = {s: self.picks(s, seed, round_index)
              for s in self.config.strategies}
    picked = {s: p for s, p in picked.items() if p is not None}
    m0 = self.data.modalities[0]
    path = os.path.join(self.workdir, "embedding.png")
    plots.embedding_plot(
        self.representations(False, seed).pool[m0], picked, path,
        labels=self.data.labels, seed=seed,
        max_points=self.config.report.embedding_plot_points,
        title=f"{m0} Stage-1 representations, "
              f"{self.budgets[round_index - 1]} pairs bought")
    return path

  def report(self, runs) -> str:
    """Writes results.md (with the overlap and modality-gap tables),
    stage1_loss.png and, on request, embedding.png; returns the Markdown.
    Trains the Stage-1 variants no selection needed (the gap table covers
    both)."""
    del runs  # Every run's picks and rows are in the workdir.
    config = self.config
    for strategy in config.strategies:
      for seed in config.seeds:
        self.representations(selector_of(config, strategy)[1], seed)
    main = sharding.is_main_process()
    text = report.write(self.workdir, config.report.main_metric,
                        config.report.metrics, title="Cold-start results",
                        save=main, appendix="\n".join((
                            "", self.overlap_markdown(),
                            self.modality_gap_markdown())))
    if main:
      plots.save_png(plots.stage1_loss_figure(self.stage1_losses()),
                     os.path.join(self.workdir, "stage1_loss.png"))
      if config.report.embedding_plot and not fs.exists(
          os.path.join(self.workdir, "embedding.png")):
        self.embedding_plot()
    return text


class ColdStartRun:
  """One strategy and seed: a selection per budget (`round` = its index
  from 1), each done once its row is in metrics.jsonl."""

  def __init__(self, experiment: ColdStartExperiment, strategy: str,
               seed: int):
    self.x = experiment
    self.strategy = strategy
    self.seed = seed
    self._summaries = None

  @property
  def rounds_done(self) -> int:
    return len(self.x.rows.of_run(self.strategy, self.seed))

  def run(self, on_round) -> None:
    """The budgets without a row, in order; `on_round()` after each."""
    done = {r["round"] for r in self.x.rows.of_run(self.strategy, self.seed)}
    self._summaries = experiment_lib.summary_writer(
        self.x.workdir, self.strategy, self.seed)
    for round_index in range(1, self.x.num_rounds + 1):
      if round_index not in done:
        self.x.run_round(self.strategy, self.seed, round_index,
                         self._summaries)
        on_round()

  def close(self) -> None:
    if self._summaries is not None:
      self._summaries.close()


def run_cold_start(config: ml_collections.ConfigDict, workdir: str,
                   mesh=None) -> str:
  """Runs (or resumes) every strategy x seed x budget; returns results.md.

  `config` is `normalize`d. Every problem of it, its data and the workdir
  is raised at once as one ConfigError before anything is written
  (`ColdStartExperiment.create`). Writes the workdir described in the
  module docstring (`experiment_lib.run`: holding its lock throughout).
  """
  return experiment_lib.run(
      lambda: ColdStartExperiment.create(config, workdir, mesh), workdir)
