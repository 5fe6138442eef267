"""`shapes`: a generated ColorSwap-like dataset (no files, deterministic by seed).

A group is 2 images and 2 captions that differ only by swapping two colour
words: "a red circle above a blue square" / "a blue circle above a red square".
Image k shows caption k. Scenes vary in shapes, colours, relations, positions,
sizes, colour jitter, background and pixel noise; the two images of a group are
drawn independently (same objects and relation, swapped colours).

`make_single_objects` renders a disjoint pre-training set: one object per image
captioned "a red circle", never a two-object relational scene.
"""
from __future__ import annotations

import itertools

import numpy as np

from mmal_jax.data.pool import UnalignedPool, check_int

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "cyan": (40, 200, 220), "blue": (40, 80, 220),
    "purple": (140, 60, 190), "pink": (245, 130, 190),
}
RELATIONS = ("above", "below", "to the left of", "to the right of")

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), np.float32)
_RADIUS = (0.12, 0.22)  # object radius range, as a fraction of the image side
_COLOUR_JITTER = 12.0   # uniform per channel, in [0, 255] units
_CHUNK = 256            # images rendered at once (bounds temporary memory)


def _shape_mask(shape: int, dy: np.ndarray, dx: np.ndarray, r: np.ndarray) -> np.ndarray:
  """Bool mask of one shape kind from pixel offsets to the centre (broadcast)."""
  name = SHAPES[shape]
  if name == "circle":
    return dy * dy + dx * dx <= r * r
  if name == "square":
    return np.maximum(np.abs(dy), np.abs(dx)) <= 0.8 * r
  if name == "triangle":  # apex up
    return (np.abs(dy) <= r) & (np.abs(dx) <= 0.5 * (dy + r))
  if name == "diamond":
    return np.abs(dy) + np.abs(dx) <= r
  if name == "cross":
    ady, adx = np.abs(dy), np.abs(dx)
    return ((ady <= r / 3) & (adx <= r)) | ((adx <= r / 3) & (ady <= r))
  d2 = dy * dy + dx * dx  # ring
  return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)


def _render(shapes: np.ndarray, colours: np.ndarray, centres: np.ndarray, radii: np.ndarray,
            background: np.ndarray, image_size: int, noise_std: float,
            rng: np.random.Generator) -> np.ndarray:
  """Draws K objects per image: `(N, K)` shapes, `(N, K, 3)` colours, `(N, K, 2)` (y, x)
  centres and `(N, K)` radii in pixels over `(N, 3)` backgrounds, then adds
  Gaussian noise. Returns uint8 `(N, S, S, 3)`. Cost: O(N * K * S^2)."""
  n, num_objects = shapes.shape
  out = np.empty((n, image_size, image_size, 3), np.uint8)
  grid = np.arange(image_size, dtype=np.float32) + 0.5
  for lo in range(0, n, _CHUNK):
    hi = min(lo + _CHUNK, n)
    canvas = np.broadcast_to(background[lo:hi, None, None, :],
                             (hi - lo, image_size, image_size, 3)).astype(np.float32)
    for k in range(num_objects):
      dy = grid[None, :, None] - centres[lo:hi, k, 0, None, None]
      dx = grid[None, None, :] - centres[lo:hi, k, 1, None, None]
      r = radii[lo:hi, k, None, None]
      mask = np.zeros((hi - lo, image_size, image_size), bool)
      for s in np.unique(shapes[lo:hi, k]):
        sel = shapes[lo:hi, k] == s
        mask[sel] = _shape_mask(int(s), dy[sel], dx[sel], r[sel])
      canvas = np.where(mask[..., None], colours[lo:hi, k, None, None, :], canvas)
    if noise_std > 0:
      canvas += noise_std * rng.standard_normal(canvas.shape, dtype=np.float32)
    out[lo:hi] = np.clip(np.rint(canvas), 0, 255)
  return out


def _check_args(num: int, what: str, image_size: int, noise_std: float) -> None:
  check_int(what, num, 1)
  check_int("image_size", image_size, 16)
  if not noise_std >= 0:
    raise ValueError(f"noise_std must be >= 0, got {noise_std!r}.")


def _backgrounds(rng: np.random.Generator, n: int) -> np.ndarray:
  """`(n, 3)` float32 greys in [60, 160] with a slight tint (no palette colour is near)."""
  grey = rng.uniform(70, 150, (n, 1))
  return (grey + rng.uniform(-10, 10, (n, 3))).astype(np.float32)


def _jittered(rng: np.random.Generator, colour_ids: np.ndarray) -> np.ndarray:
  jitter = rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, colour_ids.shape + (3,))
  return (_PALETTE[colour_ids] + jitter).astype(np.float32)


def make_colorswap(num_groups: int, image_size: int = 32, seed: int = 0, *,
                   noise_std: float = 6.0) -> UnalignedPool:
  """Renders `num_groups` ColorSwap-like groups as an `UnalignedPool`.

  Items: `"image"` uint8 `(2G, S, S, 3)`, `"text"` a tuple of 2G captions.
  Group g holds images and captions 2g and 2g+1; caption k of a group matches
  image k of it (one-to-one: image i <-> text i); `groups` gives g per item.
  A group is a distinct (shape A, shape B, colour pair, relation) combination
  while `num_groups` <= 4032 (6 shapes^2 * 28 colour pairs * 4 relations);
  beyond that combinations repeat with new renderings. Deterministic by `seed`.
  Cost: O(G * S^2); ~1000 groups at 64 px render in well under a second.
  """
  _check_args(num_groups, "num_groups", image_size, noise_std)
  rng = np.random.default_rng([seed, 0])
  colour_pairs = list(itertools.combinations(range(len(COLOURS)), 2))
  combos = np.array(list(itertools.product(range(len(SHAPES)), range(len(SHAPES)),
                                           range(len(colour_pairs)), range(len(RELATIONS)))))
  reps = -(-num_groups // len(combos))
  pick = np.concatenate([rng.permutation(len(combos)) for _ in range(reps)])[:num_groups]
  shape_a, shape_b, pair, relation = combos[pick].T
  flip = rng.integers(0, 2, num_groups)
  colour_ab = np.array(colour_pairs)[pair]                                # (G, 2)
  colour_ab = np.where(flip[:, None] == 1, colour_ab[:, ::-1], colour_ab)
  # Image 2g + k: object A in colour_ab[g, k], object B in colour_ab[g, 1 - k].
  colour_ids = np.stack([colour_ab, colour_ab[:, ::-1]], axis=1).reshape(-1, 2)
  shapes = np.repeat(np.stack([shape_a, shape_b], axis=1), 2, axis=0)    # (2G, 2)
  relation = np.repeat(relation, 2)
  n = 2 * num_groups

  radii = rng.uniform(*_RADIUS, (n, 2)) * image_size
  half = image_size / 2
  # Along the relation's axis, A takes one half of the image and B the other.
  a_first = np.isin(relation, (0, 2))           # "above" / "to the left of"
  lo = np.stack([np.where(a_first, 0.0, half), np.where(a_first, half, 0.0)], axis=1)
  along = lo + radii + rng.uniform(0, 1, (n, 2)) * (half - 2 * radii)
  across = radii + rng.uniform(0, 1, (n, 2)) * (image_size - 2 * radii)
  vertical = (relation < 2)[:, None]
  centres = np.stack([np.where(vertical, along, across),
                      np.where(vertical, across, along)], axis=-1)      # (2G, 2, (y, x))
  images = _render(shapes, _jittered(rng, colour_ids), centres, radii,
                   _backgrounds(rng, n), image_size, noise_std, rng)

  captions = tuple(f"a {_COLOUR_NAMES[ca]} {SHAPES[sa]} {RELATIONS[r]} "
                   f"a {_COLOUR_NAMES[cb]} {SHAPES[sb]}"
                   for (ca, cb), (sa, sb), r in zip(colour_ids, shapes, relation))
  index = np.arange(n)
  return UnalignedPool(items={"image": images, "text": captions},
                       links={("image", "text"): np.stack([index, index], axis=1)},
                       groups={"image": index // 2, "text": index // 2})


def make_single_objects(num: int, image_size: int = 32, seed: int = 0, *,
                        noise_std: float = 6.0) -> UnalignedPool:
  """Renders `num` one-object images captioned "a <colour> <shape>" (pre-training).

  Disjoint from every `make_colorswap` set: one object per image, captions
  without a relation. Uses a random stream separate from `make_colorswap`'s for
  the same seed. One-to-one matching (image i <-> text i), no groups. Cost:
  O(num * S^2).
  """
  _check_args(num, "num", image_size, noise_std)
  rng = np.random.default_rng([seed, 1])
  shapes = rng.integers(0, len(SHAPES), (num, 1))
  colour_ids = rng.integers(0, len(COLOURS), (num, 1))
  radii = rng.uniform(*_RADIUS, (num, 1)) * image_size
  centres = radii[..., None] + rng.uniform(0, 1, (num, 1, 2)) * (image_size - 2 * radii[..., None])
  images = _render(shapes, _jittered(rng, colour_ids), centres, radii,
                   _backgrounds(rng, num), image_size, noise_std, rng)
  captions = tuple(f"a {_COLOUR_NAMES[c]} {SHAPES[s]}"
                   for c, s in zip(colour_ids[:, 0], shapes[:, 0]))
  index = np.arange(num)
  return UnalignedPool(items={"image": images, "text": captions},
                       links={("image", "text"): np.stack([index, index], axis=1)})


LABELS = ("shape", "colour")


def class_labels(captions, by: str = "shape") -> np.ndarray:
  """Class label of each scene from its caption: the first object's shape
  (6 classes, `SHAPES` order) or colour (8 classes, `COLOURS` order).

  Captions are this module's ("a red circle above a blue square").
  Returns int64 `(len(captions),)`. Cost: O(total caption length).
  """
  if by not in LABELS:
    raise ValueError(f"by must be one of {LABELS}, got {by!r}.")
  names = SHAPES if by == "shape" else _COLOUR_NAMES
  word = 2 if by == "shape" else 1
  labels = []
  for caption in captions:
    words = caption.split()
    if len(words) <= word or words[word] not in names:
      raise ValueError(f"Not a shapes caption: {caption!r}.")
    labels.append(names.index(words[word]))
  return np.asarray(labels, np.int64)


def drop_items(pool: UnalignedPool, modality: str, fraction: float,
               seed: int) -> UnalignedPool:
  """`pool` without a seeded random `fraction` of `modality`'s items (their
  partners become partner-less: the first paper's missing-data setting,
  Fig. 4 right). Cost: O(N + P)."""
  if not 0 <= fraction < 1:
    raise ValueError(f"fraction must be in [0, 1), got {fraction!r}.")
  n = pool.num_items(modality)
  drop = np.random.default_rng([seed, 2]).choice(
      n, int(round(fraction * n)), replace=False)
  keep = np.ones(n, bool)
  keep[drop] = False
  return pool.subset({modality: keep})
