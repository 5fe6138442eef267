"""big_vision-style pp strings: `decode|resize(224)|value_range(-1, 1)`.

A pp string is a `|`-separated list of ops; each op is a name or a call with
literal arguments (`resize(224)`, `tokenize(max_len=16, eos='sticky')`),
looked up in `OPS`. An op maps the feature dict of one example (tf tensors,
inside a `tf.data` map) to a new dict; `get_preprocess_fn(pp)` composes them.
Names, arguments, default keys and semantics follow big_vision's `pp/ops_*`
(written here from their documented behaviour; big_vision is not a
dependency), so a big_vision pp string can be reused:

  decode(channels=3, precise=False)        encoded bytes -> uint8 (H, W, C);
                                           uint8 pixels pass through unchanged
  resize(size, method="bilinear", antialias=False)
                                           tf.image.resize to (size, size),
                                           back to the input dtype (clipped,
                                           truncated)
  resize_small(smaller_size, method="area", antialias=False)
  central_crop(crop_size=None)
  value_range(vmin=-1, vmax=1, in_min=0, in_max=255, clip_values=False)
  vgg_value_range(mean=..., std=...), clip_value_range()
  lower(key="text")
  tokenize(max_len, eos, model="c4_en", lower=True, pad_value="<pad>",
           add_bos=False, inkey="texts", outkey="labels")
  keep(*keys), drop(*keys), copy(inkey, outkey)

Image ops read and write `key="image"` (or `inkey`/`outkey`). `tokenize`
takes this project's tokenizers as `model`: `"bytes"`, `"sp:PATH"`, a
SentencePiece path, or one of big_vision's names (`"c4_en"`, `"mc4"`, ...);
`eos` is `"none"`, `"yes"` or `"sticky"` and `pad_value` an id or one of
`"<pad>"`, `"</s>"`, `"<s>"`, as in big_vision. Every op is deterministic:
random augmentations (`inception_crop`, `flip_lr`, ...) are not provided, so
batches depend on the seed only.
"""
from __future__ import annotations

import ast
import functools
from typing import Callable

import numpy as np
import tensorflow as tf

from mmal_jax import tokenizers

Op = Callable[[dict], dict]
OPS: dict[str, Callable[..., Op]] = {}

# big_vision's named SentencePiece vocabularies (`pp/ops_text.py`).
KNOWN_TOKENIZERS = {
    "mc4": "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model",
    "cc_all": "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model",
    "c4_en": "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model",
    "t5": "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model",
    "mt5": "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model",
}


def register(name: str):
  """Registers `get_op(*args, **kwargs) -> op` under `name`."""
  def wrap(get_op):
    OPS[name] = get_op
    return get_op
  return wrap


def _in_key_out_key(indefault: str, outdefault: str):
  """Lifts `get_fn(...) -> (tensor -> tensor)` to an op on feature dicts.

  The op reads `key or inkey` and writes `key or outkey`, as big_vision's
  `InKeyOutKey`.
  """
  def wrap(get_fn):
    @functools.wraps(get_fn)
    def get_op(*args, key=None, inkey=indefault, outkey=outdefault, **kw):
      fn = get_fn(*args, **kw)

      def op(data):
        data = dict(data)
        source = key or inkey
        if source not in data:
          raise KeyError(f"pp op {get_fn.__name__} reads key {source!r}, but "
                         f"the example has {sorted(data)}.")
        data[key or outkey] = fn(data[source])
        return data
      return op
    return get_op
  return wrap


def _pair(size):
  return (size, size) if isinstance(size, int) else tuple(size)


@register("decode")
@_in_key_out_key("image", "image")
def decode(channels=3, precise=False):
  """Encoded image bytes -> uint8 `(H, W, channels)`; pixels pass through."""
  def fn(image):
    if image.dtype != tf.string:
      return image
    if precise:
      return tf.image.decode_jpeg(image, channels=channels,
                                  dct_method="INTEGER_ACCURATE")
    return tf.io.decode_image(image, channels=channels,
                              expand_animations=False)
  return fn


def _resize_to(image, size, method, antialias):
  dtype = image.dtype
  out = tf.image.resize(image, size, method=method, antialias=antialias)
  if dtype.is_floating:
    return tf.cast(out, dtype)
  return tf.cast(tf.clip_by_value(out, dtype.min, dtype.max), dtype)


@register("resize")
@_in_key_out_key("image", "image")
def resize(size, method="bilinear", antialias=False):
  """Resizes to `size` (int or (H, W)); the dtype is kept (clipped)."""
  size = _pair(size)
  return lambda image: _resize_to(image, size, method, antialias)


@register("resize_small")
@_in_key_out_key("image", "image")
def resize_small(smaller_size, method="area", antialias=False):
  """Resizes so the smaller side is `smaller_size`, keeping the aspect ratio."""
  def fn(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    factor = tf.cast(smaller_size, tf.float32) / tf.cast(tf.minimum(h, w),
                                                         tf.float32)
    size = (tf.cast(tf.round(tf.cast(h, tf.float32) * factor), tf.int32),
            tf.cast(tf.round(tf.cast(w, tf.float32) * factor), tf.int32))
    return _resize_to(image, size, method, antialias)
  return fn


@register("central_crop")
@_in_key_out_key("image", "image")
def central_crop(crop_size=None):
  """Central crop of `crop_size` (int or (H, W)); the largest square if None."""
  def fn(image):
    if crop_size:
      h, w = _pair(crop_size)
    else:
      h = w = tf.minimum(tf.shape(image)[0], tf.shape(image)[1])
    dy = (tf.shape(image)[0] - h) // 2
    dx = (tf.shape(image)[1] - w) // 2
    return tf.image.crop_to_bounding_box(image, dy, dx, h, w)
  return fn


@register("value_range")
@_in_key_out_key("image", "image")
def value_range(vmin=-1, vmax=1, in_min=0, in_max=255.0, clip_values=False):
  """Maps [in_min, in_max] linearly to float32 [vmin, vmax]."""
  def fn(image):
    lo = tf.constant(in_min, tf.float32)
    hi = tf.constant(in_max, tf.float32)
    image = (tf.cast(image, tf.float32) - lo) / (hi - lo)
    image = vmin + image * (vmax - vmin)
    if clip_values:
      image = tf.clip_by_value(image, vmin, vmax)
    return image
  return fn


@register("vgg_value_range")
@_in_key_out_key("image", "image")
def vgg_value_range(mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                    std=(0.229 * 255, 0.224 * 255, 0.225 * 255)):
  """(pixel - mean) / std per channel, float32."""
  mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
  return lambda image: (tf.cast(image, tf.float32) - mean) / std


@register("clip_value_range")
@_in_key_out_key("image", "image")
def clip_value_range():
  """OpenAI CLIP's per-channel normalisation."""
  mean = tf.constant((0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255))
  std = tf.constant((0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255))
  return lambda image: (tf.cast(image, tf.float32) - mean) / std


@register("lower")
@_in_key_out_key("text", "text")
def lower():
  """Lower-cases a string feature (ASCII, as `tf.strings.lower`)."""
  return tf.strings.lower


@functools.lru_cache(maxsize=None)
def get_tokenizer(model: str) -> tokenizers.Tokenizer:
  """This project's tokenizer for a `tokenize(model=...)` value (cached)."""
  if model in KNOWN_TOKENIZERS:
    model = "sp:" + KNOWN_TOKENIZERS[model]
  if model != "bytes" and not model.startswith("sp:"):
    model = "sp:" + model
  return tokenizers.get_tokenizer(model)


def _pad_id(tokenizer: tokenizers.Tokenizer, pad_value) -> int:
  if isinstance(pad_value, int) and not isinstance(pad_value, bool):
    return pad_value
  named = {"<pad>": tokenizer.pad_id, "</s>": tokenizer.eos_id,
           "<s>": tokenizer.bos_id}
  if named.get(pad_value) is None:
    raise ValueError(f"tokenize: pad_value={pad_value!r} must be an int or one "
                     f"of {[k for k, v in named.items() if v is not None]}.")
  return named[pad_value]


def encode(tokenizer: tokenizers.Tokenizer, texts, max_len: int, eos: str,
           pad_id: int, add_bos: bool = False) -> np.ndarray:
  """int32 `(len(texts), max_len)` tokens with big_vision's `eos` semantics.

  "none": no EOS; "yes": EOS appended, lost when the text is truncated;
  "sticky": EOS kept last even when truncating.
  """
  if eos not in ("none", "yes", "sticky"):
    raise ValueError(f"tokenize: eos must be 'none', 'yes' or 'sticky', got "
                     f"{eos!r}.")
  texts = list(texts)
  if eos == "yes":
    return tokenizer.encode(texts, max_len + 1, add_bos=add_bos, add_eos=True,
                            pad_id=pad_id)[:, :max_len]
  return tokenizer.encode(texts, max_len, add_bos=add_bos,
                          add_eos=eos == "sticky", pad_id=pad_id)


@register("tokenize")
@_in_key_out_key("texts", "labels")
def tokenize(max_len, eos, model="c4_en", lower=True, pad_value="<pad>",
             add_bos=False):
  """A string -> int32 `(max_len,)` token ids (see `encode`); a 1-D batch of
  strings -> `(B, max_len)` in one tokenizer call (`data.pipeline`
  tokenises captions ahead of the graph that way)."""
  tokenizer = get_tokenizer(model)
  pad_id = _pad_id(tokenizer, pad_value)
  encode(tokenizer, [""], max_len, eos, pad_id, add_bos)  # Checks arguments.

  def many(texts) -> np.ndarray:
    texts = [t.decode("utf-8") for t in np.asarray(texts).reshape(-1)]
    return encode(tokenizer, texts, max_len, eos, pad_id, add_bos)

  def fn(text):
    if text.shape.rank not in (0, 1):
      raise ValueError("tokenize takes one string per example; pick one "
                       "caption first.")
    if lower:
      text = tf.strings.lower(text)
    tokens = tf.numpy_function(many, [text], tf.int32, stateful=False)
    if text.shape.rank == 0:
      return tf.ensure_shape(tokens[0], (max_len,))
    return tf.ensure_shape(tokens, (None, max_len))
  return fn


@register("keep")
def keep(*keys):
  """Keeps only `keys`."""
  return lambda data: {k: v for k, v in data.items() if k in keys}


@register("drop")
def drop(*keys):
  """Drops `keys`."""
  return lambda data: {k: v for k, v in data.items() if k not in keys}


@register("copy")
def copy(inkey, outkey):
  """Copies feature `inkey` to `outkey`."""
  return lambda data: {**data, outkey: data[inkey]}


def split_ops(pp: str) -> list[str]:
  """The op strings of `pp`, split on `|` outside quotes and brackets."""
  ops, depth, quote, start = [], 0, None, 0
  for i, c in enumerate(pp):
    if quote:
      quote = None if c == quote else quote
    elif c in "'\"":
      quote = c
    elif c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "|" and depth == 0:
      ops.append(pp[start:i])
      start = i + 1
  ops.append(pp[start:])
  return [op.strip() for op in ops if op.strip()]


def parse_op(spec: str) -> tuple[str, tuple, dict]:
  """`"resize(224, method='nearest')"` -> `("resize", (224,), {...})`.

  Arguments must be Python literals. Raises ValueError naming `spec`.
  """
  try:
    expr = ast.parse(spec, mode="eval").body
    if isinstance(expr, ast.Name):
      return expr.id, (), {}
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
      raise ValueError("not a name or a call")
    args = tuple(ast.literal_eval(a) for a in expr.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"Cannot parse pp op {spec!r}: {e}. Ops are names or "
                     "calls with literal arguments, e.g. resize(224)."
                     ) from None
  return expr.func.id, args, kwargs


def get_preprocess_fn(pp: str) -> Op:
  """The composition of `pp`'s ops (an empty string: the identity).

  Raises ValueError naming the op for an unknown name, bad syntax or bad
  arguments, before any data is seen.
  """
  ops = []
  for spec in split_ops(pp):
    name, args, kwargs = parse_op(spec)
    if name not in OPS:
      raise ValueError(f"Unknown pp op {name!r} in {pp!r}; known: "
                       f"{sorted(OPS)}.")
    try:
      ops.append(OPS[name](*args, **kwargs))
    except (TypeError, ValueError) as e:
      raise ValueError(f"pp op {spec!r}: {e}") from e

  def preprocess(data: dict) -> dict:
    for op in ops:
      data = op(data)
    return data
  return preprocess
