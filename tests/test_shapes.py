"""The generated ColorSwap-like `shapes` dataset."""
import hashlib
import re
import time

import numpy as np
import pytest

from mmal_jax.data import pool as pool_lib, shapes

CAPTION = re.compile(r"a (\w+) (\w+) (above|below|to the left of|to the right of) a (\w+) (\w+)")


def colour_centroid(image, colour):
  """(y, x) centroid of pixels within 13 of `colour` on every channel, None if none."""
  close = (np.abs(image.astype(np.int32) - np.array(colour)) <= 13).all(axis=-1)
  if close.sum() < 4:
    return None
  ys, xs = np.nonzero(close)
  return ys.mean(), xs.mean()


def test_colorswap_structure_and_captions():
  p = shapes.make_colorswap(40, 32, seed=0)
  assert p.items["image"].shape == (80, 32, 32, 3) and p.items["image"].dtype == np.uint8
  assert len(p.items["text"]) == 80
  np.testing.assert_array_equal(p.pairs(), np.stack([np.arange(80)] * 2, 1))
  np.testing.assert_array_equal(p.groups["image"], np.arange(80) // 2)
  img, txt = pool_lib.group_layout(p)
  np.testing.assert_array_equal(img, np.arange(80).reshape(40, 2))
  np.testing.assert_array_equal(txt, img)
  for g in range(40):
    first = CAPTION.fullmatch(p.items["text"][2 * g]).groups()
    second = CAPTION.fullmatch(p.items["text"][2 * g + 1]).groups()
    # Same shapes and relation, the two colour words swapped.
    assert first[0] != first[3]
    assert (second[0], second[3]) == (first[3], first[0])
    assert (second[1], second[2], second[4]) == (first[1], first[2], first[4])
    assert first[0] in shapes.COLOURS and first[1] in shapes.SHAPES
  # Distinct (shape, shape, colour pair, relation) per group while combos last.
  keys = {(c[1], c[4], frozenset((c[0], c[3])), c[2])
          for c in (CAPTION.fullmatch(t).groups() for t in p.items["text"][::2])}
  assert len(keys) == 40


def test_colorswap_is_deterministic_by_seed():
  a = shapes.make_colorswap(10, 24, seed=3)
  b = shapes.make_colorswap(10, 24, seed=3)
  c = shapes.make_colorswap(10, 24, seed=4)
  np.testing.assert_array_equal(a.items["image"], b.items["image"])
  assert a.items["text"] == b.items["text"]
  assert a.items["text"] != c.items["text"]
  assert not np.array_equal(a.items["image"], c.items["image"])


def test_images_show_their_captions():
  """Noise-free renders: each caption's colours are present, in the stated relation."""
  p = shapes.make_colorswap(30, 48, seed=1, noise_std=0.0)
  for i, caption in enumerate(p.items["text"]):
    colour_a, _, relation, colour_b, _ = CAPTION.fullmatch(caption).groups()
    ya, xa = colour_centroid(p.items["image"][i], shapes.COLOURS[colour_a])
    yb, xb = colour_centroid(p.items["image"][i], shapes.COLOURS[colour_b])
    expected = {"above": ya < yb, "below": ya > yb,
                "to the left of": xa < xb, "to the right of": xa > xb}[relation]
    assert expected, (i, caption)
    others = [c for name, c in shapes.COLOURS.items() if name not in (colour_a, colour_b)]
    assert all(colour_centroid(p.items["image"][i], c) is None for c in others), caption


def test_images_differ_within_group_and_have_noise():
  p = shapes.make_colorswap(5, 32, seed=0, noise_std=6.0)
  x = p.items["image"].astype(np.float32)
  assert not np.array_equal(x[0], x[1])
  background = x[:, :3, :3].reshape(len(x), -1, 3)      # corners are background
  assert background.std(axis=1).mean() > 2.0


def test_single_objects_are_disjoint_from_groups():
  groups = shapes.make_colorswap(200, 32, seed=0)
  single = shapes.make_single_objects(300, 32, seed=0)
  assert single.items["image"].shape == (300, 32, 32, 3)
  np.testing.assert_array_equal(single.pairs(), np.stack([np.arange(300)] * 2, 1))
  names = "|".join(shapes.COLOURS), "|".join(shapes.SHAPES)
  pattern = re.compile(rf"a ({names[0]}) ({names[1]})")
  assert all(pattern.fullmatch(t) for t in single.items["text"])
  assert not set(single.items["text"]) & set(groups.items["text"])
  digest = lambda x: hashlib.sha1(x.tobytes()).hexdigest()
  assert not {digest(x) for x in single.items["image"]} & {digest(x) for x in groups.items["image"]}
  again = shapes.make_single_objects(300, 32, seed=0)
  np.testing.assert_array_equal(again.items["image"], single.items["image"])


def test_single_object_images_show_their_caption():
  p = shapes.make_single_objects(40, 40, seed=2, noise_std=0.0)
  for image, caption in zip(p.items["image"], p.items["text"]):
    colour = caption.split()[1]
    assert colour_centroid(image, shapes.COLOURS[colour]) is not None


def test_render_speed():
  start = time.perf_counter()
  p = shapes.make_colorswap(1000, 64, seed=0)
  elapsed = time.perf_counter() - start
  assert p.num_items("image") == 2000
  assert elapsed < 5.0, f"1000 groups at 64 px took {elapsed:.2f} s"


def test_many_groups_repeat_combinations():
  p = shapes.make_colorswap(4100, 16, seed=0, noise_std=0.0)
  assert len(set(p.items["text"])) == 2 * 4032


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_groups=0, image_size=32), "num_groups must be an int >= 1"),
    (dict(num_groups=2, image_size=8), "image_size must be an int >= 16"),
    (dict(num_groups=2, image_size=32, noise_std=-1.0), "noise_std"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapes.make_colorswap(**kwargs)
