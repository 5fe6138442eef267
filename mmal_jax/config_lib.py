"""The base experiment config every `configs/*.py` starts from, and its checks.

A config is a locked `ml_collections.ConfigDict`: the command line may change
any field (`--config.train.epochs=5`) but not invent one, so a typo fails
with the name of the unknown key.

Fields (defaults below):
  seeds, strategies, strategy_hparams.<name>: runs = strategies x seeds; the
    hparams go to `acquisition.STRATEGIES[name]`.
  acquisition: `block` (tile edge), `feature_dtype`, `picks_per_pass` for
    every strategy (see `acquisition.strategies`); `block` and
    `picks_per_pass` left None are chosen per backend and device memory
    (`acquisition.layout.auto_tiling`: 1024 / 16 on CPU, the largest tile
    the device's memory allows on GPU / TPU).
  cold_start: the first round's selector: "" (each strategy's own: a random
    modality) or an `acquisition.SELECTORS` name ("kmeans", "mmcsal", ...;
    see `acquisition.cold_start.with_cold_start`).
  regime: "pool" (every unannotated item is a candidate) or "stream" (round t
    sees only buffer t of `stream_buffer` matched units; the rest is gone).
  budget, num_rounds: queries per round and rounds per run.
  data: `source` ("shapes", "coco", "features"; "colorswap" and "datacomp"
    are named for the paper's configs, their loaders are not in yet) and its
    fields.
  model, loss, optim, res, text_len, tokenizer: from `models.presets`.
  init: where the towers start: "pretrain" (contrastive pre-training on
    `data`'s pre-training set: the shapes source's own, or the pairs that
    `data.pretrain_fraction` / `data.pretrain_pairs` hold out of the pool;
    cached in the workdir), "checkpoint" (a
    big_vision .npz, `init.checkpoint`), or "scratch".
  pretrain: epochs / batch_size / lr of that pre-training.
  train: per-round training on the annotated pairs: epochs, batch_size,
    warmup_fraction of the steps, reinit_each_round (restart from the initial
    weights each round, the paper's fine-tuning protocol, or continue),
    checkpoint_every (steps; orbax, for resuming a preempted run; 0: only
    at the end of each round's training), log_every (steps between fetches
    of the per-step training scalars and the NaN check).
  mesh: data, fsdp: the device mesh (`sharding.make_mesh`; -1 = the rest).
  eval: embed_batch_size.
  report: main_metric (annotation savings vs random; "": ColorSwap's group
    score for grouped sources, else text-to-image R@1: `main_metric`),
    metrics (the tables and curves; empty: every metric), embedding_plot
    (write embedding.png, Fig. 4 left), embedding_plot_points.
  oracle: kind: "simulated" (the dataset's matching) or "file" (people
    answer WORKDIR/queries/round_T.jsonl in WORKDIR/answers/round_T.jsonl,
    by hand or on the annotation page), timeout_s (how long the file oracle
    waits before the run exits with status 3); for the annotation page:
    top_k (matches shown per query), num_ranked (ranked matches stored per
    query), browse_dim (width of the vectors stored for browsing by
    similarity; 0: none).
"""
from __future__ import annotations

import copy
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from mmal_jax import evaluators
from mmal_jax.data import sources
from mmal_jax.errors import ConfigError  # Re-exported: config_lib.ConfigError.
from mmal_jax.acquisition import SELECTORS
from mmal_jax.acquisition import STRATEGIES
from mmal_jax.models import presets

REGIMES = ("pool", "stream")
INIT_KINDS = ("pretrain", "checkpoint", "scratch")
ORACLES = ("simulated", "file")


def from_file(path: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the config file at `path` (e.g. another config
  a config extends, or `configs/x.py` in a test). Cost: one import."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (unlocked: configs override them)."""
  c = ml_collections.ConfigDict()
  c.seeds = (0, 1, 2, 3)  # The paper averages 4 runs.
  c.strategies = ("random", "coreset", "uncertainty", "mmal")
  c.strategy_hparams = ml_collections.ConfigDict(dict(
      random={}, coreset={}, uncertainty={},
      # distances_on="raw": coverage distances on the towers' outputs before
      # normalisation (the Euclidean-vs-cosine ablation; see strategies).
      mmal=dict(coreset_size=config_dict.placeholder(int),  # 4 x budget
                modality="auto", metric="euclidean",
                distances_on="normalized")))
  c.acquisition = ml_collections.ConfigDict(dict(
      block=config_dict.placeholder(int), feature_dtype="float32",
      picks_per_pass=config_dict.placeholder(int)))
  # The first round (nothing annotated): "" = each strategy's own cold start
  # (a random modality), or a cold-start selector (`acquisition.SELECTORS`).
  c.cold_start = ""
  c.regime = "pool"
  c.stream_buffer = 1024
  c.budget = 70
  c.num_rounds = 6

  c.data = sources.default_config()
  # Evaluators run at chosen rounds beside the pool metrics (empty: none).
  c.evals = evaluators.default_config()
  # big_vision pp strings per modality; "": the model's default
  # (`pipeline.default_pp`).
  c.pp = ml_collections.ConfigDict(dict(image="", text=""))

  c.update(presets.tiny("siglip"))
  c.init = ml_collections.ConfigDict(dict(kind="pretrain", checkpoint=""))
  c.pretrain = ml_collections.ConfigDict(dict(epochs=10, batch_size=128,
                                              lr=1e-3))
  c.train = ml_collections.ConfigDict(dict(
      epochs=50, batch_size=70, warmup_fraction=0.1, reinit_each_round=True,
      checkpoint_every=200, log_every=10))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.eval = ml_collections.ConfigDict(dict(embed_batch_size=256))
  c.report = ml_collections.ConfigDict(dict(
      main_metric="", metrics=(),
      # embedding.png: t-SNE of the pool's images (first seed's initial
      # towers) with each strategy's bought items (paper 1, Fig. 4 left).
      embedding_plot=False, embedding_plot_points=3000))
  # top_k, num_ranked, browse_dim: what the annotation page gets with the
  # file oracle (mmal_jax.annotate.ranking): matches shown per query, ranked
  # matches stored per query, width of the vectors kept for browsing by
  # similarity (0: none).
  c.oracle = ml_collections.ConfigDict(dict(
      kind="simulated", timeout_s=0.0, top_k=9, num_ranked=60,
      browse_dim=64))
  return c


# Keys added after workdirs were first written, with the value that does
# what a run did before the key existed: a config.json without one of them
# resumes as if it held that value (`comparable_configs`).
ADDED_KEYS = {
    "data.pretrain_fraction": 0.0,
    "data.pretrain_pairs": "",
    "data.pretrain_split": "",
    "strategy_hparams.mmal.distances_on": "normalized",
}


# Keys that say how a run is carried out, not what it computes: a run
# resumes with other values of them (more frequent checkpoints on a
# preemptible machine, a longer wait for answers) and gives the same picks,
# metrics and parameters, so they are left out of the comparison with a
# workdir's config.json.
RESUMABLE_KEYS = ("train.checkpoint_every", "train.log_every",
                  "stage1.checkpoint_every_epochs", "oracle.timeout_s")


def _holder(tree: dict, dotted: str) -> tuple[dict | None, str]:
  """(the dict of `tree` that holds dotted key `dotted`'s last part, or None
  where a parent is missing or not a dict; that last part)."""
  *parents, key = dotted.split(".")
  for part in parents:
    tree = tree.get(part) if isinstance(tree, dict) else None
  return (tree if isinstance(tree, dict) else None), key


def comparable_configs(saved: dict, current: dict) -> tuple[dict, dict]:
  """Two config.json trees reduced to what decides a run, to compare a
  workdir's recorded config with the one given now.

  `saved` gains the `ADDED_KEYS` it lacks where `current` has them, both
  lose the `RESUMABLE_KEYS` and the `strategy_hparams` of strategies
  `current` does not run (they change nothing; a strategy list that
  differs still shows as a difference). Pure; copies the trees. Cost:
  O(size of the trees).
  """
  saved, current = copy.deepcopy(saved), copy.deepcopy(current)
  for tree in (saved, current):
    for dotted in RESUMABLE_KEYS:
      node, key = _holder(tree, dotted)
      if node is not None:
        node.pop(key, None)
  for dotted, value in ADDED_KEYS.items():
    (s, key), (c, _) = _holder(saved, dotted), _holder(current, dotted)
    if s is not None and c is not None and key in c and key not in s:
      s[key] = value
  running = set(current.get("strategies") or ())
  for tree in (saved, current):
    hparams = tree.get("strategy_hparams")
    if isinstance(hparams, dict):
      tree["strategy_hparams"] = {k: v for k, v in hparams.items()
                                  if k in running}
  return saved, current


MODEL_FIELDS = ("model", "loss", "optim", "res", "text_len", "tokenizer")
MODALITIES = ("image", "text")


def use_preset(config: ml_collections.ConfigDict,
               preset: ml_collections.ConfigDict) -> None:
  """Replaces config's model fields by a `models.presets` recipe's, whole.

  A field the recipe lacks keeps its value (the features recipe has no
  `res`, `text_len` or `tokenizer`: nothing reads them for feature rows);
  fields only the recipe has (`feature_dims`) are added.
  """
  for key in MODEL_FIELDS:
    if key in preset:
      config[key] = preset[key]
  with config.unlocked():
    for key in set(preset) - set(MODEL_FIELDS):
      config[key] = preset[key]


def use_small_towers(config: ml_collections.ConfigDict, *, width: int,
                     depth: int, patch: int, res: int, text_len: int) -> None:
  """ViT and text transformer of `width` x `depth` (heads of 32, MLP 4x)."""
  tower = dict(width=width, depth=depth, mlp_dim=4 * width,
               num_heads=max(1, width // 32))
  config.model.image.update(variant=f"mu/{patch}", **tower)
  config.model.text.update(variant="mu", **tower)
  with config.model.ignore_type():  # CLIP presets give one int.
    config.model.out_dim = (None, width)
  config.res = res
  config.text_len = text_len


def _choice(name: str, value, choices) -> str | None:
  if value not in choices:
    return f"config.{name}={value!r} is not one of {list(choices)}."
  return None


def _integer(name: str, value, minimum: int = 1) -> str | None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    return f"config.{name} must be {what}, got {value!r}."
  return None


def _optional_integer(name: str, value, minimum: int = 1) -> str | None:
  """As `_integer`; None (chosen per backend) is valid too."""
  return None if value is None else _integer(name, value, minimum)


def tiling(acquisition: ml_collections.ConfigDict) -> dict:
  """`block` and `picks_per_pass` for the acquisition kernels from
  `config.acquisition`: its values, or "auto" (`layout.auto_tiling`, per
  backend and device memory) where it leaves them None."""
  auto = lambda v: "auto" if v is None else v
  return dict(block=auto(acquisition.get("block")),
              picks_per_pass=auto(acquisition.get("picks_per_pass")))


def _field(config, name: str):
  for part in name.split("."):
    config = config[part]
  return config


# Arguments the loop passes to every strategy; the rest are its hparams.
_LOOP_ARGUMENTS = ("embeddings", "annotated", "budget", "seed", "candidates",
                   "mesh", "block", "feature_dtype", "picks_per_pass",
                   "min_dist")


def _strategy_problems(config) -> list[str]:
  """Problems of `config.strategy_hparams` for the strategies that run."""
  import inspect  # pylint: disable=g-import-not-at-top
  from mmal_jax.acquisition import kernels  # pylint: disable=g-import-not-at-top
  from mmal_jax.acquisition import strategies  # pylint: disable=g-import-not-at-top
  problems = []
  for name in config.strategies:
    hparams = dict(config.strategy_hparams.get(name, {}))
    accepted = set(inspect.signature(STRATEGIES[name]).parameters)
    accepted -= set(_LOOP_ARGUMENTS)
    field = f"config.strategy_hparams.{name}"
    for key in sorted(set(hparams) - accepted):
      problems.append(f"{field}.{key} is not a hyper-parameter of {name!r}; "
                      f"it takes {sorted(accepted)}.")
    if "metric" in hparams and hparams["metric"] not in kernels.METRICS:
      problems.append(f"{field}.metric={hparams['metric']!r} is not one of "
                      f"{list(kernels.METRICS)}.")
    if ("distances_on" in hparams and
        hparams["distances_on"] not in strategies.DISTANCES_ON):
      problems.append(f"{field}.distances_on={hparams['distances_on']!r} is "
                      f"not one of {list(strategies.DISTANCES_ON)}.")
    if "modality" in hparams:
      choices = list(strategies.MODALITY_CHOICES) + list(MODALITIES)
      if hparams["modality"] not in choices:
        problems.append(f"{field}.modality={hparams['modality']!r} is not one "
                        f"of {choices}.")
    size = hparams.get("coreset_size")
    if size is not None and (not isinstance(size, int) or
                             isinstance(size, bool) or size < config.budget):
      problems.append(f"{field}.coreset_size must be an integer >= "
                      f"config.budget ({config.budget}), got {size!r}.")
  return problems


def duplicate_problems(config: ml_collections.ConfigDict) -> list[str]:
  """#17 item 10: a seed or strategy named twice would run the same run
  twice in one workdir (the second buying every round again)."""
  out = []
  for name in ("seeds", "strategies"):
    values = list(config[name])
    twice = sorted({v for v in values if values.count(v) > 1}, key=str)
    if twice:
      out.append(f"config.{name} names {', '.join(map(repr, twice))} more "
                 f"than once ({tuple(values)!r}); each run is one strategy "
                 f"and one seed: list each once (e.g. --config.{name}="
                 f"{','.join(map(str, dict.fromkeys(values)))}).")
  return out


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of a config's values that shows without data or files.

  Each is one sentence naming the field and what it accepts.
  """
  out = []
  if not config.strategies:
    out.append("config.strategies is empty; name at least one of "
               f"{sorted(STRATEGIES)}.")
  unknown = [n for n in config.strategies
             if not isinstance(n, str) or n not in STRATEGIES]
  for name in unknown:
    out.append(f"config.strategies names unknown strategy {name!r}; known: "
               f"{sorted(STRATEGIES)}.")
  extra = set(config.strategy_hparams) - set(STRATEGIES)
  if extra:
    out.append(f"config.strategy_hparams has unknown strategies "
               f"{sorted(extra)}; known: {sorted(STRATEGIES)}.")
  if not config.seeds:
    out.append("config.seeds is empty.")
  elif not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
               for s in config.seeds):
    out.append(f"config.seeds must be non-negative integers (e.g. "
               f"--config.seeds=0,1), got {config.seeds!r}.")
  out += duplicate_problems(config)
  out += [p for p in (
      _choice("regime", config.regime, REGIMES),
      _choice("data.source", config.data.source, sources.SOURCES),
      _choice("init.kind", config.init.kind, INIT_KINDS),
      _choice("oracle.kind", config.oracle.kind, ORACLES),
      _choice("loss", config.loss, ("siglip", "clip")),
      _choice("acquisition.feature_dtype", config.acquisition.feature_dtype,
              ("float32", "bfloat16", "float16")),
      _choice("cold_start", config.cold_start, ("",) + tuple(sorted(
          SELECTORS)))) if p]
  for name in ("budget", "num_rounds", "stream_buffer", "train.epochs",
               "train.batch_size", "train.log_every", "eval.embed_batch_size",
               "pretrain.epochs", "pretrain.batch_size"):
    out += [p for p in [_integer(name, _field(config, name))] if p]
  out += [p for p in [
      _integer("train.checkpoint_every", config.train.checkpoint_every, 0),
      _optional_integer("acquisition.block", config.acquisition.block, 8),
      _optional_integer("acquisition.picks_per_pass",
                        config.acquisition.picks_per_pass)] if p]
  for name in ("data", "fsdp"):
    size = config.mesh[name]
    if not isinstance(size, int) or isinstance(size, bool) or (
        size != -1 and size < 1):
      out.append(f"config.mesh.{name} must be a positive integer or -1, got "
                 f"{size!r}.")
  if (not out and config.regime == "stream" and
      config.budget > config.stream_buffer):
    out.append(f"config.budget={config.budget} is larger than a stream "
               f"buffer (config.stream_buffer={config.stream_buffer}).")
  if not 0 <= config.train.warmup_fraction < 1:
    out.append("config.train.warmup_fraction must be in [0, 1).")
  if not config.oracle.timeout_s >= 0:
    out.append("config.oracle.timeout_s must be >= 0.")
  ranking = [_integer("oracle.top_k", config.oracle.top_k),
             _integer("oracle.num_ranked", config.oracle.num_ranked),
             _integer("oracle.browse_dim", config.oracle.browse_dim, 0)]
  out += [p for p in ranking if p]
  if not any(ranking) and config.oracle.num_ranked < config.oracle.top_k:
    out.append(f"config.oracle.num_ranked={config.oracle.num_ranked} must be "
               f">= config.oracle.top_k={config.oracle.top_k} (the page "
               f"shows top_k of the ranked matches).")
  if config.init.kind == "pretrain" and not sources.has_pretrain(config.data):
    out.append(f"config.init.kind='pretrain' needs a data source with a "
               f"pre-training set ({list(sources.WITH_PRETRAIN)}) or pairs "
               f"of one's own held out for it (config.data.pretrain_fraction "
               f"or config.data.pretrain_pairs); {config.data.source!r} has "
               f"none. Set one of those, or use init.kind='checkpoint' or "
               f"'scratch'.")
  if (config.init.kind != "pretrain" and
      config.data.source not in sources.WITH_PRETRAIN and
      sources.has_pretrain(config.data)):
    out.append(f"config.data.pretrain_fraction / pretrain_pairs hold pairs "
               f"out of the pool for pre-training, which "
               f"init.kind={config.init.kind!r} does not do: set "
               f"--config.init.kind=pretrain, or drop them.")
  out += _tower_problems(config)
  if config.init.kind == "checkpoint" and not config.init.checkpoint:
    out.append("config.init.kind='checkpoint' needs "
               "--config.init.checkpoint=PATH (a big_vision .npz).")
  if config.oracle.kind == "file" and (len(config.strategies) > 1 or
                                      len(config.seeds) > 1):
    out.append("The file oracle serves one run: set one strategy and one "
               "seed (config.strategies, config.seeds).")
  if not unknown and isinstance(config.budget, int):
    out += _strategy_problems(config)
  evals_problems = evaluators.check(config.get("evals"))
  out += evals_problems
  if not evals_problems:
    out += _metric_problems(config)
  return out


# Sources whose items are feature rows (`feature_tower` inputs).
FEATURE_SOURCES = ("features",)


def _tower_problems(config) -> list[str]:
  """Towers that cannot take the source's items: feature towers take float
  rows (only from `FEATURE_SOURCES`), the other towers pixels / token ids."""
  out = []
  source = config.data.source
  for m in MODALITIES:
    name = config.model.get(f"{m}_model", None)
    takes_rows = name == "feature_tower"
    if takes_rows and source not in FEATURE_SOURCES:
      out.append(f"config.model.{m}_model='feature_tower' takes feature rows, "
                 f"but config.data.source={source!r} gives "
                 f"{'images' if m == 'image' else 'captions'}: use a model "
                 f"preset for them (models.presets) or data.source='features'.")
    elif not takes_rows and source in FEATURE_SOURCES:
      out.append(f"config.data.source={source!r} gives {m} feature rows, but "
                 f"config.model.{m}_model={name!r} takes "
                 f"{'images' if m == 'image' else 'token ids'}: use "
                 f"presets.features(...) as configs/features.py does.")
  return out


def main_metric(config: ml_collections.ConfigDict) -> str:
  """`config.report.main_metric`, or where empty the source's headline."""
  if config.report.main_metric:
    return config.report.main_metric
  return ("colorswap/group" if config.data.source in sources.GROUPED
          else "retrieval/t2i_r@1")


def _metric_problems(config) -> list[str]:
  """`report.main_metric` / `report.metrics` the run would not produce."""
  known = evaluators.metric_names(config)
  named = [main_metric(config), *config.report.metrics]
  return [f"config.report.{'main_metric' if i == 0 else 'metrics'} names "
          f"{name!r}, which a {config.data.source!r} run with these "
          f"evaluators does not produce; known: {sorted(known)}."
          for i, name in enumerate(named) if name not in known]


def raise_problems(found: list[str]) -> None:
  """Raises one ConfigError listing every problem (none: returns)."""
  if len(found) == 1:
    raise ConfigError(found[0])
  if found:
    raise ConfigError(f"{len(found)} problems: " + " ".join(
        f"({i}) {p}" for i, p in enumerate(found, 1)))


def normalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns `config` with list fields given as one command-line string
  (`--config.strategies=mmal,random`) split, locked."""
  strategies = config.strategies
  if isinstance(strategies, str):
    strategies = (strategies,)
  config.strategies = tuple(
      name.strip() if isinstance(name, str) else name
      for entry in strategies
      for name in (entry.split(",") if isinstance(entry, str) else [entry])
      if not isinstance(name, str) or name.strip())
  config.lock()
  return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`normalize`, then raises one ConfigError naming every problem found
  by `problems`; returns the config locked."""
  config = normalize(config)
  raise_problems(problems(config))
  return config
