"""big_vision-style pp strings: parsing, each op's semantics, errors."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmal_jax import tokenizers
from mmal_jax.data import pp


def run(pp_string, **features):
  """Applies `pp_string` inside a tf.data map (graph mode), as the pipeline."""
  ds = tf.data.Dataset.from_tensors(features).map(
      pp.get_preprocess_fn(pp_string))
  return next(iter(ds.as_numpy_iterator()))


def png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def test_split_and_parse():
  assert pp.split_ops("decode|resize(224)| keep('image', 'a|b') |") == [
      "decode", "resize(224)", "keep('image', 'a|b')"]
  assert pp.parse_op("resize(224, method='nearest')") == (
      "resize", (224,), {"method": "nearest"})
  assert pp.parse_op("decode") == ("decode", (), {})


def test_image_ops():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 30, 3), np.uint8)
  out = run("decode|resize(8)|value_range(-1, 1)", image=png(image))
  want = tf.cast(tf.image.resize(image, (8, 8)), tf.uint8).numpy()
  np.testing.assert_allclose(out["image"], want / 127.5 - 1, atol=1e-6)
  assert out["image"].dtype == np.float32
  # decode passes pixels through: one string serves files and arrays.
  same = run("decode|resize(8)|value_range(-1, 1)", image=image)
  np.testing.assert_array_equal(same["image"], out["image"])
  np.testing.assert_allclose(run("value_range(0, 1)", image=image)["image"],
                             image / 255, atol=1e-6)
  small = run("resize_small(10)|central_crop(6)", image=image)["image"]
  assert small.shape == (6, 6, 3) and small.dtype == np.uint8
  assert run("resize((4, 5))", image=image)["image"].shape == (4, 5, 3)
  assert run("central_crop", image=image)["image"].shape == (20, 20, 3)
  copied = run("copy('image', 'raw')|resize(4, key='image')|drop('x')",
               image=image, x=np.int32(1))
  assert copied["raw"].shape == (20, 30, 3) and "x" not in copied
  assert set(run("keep('image')", image=image, x=1)) == {"image"}


@pytest.mark.parametrize("eos, pad_value, want", [
    ("none", 0, [[100, 0, 0], [100, 100, 0], [100, 100, 100]]),
    ("yes", 0, [[100, 1, 0], [100, 100, 1], [100, 100, 100]]),
    ("sticky", 0, [[100, 1, 0], [100, 100, 1], [100, 100, 1]]),
    ("sticky", 1, [[100, 1, 1], [100, 100, 1], [100, 100, 1]]),
    ("sticky", "</s>", [[100, 1, 1], [100, 100, 1], [100, 100, 1]]),
])
def test_tokenize_eos_semantics(eos, pad_value, want):
  """big_vision's documented examples, with the byte tokenizer ('a' = 100)."""
  op = f"tokenize(max_len=3, eos={eos!r}, model='bytes', pad_value={pad_value!r})"
  got = [run(op, texts=t)["labels"].tolist() for t in ("a", "aA", "AAA")]
  assert got == want


def test_tokenize_matches_the_project_tokenizer():
  texts = ["A red circle above a blue square", "é", ""]
  tok = tokenizers.get_tokenizer("bytes")
  got = np.stack([run("tokenize(max_len=8, eos='sticky', model='bytes', "
                      "pad_value='</s>', lower=False, inkey='text', "
                      "outkey='text')", text=t)["text"] for t in texts])
  np.testing.assert_array_equal(got, tok.encode(texts, 8, pad_id=tok.eos_id))


@pytest.mark.parametrize("pp_string, match", [
    ("decode|nope(3)", r"Unknown pp op 'nope'"),
    ("resize(", "Cannot parse pp op"),
    ("resize(size=x)", "Cannot parse pp op"),
    ("resize()", r"pp op 'resize\(\)'"),
    ("tokenize(4, eos='maybe', model='bytes')", "eos must be"),
    ("tokenize(4, eos='yes', model='bytes', pad_value='<unk>')",
     "pad_value='<unk>' must be an int"),
])
def test_errors_before_any_data(pp_string, match):
  with pytest.raises(ValueError, match=match):
    pp.get_preprocess_fn(pp_string)


def test_missing_key_is_named():
  with pytest.raises(KeyError, match="reads key 'image'"):
    run("decode", text="x")
