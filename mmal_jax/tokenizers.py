"""Text tokenizers producing the fixed-length int32 tokens the text tower eats.

`get_tokenizer("bytes")`: dependency-free UTF-8 byte tokenizer (the offline
default; ids as ByT5: 0 pad, 1 EOS, byte v -> v + 3; 2 serves as BOS).
`get_tokenizer("sp:/path/model.model")`: a SentencePiece model, local or any
`tf.io.gfile` URL (gs://...), e.g. big_vision's SigLIP vocabulary
`sp:gs://t5-data/vocabs/cc_en.32000/sentencepiece.model` (its "c4_en").

Padding and truncation follow big_vision's `tokenize(eos="sticky")`: with
`add_eos` the EOS survives truncation (a too-long text keeps its first
`length - 1` tokens then EOS), so the text is always terminated. SigLIP pads
with the EOS id (`pad_id=tok.eos_id`, big_vision's `pad_value=1`) so that
`pool_type="last"` reads an EOS; the default pads with `tok.pad_id`.
big_vision's SigLIP input pipeline also lower-cases texts first; that is the
caller's choice, not done here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mmal_jax.models import checkpoint


class Tokenizer:
  """Base class: subclasses set the ids and implement `_ids` / `_text`."""
  vocab_size: int
  pad_id: int
  bos_id: Optional[int]
  eos_id: Optional[int]

  def _ids(self, texts: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  def _text(self, ids: list[int]) -> str:
    raise NotImplementedError

  def encode(self, texts: Sequence[str], length: int, *, add_bos: bool = False,
             add_eos: bool = True, pad_id: Optional[int] = None) -> np.ndarray:
    """Tokenizes `texts` into an int32 (len(texts), length) array.

    [BOS] tokens [EOS], truncated to `length` keeping EOS last ("sticky"),
    then padded with `pad_id` (default `self.pad_id`). Cost: host-side, linear
    in the total text length.
    """
    if add_bos and self.bos_id is None:
      raise ValueError("This tokenizer has no BOS token.")
    if add_eos and self.eos_id is None:
      raise ValueError("This tokenizer has no EOS token.")
    if length < 1 + add_bos + add_eos:
      raise ValueError(f"length={length} leaves no room for text.")
    pad_id = self.pad_id if pad_id is None else pad_id
    prefix = [self.bos_id] if add_bos else []
    suffix = [self.eos_id] if add_eos else []
    out = np.full((len(texts), length), pad_id, np.int32)
    for row, ids in enumerate(self._ids(list(texts))):
      ids = prefix + ids[:length - len(prefix) - len(suffix)] + suffix
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids) -> list[str]:
    """Inverse of `encode` for each row of `ids` (B, L): drops BOS, stops at
    EOS, drops padding (`pad_id`, and EOS used as padding)."""
    texts = []
    for row in np.asarray(ids).tolist():
      if self.eos_id is not None and self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      row = [i for i in row if i not in (self.pad_id, self.bos_id)]
      texts.append(self._text(row))
    return texts


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes, 259 ids: 0 pad, 1 EOS, 2 BOS, byte v -> v + 3."""
  OFFSET = 3

  def __init__(self):
    self.vocab_size = 256 + self.OFFSET
    self.pad_id, self.eos_id, self.bos_id = 0, 1, 2

  def _ids(self, texts):
    return [[b + self.OFFSET for b in t.encode("utf-8")] for t in texts]

  def _text(self, ids):
    data = bytes(i - self.OFFSET for i in ids if i >= self.OFFSET)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model; a model without a pad piece pads with id 0."""

  def __init__(self, model_proto: bytes):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = max(self._sp.pad_id(), 0)
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

  def _ids(self, texts):
    return self._sp.encode(texts, out_type=int)

  def _text(self, ids):
    return self._sp.decode(ids)


def get_tokenizer(spec: str) -> Tokenizer:
  """"bytes" or "sp:<path readable by tf.io.gfile>" -> a `Tokenizer`."""
  if spec == "bytes":
    return ByteTokenizer()
  if spec.startswith("sp:"):
    with checkpoint.open_file(spec[len("sp:"):], "rb") as f:
      return SentencePieceTokenizer(f.read())
  raise ValueError(f"Unknown tokenizer {spec!r}: 'bytes' or 'sp:/path'.")
