"""big_vision `.npz` parameter checkpoints: load into a param tree, save one.

The file layout is big_vision's: one `np.savez` archive whose keys are the
'/'-joined parameter paths ("img/Transformer/encoderblock_0/LayerNorm_0/bias",
"t", ...), optionally under "params/" (checkpoints saved with optimizer state)
or "opt/target/" (old flax-optimizer checkpoints); bfloat16 arrays are stored
as 2-byte void. Paths may be local or anything `tf.io.gfile` reads (gs://...).

Loading matches the file against the target tree and converts between the
`nn.scan` form (one stacked `encoderblock`) and the loop form
(`encoderblock_{i}`) either way. A single tower is loaded by passing that
tower's subtree, e.g. `params["img"] = load(params["img"], "vit.npz")`, or
extracted from a two-tower file with big_vision's suffix, `"siglip.npz:img"`.
"""
from __future__ import annotations

import collections
import io
import os
import re
from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

# (prefix, [block index,] rest) of encoder-block parameters.
_SCANNED = re.compile(r"(.*/|)encoderblock/(.*)")
_UNROLLED = re.compile(r"(.*/|)encoderblock_(\d+)/(.*)")


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} -> nested dict."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def save(params: Mapping[str, Any], path: str) -> None:
  """Writes `params` as a big_vision `.npz` (keys '/'-joined paths).

  Cost: one device-to-host copy of every parameter, then one write of all
  bytes (the archive is built in memory, as remote filesystems need).
  """
  flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  with open_file(path, "wb") as f:
    f.write(buffer.getvalue())


def read(path: str) -> dict[str, np.ndarray]:
  """Reads a big_vision `.npz` as {name: array}, selecting `path:sub/tree`.

  Strips a "params/" or "opt/target/" prefix and restores bfloat16 arrays.
  """
  match = re.fullmatch(r"(.*\.npz)(?::([\w/]+))?", path)
  path, subtree = match.groups() if match else (path, None)
  with open_file(path, "rb") as f:
    data = f.read()
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    flat = {k: _recover_dtype(npz[k]) for k in npz.files}
  for prefix in ("params/", "opt/target/"):
    if flat and all(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items()}
  if subtree:
    prefix = subtree.rstrip("/") + "/"
    selected = {k[len(prefix):]: v for k, v in flat.items()
                if k.startswith(prefix)}
    if not selected:
      raise KeyError(f"No parameters under {subtree!r} in {path}; top-level "
                     f"names: {sorted({k.split('/')[0] for k in flat})}")
    flat = selected
  return flat


def load(params: Mapping[str, Any], path: str, *,
         dont_load: Iterable[str] = (),
         resample_posemb: Iterable[str] = ()) -> dict[str, Any]:
  """Returns a tree like `params` with the values of the checkpoint at `path`.

  Args:
    params: the target tree (arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape(model.init, ...)`): gives names, shapes and dtypes.
    path: a big_vision `.npz`, optionally with a ":sub/tree" suffix.
    dont_load: regexes (full match) of names kept from `params` (which must
      then hold arrays), e.g. `("head/.*",)` to re-initialise a head; they may
      be absent from the file.
    resample_posemb: regexes of learned 2-D position embeddings
      (1, h*w, D) that are bilinearly resized when the grid differs (e.g.
      `("img/pos_embedding",)` to fine-tune at another resolution).

  Returns: nested dict of host numpy arrays cast to the target dtypes.
  Raises: ValueError listing missing, unexpected and wrongly shaped keys.
  """
  target = flatten(params)
  loaded = _match_layout(read(path), target)
  keep = [re.compile(p) for p in dont_load]
  resample = [re.compile(p) for p in resample_posemb]
  is_kept = lambda name: any(p.fullmatch(name) for p in keep)

  missing = sorted(k for k in target.keys() - loaded.keys() if not is_kept(k))
  unexpected = sorted(k for k in loaded.keys() - target.keys()
                      if not is_kept(k))
  wrong_shape, merged = [], {}
  for name, want in target.items():
    if is_kept(name) or name not in loaded:
      merged[name] = want
      continue
    value = loaded[name]
    if value.shape != tuple(want.shape):
      if any(p.fullmatch(name) for p in resample):
        value = resample_grid(value, want.shape)
      else:
        wrong_shape.append(f"{name}: file {value.shape}, model {want.shape}")
        continue
    merged[name] = np.asarray(value).astype(want.dtype)
  if missing or unexpected or wrong_shape:
    lines = [f"Checkpoint {path} does not match the model."]
    for title, names in (("Missing from the checkpoint", missing),
                         ("Unexpected in the checkpoint", unexpected),
                         ("Wrong shape", wrong_shape)):
      if names:
        lines += [f"{title} ({len(names)}):"] + [f"  {n}" for n in names]
    raise ValueError("\n".join(lines))
  return unflatten(merged)


def resample_grid(posemb: np.ndarray, shape) -> np.ndarray:
  """Bilinear resize of a (1, h*h, D) position embedding to (1, g*g, D)."""
  old, new = int(np.sqrt(posemb.shape[1])), int(np.sqrt(shape[1]))
  if old * old != posemb.shape[1] or new * new != shape[1] or (
      posemb.shape[2] != shape[2]):
    raise ValueError(f"Cannot resample posemb {posemb.shape} to {shape}.")
  grid = np.asarray(posemb, np.float32).reshape(old, old, -1)
  grid = jax.image.resize(grid, (new, new, grid.shape[-1]), "linear")
  return np.asarray(grid).reshape(shape)


def open_file(path: str, mode: str):
  """Local paths with `open`, URLs (gs://...) with `tf.io.gfile`.

  TensorFlow (seconds to import) is only imported for URLs.
  """
  if "://" not in path:
    if "w" in mode and os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, mode)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if "w" in mode:
    tf.io.gfile.makedirs(os.path.dirname(path))
  return tf.io.gfile.GFile(path, mode)


def _recover_dtype(array: np.ndarray) -> np.ndarray:
  """np.savez writes bfloat16 as 2-byte void; view it back as bfloat16."""
  if array.dtype.type is np.void and array.dtype.itemsize == 2:
    return array.view(jnp.bfloat16)
  return array


def _match_layout(flat: dict[str, np.ndarray],
                  target: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Stacks or unstacks encoder blocks in `flat` to the form `target` uses."""
  target_scanned = {m.group(1) for m in map(_SCANNED.fullmatch, target) if m}
  target_unrolled = {m.group(1) for m in map(_UNROLLED.fullmatch, target) if m}
  out, to_stack = {}, collections.defaultdict(dict)
  for name, value in flat.items():
    unrolled, scanned = _UNROLLED.fullmatch(name), _SCANNED.fullmatch(name)
    if unrolled and unrolled.group(1) in target_scanned:
      prefix, index, rest = unrolled.groups()
      to_stack[(prefix, rest)][int(index)] = value
    elif scanned and scanned.group(1) in target_unrolled:
      prefix, rest = scanned.groups()
      for i, block in enumerate(value):
        out[f"{prefix}encoderblock_{i}/{rest}"] = block
    else:
      out[name] = value
  for (prefix, rest), blocks in to_stack.items():
    out[f"{prefix}encoderblock/{rest}"] = np.stack(
        [blocks[i] for i in range(len(blocks))])
  return out
