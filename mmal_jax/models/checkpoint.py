"""big_vision `.npz` parameter checkpoints: load into a param tree, save one.

The file layout is big_vision's: one `np.savez` archive whose keys are the
'/'-joined parameter paths ("img/Transformer/encoderblock_0/LayerNorm_0/bias",
"t", ...). A training checkpoint keeps them under "params/" beside its
optimizer state ("opt/..."); old flax-optimizer checkpoints under
"opt/target/". bfloat16 arrays are stored as 2-byte void. Paths go through
`mmal_jax.fs`: local or `gs://`.

Reading converts the older layouts big_vision converts on load
(`fix_old_layout`): the AugReg / `vision_transformer` ViT (pre-linen module
numbering, position embedding inside `Transformer` and covering the class
token) and text towers whose position embedding was added twice. Loading
matches the file against the target tree and converts between the `nn.scan`
form (one stacked `encoderblock`) and the loop form (`encoderblock_{i}`)
either way. A single tower is loaded by passing that tower's subtree, e.g.
`params["img"] = load(params["img"], "vit.npz")`, or extracted from a
two-tower file with big_vision's suffix, `"siglip.npz:img"`.
"""
from __future__ import annotations

import collections
import io
import re
import zipfile
from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from mmal_jax import fs

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

  Atomic (`fs.write_bytes`): a kill mid-write leaves the previous file or
  none, never a torn one. Cost: one device-to-host copy of every parameter,
  then one write of all bytes (the archive is built in memory).
  """
  flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  fs.write_bytes(path, buffer.getvalue())


def read(path: str) -> dict[str, np.ndarray]:
  """Reads a big_vision `.npz` as {name: array}, selecting `path:sub/tree`.

  Takes the "params/" subtree of a training checkpoint (dropping "opt/...")
  or the "opt/target/" one of an old flax-optimizer checkpoint, restores
  bfloat16 arrays and converts old layouts (`fix_old_layout`).
  Raises ValueError naming the file if it is not a readable `.npz` (e.g.
  truncated), KeyError if `sub/tree` is absent. Cost: one read of the file.
  """
  match = re.fullmatch(r"(.*\.npz)(?::([\w/]+))?", path)
  path, subtree = match.groups() if match else (path, None)
  data = fs.read_bytes(path)
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      flat = {k: _recover_dtype(npz[k]) for k in npz.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise ValueError(
        f"{path} is not a readable .npz checkpoint ({type(e).__name__}: {e}); "
        f"it may be truncated by an interrupted copy. Delete it so that it is "
        f"rebuilt (or fetch it again).") from e
  for prefix in ("params/", "opt/target/"):
    selected = {k[len(prefix):]: v for k, v in flat.items()
                if k.startswith(prefix)}
    if selected:
      flat = selected
      break
  flat = fix_old_layout(flat)
  if subtree:
    prefix = subtree.rstrip("/") + "/"
    selected = {k[len(prefix):]: v for k, v in flat.items()
                if k.startswith(prefix)}
    if not selected:
      raise KeyError(f"No parameters under {subtree!r} in {path}; top-level "
                     f"names: {sorted({k.split('/')[0] for k in flat})}")
    flat = selected
  return flat


def fix_old_layout(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Converts older checkpoint layouts to this code's names, as big_vision.

  - Pre-linen module numbering, e.g. the AugReg / `vision_transformer` block
    `LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`:
    sibling modules of one kind are renumbered 0, 1, ... in order (a no-op on
    current files).
  - A ViT (any subtree holding `Transformer`) whose position embedding lives
    in `Transformer/posembed_input` or `Transformer`, moved beside it; one
    that covers the class token too ((1, 1 + h*w, D)) is split: that entry is
    added to `cls` (the old model added it to the class token, this one
    concatenates the class token after adding the position embedding).
  - A text tower whose `Encoder_0/pos_embedding` was added a second time:
    summed into `pos_embedding`.
  Cost: O(number of arrays) plus one add per moved embedding.
  """
  tree = _renumber_pre_linen(unflatten(flat))
  _fix_subtrees(tree)
  return flatten(tree)


def _renumber_pre_linen(tree):
  """`Name_i` sub-modules (dict values) renumbered 0.. per Name, in order."""
  if not isinstance(tree, dict):
    return tree
  groups = collections.defaultdict(list)
  for key, value in tree.items():
    match = re.fullmatch(r"(.+)_(\d+)", key)
    if match and isinstance(value, dict):
      groups[match.group(1)].append(int(match.group(2)))
  rename = {f"{name}_{old}": f"{name}_{new}" for name, indices in
            groups.items() for new, old in enumerate(sorted(indices))}
  return {rename.get(k, k): _renumber_pre_linen(v) for k, v in tree.items()}


def _fix_subtrees(tree: dict) -> None:
  """Applies the ViT and text-tower fixes of `fix_old_layout` in place."""
  encoder = tree.get("Transformer")
  if isinstance(encoder, dict):
    posemb = encoder.pop("posembed_input", {}).get("pos_embedding")
    if posemb is None:
      posemb = encoder.pop("pos_embedding", None)
    if posemb is not None:
      tree["pos_embedding"] = posemb
    posemb = tree.get("pos_embedding")
    if posemb is not None and posemb.ndim == 3:
      grid = int(np.sqrt(posemb.shape[1] - 1))
      if grid * grid + 1 == posemb.shape[1]:
        cls_posemb, tree["pos_embedding"] = posemb[:, :1], posemb[:, 1:]
        if "cls" in tree:
          tree["cls"] = tree["cls"] + cls_posemb
  text_encoder = tree.get("Encoder_0")
  if isinstance(text_encoder, dict) and "pos_embedding" in text_encoder and (
      "pos_embedding" in tree):
    tree["pos_embedding"] = tree["pos_embedding"] + text_encoder.pop(
        "pos_embedding")
  for value in tree.values():
    if isinstance(value, dict):
      _fix_subtrees(value)


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
      (1, h*w, D) that are resized (`resample_grid`) when the grid differs (e.g.
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
  """Resizes a (1, h*h, D) position embedding to (1, g*g, D) as big_vision.

  Linear interpolation of each channel over the square grid,
  `scipy.ndimage.zoom(order=1)` (corners stay where they are). Cost: host-side,
  O(g*g*D).
  """
  old, new = int(np.sqrt(posemb.shape[1])), int(np.sqrt(shape[1]))
  if old * old != posemb.shape[1] or new * new != shape[1] or (
      posemb.shape[2] != shape[2]):
    raise ValueError(f"Cannot resample posemb {posemb.shape} to {shape}.")
  grid = np.asarray(posemb, np.float32).reshape(old, old, -1)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return grid.reshape(shape)


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
