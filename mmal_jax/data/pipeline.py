"""The tf.data input pipeline: per-process reading, parallel decoding, prefetch.

Training batches (`train_batches`) and the embedding pass over a pool
(`embed_pool`) read pool items by reference (`pool.ItemRefs`: files, byte
ranges of shards, encoded bytes) or from memory (pixels, features, captions),
preprocess them with a big_vision pp string per modality (`data.pp`), and
assemble global `jax.Array`s split over every device of the mesh
(`sharding.row_sharding`).

Shard rule. A global batch of B rows is split over the mesh's devices in
row-major order (`sharding.ROW_AXES`); each process reads and decodes exactly
the rows its own devices hold (`process_rows`: the rows of its addressable
shards, ascending) and hands them to `jax.make_array_from_process_local_data`.
Which pairs form global batch k of epoch e depends only on the seed (the same
permutation as `preprocess.pair_batches`), never on the number of processes or
devices, so a run resumes exactly at any step and gives the same batches on
any topology.

An item enters the pp as `{modality: value}` (a text also under `"texts"`,
big_vision's key) and leaves as `out[modality]`, or for texts `out["labels"]`
when the pp wrote it (big_vision's `tokenize` default), so
`tokenize(max_len=64, eos='sticky', model='c4_en', inkey='texts')` works as in
big_vision. Files named by `FileRefs` are read with TensorFlow's reader
locally and through `mmal_jax.fs` for URLs (so `gs://` data works offline
against the GCS emulator too).
"""
from __future__ import annotations

import functools
import os
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from mmal_jax import fs
from mmal_jax import sharding
from mmal_jax.data import image_check
from mmal_jax.data import pp as pp_lib
from mmal_jax.data import preprocess
from mmal_jax.data.pool import (FileRefs, ItemRefs, RangeRefs,
                                UnalignedPool, as_index_rows, check_int)

AUTOTUNE = tf.data.AUTOTUNE
try:  # Input pipelines run on the host; leave accelerators to JAX.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow's devices were already initialised.
  pass


def default_pp(pool: UnalignedPool, *, res: int, text_len: int,
               tokenizer: str) -> dict[str, str]:
  """The pp string per modality equivalent to `preprocess.prepare_items`.

  Images: `decode|resize(res)|value_range(-1, 1)`; captions: the model's
  tokenizer, EOS kept on truncation and used as padding (big_vision's SigLIP
  text pipeline; not lower-cased, as `train.Towers` today); feature rows:
  none.
  """
  out = {}
  for m, items in pool.items.items():
    if isinstance(items, np.ndarray) and items.dtype.kind == "f":
      out[m] = ""
    elif _is_text(m, items):
      out[m] = (f"tokenize(max_len={text_len}, eos='sticky', "
                f"model={tokenizer!r}, pad_value='</s>', lower=False, "
                f"inkey='text', outkey='text')")
    else:
      out[m] = f"decode|resize({res})|value_range(-1, 1)"
  return out


def _is_text(modality: str, items) -> bool:
  return (modality != "image" and isinstance(items, tuple) and
          all(isinstance(x, str) for x in items))


def _path_reader(root: str, names) -> tuple:
  """(table, fn(index) -> encoded bytes) for files `root/names[i]`."""
  table = tf.constant(np.asarray(names, np.bytes_))
  if fs.is_remote(root):
    def read(path) -> bytes:
      return fs.read_bytes(np.asarray(path).item().decode("utf-8"))
    return table, lambda i: tf.numpy_function(
        read, [_join(root, tf.gather(table, i))], tf.string, stateful=False)
  return table, lambda i: tf.io.read_file(_join(root, tf.gather(table, i)))


def _join(root: str, name):
  return tf.strings.join([root.rstrip("/") + "/", name]) if root else name


def reader(pool: UnalignedPool, modality: str):
  """`fn(index) -> raw item` for use inside a tf.data map.

  Raw items are encoded bytes (`tf.string`, for `decode`), pixels or feature
  rows, or caption strings. In-memory items are captured once as tensors
  (not copied per element); references are read on demand. Cost per call:
  one gather, plus one file or byte-range read for references.
  """
  items = pool.items[modality]
  if isinstance(items, FileRefs):
    return _path_reader(items.root, items.names)[1]
  if isinstance(items, ItemRefs):
    def read(i) -> bytes:
      return items.read(int(i))
    return lambda i: tf.numpy_function(read, [i], tf.string, stateful=False)
  if isinstance(items, np.ndarray):
    table = tf.constant(items)
    return lambda i: tf.gather(table, i)
  if all(isinstance(x, str) for x in items):
    if modality == "image":  # Image paths, as `prepare_items` reads them.
      return _path_reader("", [os.fspath(x) for x in items])[1]
    table = tf.constant(np.array(items, object))
    return lambda i: tf.gather(table, i)
  shapes = {np.shape(x) for x in items}
  if len(shapes) == 1:
    table = tf.constant(np.stack(items))
    return lambda i: tf.gather(table, i)
  dtype = tf.as_dtype(np.asarray(items[0]).dtype)

  def take(i):
    return np.asarray(items[int(i)])
  return lambda i: tf.ensure_shape(
      tf.numpy_function(take, [i], dtype, stateful=False),
      (None,) * np.ndim(items[0]))


def preprocess_fn(pool: UnalignedPool, modality: str, pp: str):
  """`fn(index) -> model input` of one item: read, then the pp string."""
  read = reader(pool, modality)
  process = process_fn(modality, pp)
  return lambda i: process(read(i))


def item_fn(pool: UnalignedPool, modality: str, pp: str, needed):
  """`fn(index) -> model input`, as `preprocess_fn`, for items `needed`.

  Captions held in memory are run through the pp ahead of the tf.data
  graph, as one batch of the `needed` ones (one tokenizer call: no Python
  per caption in the graph's threads), and the graph gathers their rows;
  other items, and a pp that cannot take a batch, go through
  `preprocess_fn`. Cost: the pp on `len(unique(needed))` captions once,
  an int32 `(unique, len)` table and an int64 `(N,)` row map in memory.
  """
  items = pool.items[modality]
  needed = np.unique(np.asarray(needed, np.int64))
  if pp and _is_text(modality, items) and needed.size:
    texts = tf.constant(np.array([items[i] for i in needed], object))
    try:
      table = process_fn(modality, pp)(texts)
    except (ValueError, tf.errors.OpError):
      table = None  # A pp that takes one caption at a time.
    if table is not None and table.shape[:1] == (needed.size,):
      row_of = np.zeros(len(items), np.int64)
      row_of[needed] = np.arange(needed.size)
      row_of = tf.constant(row_of)
      return lambda i: tf.gather(table, tf.gather(row_of, i))
  return preprocess_fn(pool, modality, pp)


def process_fn(modality: str, pp: str):
  """`fn(raw item) -> model input`: the pp string on one raw item (as
  `reader` returns it)."""
  process = pp_lib.get_preprocess_fn(pp)

  def fn(value):
    data = {modality: value}
    if modality == "text":
      data["texts"] = value
    out = process(data)
    if modality == "text" and "labels" in out:
      return out["labels"]
    if modality not in out:
      raise ValueError(f"The {modality} pp {pp!r} left no {modality!r} key "
                       f"(keys: {sorted(out)}).")
    return out[modality]
  return fn


def _naming_bad_images(batches, pool: UnalignedPool, items_of: Mapping):
  """`batches`, but a decoding error raises `image_check.UndecodableImage`
  naming the first undecodable item among `items_of[modality]` (indices)."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError:
    for modality, indices in items_of.items():
      refs = pool.items[modality]
      if isinstance(refs, ItemRefs):
        found = image_check.first_undecodable(refs, indices)
        if found is not None:
          raise image_check.undecodable_error(*found) from None
    raise


def _rows_of(indices_map, devices, num_rows: int) -> np.ndarray:
  ranges = [np.arange(*indices_map[d][0].indices(num_rows)) for d in devices]
  return np.unique(np.concatenate(ranges)) if ranges else np.zeros(0, np.int64)


def process_rows(row_sharding: jax.sharding.Sharding, num_rows: int
                 ) -> np.ndarray:
  """Ascending global rows of a `(num_rows, ...)` array this process's devices
  hold under `row_sharding`: the rows it must read, in the order
  `jax.make_array_from_process_local_data` takes them."""
  indices_map = row_sharding.devices_indices_map((num_rows,))
  local = [d for d in indices_map if d.process_index == jax.process_index()]
  return _rows_of(indices_map, local, num_rows)


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  return ds.with_options(options)


def _to_global(mesh, local: np.ndarray, num_rows: int) -> jax.Array:
  return jax.make_array_from_process_local_data(
      sharding.row_sharding(mesh), local, (num_rows,) + local.shape[1:])


def train_batches(pool: UnalignedPool, pairs: np.ndarray, batch_size: int,
                  pp: Mapping[str, str], *, seed: int, mesh,
                  num_epochs: int | None = 1, start_step: int = 0,
                  modalities: tuple[str, str] = ("image", "text"),
                  prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Shuffled training batches as global arrays, each process decoding its rows.

  The same batches as `preprocess.pair_batches(..., drop_remainder=True)`:
  epoch e visits the `(P, 2)` `pairs` in the order of a permutation drawn with
  `(seed, e)`, `batch_size` pairs per batch, the last partial batch dropped.
  A batch is `{m: inputs, m + "_index": int32 item indices}` for both
  modalities, split over every device of `mesh`. `start_step` skips that many
  batches without reading them; `num_epochs=None` repeats forever.
  When the device count does not divide `batch_size`, each batch is padded to
  the next multiple of it with copies of its first pairs (rows `batch_size`
  onwards) and carries `"valid"`, `(padded,)` bool, False on those rows: the
  loss ignores them (`losses`), so a run takes the same batches and steps on
  any mesh, and `batch_size` may be smaller than the device count.
  An image that cannot be decoded raises `image_check.UndecodableImage`
  naming it.
  Cost per batch and process: reading and preprocessing its
  `batch_size / processes` pairs, in parallel threads (`tf.data` AUTOTUNE),
  `prefetch` batches ahead.
  """
  check_int("batch_size", batch_size, 1)
  padded = -(-batch_size // mesh.size) * mesh.size
  pairs = as_index_rows("pairs", pairs)
  if len(pairs) < batch_size:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(pairs)} pairs; "
                     "no full batch to make.")
  if num_epochs is not None:
    check_int("num_epochs", num_epochs, 1)
  check_int("start_step", start_step, 0)
  per_epoch = len(pairs) // batch_size
  first_epoch, skip = divmod(start_step, per_epoch)
  local = process_rows(sharding.row_sharding(mesh), padded)
  fns = [item_fn(pool, m, pp[m], pairs[:, col])
         for col, m in enumerate(modalities)]

  def epoch_rows(epoch):
    epoch = int(epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(pairs))
    batches = order[:per_epoch * batch_size].reshape(per_epoch, batch_size)
    batches = batches[:, preprocess.padded_order(batch_size, mesh.size)]
    rows = pairs[batches[:, local]]                # (per_epoch, local, 2)
    if epoch == first_epoch:
      rows = rows[skip:]
    return rows.reshape(-1, 2)

  def rows_dataset(epoch):
    rows = tf.numpy_function(epoch_rows, [epoch], tf.int64, stateful=False)
    return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(rows, (None, 2)))

  def element(row):
    out = {}
    for col, (m, fn) in enumerate(zip(modalities, fns)):
      out[m] = fn(row[col])
      out[m + "_index"] = tf.cast(row[col], tf.int32)
    return out

  stop = 2 ** 62 if num_epochs is None else num_epochs
  ds = tf.data.Dataset.range(first_epoch, stop)
  ds = ds.flat_map(rows_dataset)
  ds = ds.map(element, num_parallel_calls=AUTOTUNE)
  ds = _options(ds.batch(len(local), drop_remainder=True).prefetch(prefetch))
  extra = {}
  if padded != batch_size:
    extra["valid"] = local < batch_size
  batches = _naming_bad_images(
      ds.as_numpy_iterator(), pool,
      {m: pairs[:, col] for col, m in enumerate(modalities)})
  return ({k: _to_global(mesh, v, padded)
           for k, v in {**batch, **extra}.items()}
          for batch in batches)


def host_batches(pool: UnalignedPool, modality: str, indices, pp: str,
                 batch_size: int, *, prefetch: int = 2) -> tf.data.Dataset:
  """Preprocessed items `indices` of `modality`, in order, in host batches of
  `batch_size` (the last may be smaller): the reading half of `embed_pool`
  for one process. Items are read and preprocessed in parallel threads
  (AUTOTUNE), `prefetch` batches ahead; shard members (`RangeRefs`) are
  read in runs, one read per `READ_RUN` consecutive members
  (`_sequential_reads`)."""
  indices = np.asarray(indices, np.int64)
  items = pool.items[modality]
  if isinstance(items, RangeRefs):
    ds = _sequential_reads(items, indices).map(
        process_fn(modality, pp), num_parallel_calls=AUTOTUNE)
  else:
    ds = tf.data.Dataset.from_tensor_slices(indices).map(
        item_fn(pool, modality, pp, indices), num_parallel_calls=AUTOTUNE)
  return _options(ds.batch(batch_size).prefetch(prefetch))


# Items per read of a shard run (`RangeRefs.read_many`) in `host_batches`.
READ_RUN = 64


def _sequential_reads(refs: RangeRefs, indices: np.ndarray) -> tf.data.Dataset:
  """The encoded bytes of `refs[indices]`, in order, read in runs of up to
  `READ_RUN` items with one read of their byte span each (a shard's members
  in order: one GET per run on gs://), several runs read in parallel
  threads, their items kept in order."""
  runs = [indices[i:i + READ_RUN] for i in range(0, len(indices), READ_RUN)]

  def read(k) -> np.ndarray:
    return np.array(refs.read_many(runs[int(k)]), object)

  return tf.data.Dataset.range(len(runs)).map(
      lambda k: tf.ensure_shape(
          tf.numpy_function(read, [k], tf.string, stateful=False), (None,)),
      num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()


@functools.lru_cache(maxsize=64)
def _jitted_apply(apply_fn, mesh):
  return jax.jit(apply_fn, out_shardings=sharding.row_sharding(mesh))


@functools.lru_cache(maxsize=64)
def _jitted_update(mesh, rows_per_step: int):
  """`update(out, z, step, chunk, num_valid)`: writes batch `z`'s rows into
  each device's own chunk of `out` at `step * rows_per_step`, zeroing rows
  past `num_valid`; no communication."""
  spec = sharding.row_spec()

  def local_update(out, z, step, chunk, num_valid):
    device = jax.lax.axis_index(sharding.ROW_AXES)
    start = step * rows_per_step
    position = device * chunk + start + jnp.arange(rows_per_step)
    z = jnp.where((position < num_valid)[:, None], z, 0).astype(out.dtype)
    return jax.lax.dynamic_update_slice(out, z, (start, 0))

  update = jax.shard_map(local_update, mesh=mesh,
                         in_specs=(spec, spec, None, None, None),
                         out_specs=spec)
  return jax.jit(update, donate_argnums=0)


def embed_layout(num_rows: int, batch_size: int, num_devices: int
                 ) -> tuple[int, int]:
  """`(global batch, steps)` of an embedding pass over `num_rows` items.

  The batch is `preprocess.bucket_size(num_rows, batch_size, devices)`
  (batch_size rounded up to the device count first); the output has
  `steps * batch` rows, fewer than `num_rows + batch`.
  """
  batch_size = -(-batch_size // num_devices) * num_devices
  batch = preprocess.bucket_size(num_rows, batch_size, num_devices)
  return batch, -(-num_rows // batch)


def embed_pool(apply_fn, params, pool: UnalignedPool, modality: str, indices,
               mesh, batch_size: int, pp: str, *, prefetch: int = 2
               ) -> jax.Array:
  """Embeddings of items `indices` of `pool`, left on the mesh.

  One streamed pass: device d of the mesh (row-major over `ROW_AXES`) owns
  output rows `[d * R, (d + 1) * R)`, and each process reads, decodes and
  embeds only the items of its own devices' rows, `batch / devices` per
  device per step. `apply_fn(params, inputs) -> (B, D)` is jitted here (pass
  the same function object across calls to reuse its compilation; one
  compilation per batch bucket, see `embed_layout`).

  Returns a global `(padded_rows, D)` array row-sharded over `mesh`
  (`sharding.row_sharding`): rows `[0, len(indices))` are the embeddings in
  the order of `indices`, padding rows at the end are zero; nothing is
  gathered to one host. An image that cannot be decoded raises
  `image_check.UndecodableImage` naming it. Cost: one forward pass per item
  (plus fewer than one batch of padding), one read + preprocessing per item
  on its process.
  """
  indices = np.asarray(indices, np.int64)
  if indices.ndim != 1 or indices.size == 0:
    raise ValueError(f"indices must be a non-empty 1-D array, got shape "
                     f"{indices.shape}.")
  check_int("batch_size", batch_size, 1)
  num_rows, devices = len(indices), mesh.size
  batch, steps = embed_layout(num_rows, batch_size, devices)
  per_device = batch // devices
  chunk = steps * per_device
  padded = steps * batch
  owned = process_rows(sharding.row_sharding(mesh), padded)
  starts = owned[::chunk]                    # One chunk per local device.
  positions = (starts[None, :, None] + per_device * np.arange(steps)[:, None,
                                                                    None]
               + np.arange(per_device)[None, None, :]).reshape(-1)
  items = indices[np.minimum(positions, num_rows - 1)]
  ds = host_batches(pool, modality, items, pp, len(starts) * per_device,
                    prefetch=prefetch)
  apply = _jitted_apply(apply_fn, mesh)
  update = _jitted_update(mesh, per_device)
  out = None
  batches = _naming_bad_images(ds.as_numpy_iterator(), pool,
                                {modality: items})
  for step, local in enumerate(batches):
    z = apply(params, _to_global(mesh, local, batch))
    if out is None:
      out = jnp.zeros((padded, z.shape[1]), z.dtype,
                      device=sharding.row_sharding(mesh))
    out = update(out, z, np.int32(step), np.int32(chunk), np.int32(num_rows))
  return out
