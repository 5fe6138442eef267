"""Text tokenizers producing the fixed-length int32 tokens the text tower eats.

`get_tokenizer("bytes")`: dependency-free UTF-8 byte tokenizer (the offline
default; ids as ByT5: 0 pad, 1 EOS, byte v -> v + 3; 2 serves as BOS).
`get_tokenizer("sp:/path/model.model")`: a SentencePiece model, local or
`gs://` (read through `mmal_jax.fs`). The vocabularies of released checkpoints
are named below (`C4_EN`: big_vision's SigLIP "c4_en"; `LIT_L16S`: the LiT-L16S
release); `VOCAB_SIZES` gives their sizes, which a text tower must match.

Padding and truncation follow big_vision's `tokenize(eos="sticky")`: with
`add_eos` the EOS survives truncation (a too-long text keeps its first
`length - 1` tokens then EOS), so the text is always terminated. The SigLIP
and LiT releases pad with the EOS id (`pad_id=tok.eos_id`: big_vision's
`pad_value=1`, vision_transformer's LiT tokenizer) so that
`pool_type="last"` reads an EOS; the default pads with `tok.pad_id`. Neither
lower-cases texts (SigLIP 2 checkpoints would want both lower-casing and
`pad_id` padding).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mmal_jax import fs

# SentencePiece vocabularies of released checkpoints.
C4_EN = "sp:gs://t5-data/vocabs/cc_en.32000/sentencepiece.model"
LIT_L16S = "sp:gs://vit_models/lit/LiT-L16S.model"
# Ids each tokenizer produces: the text tower's `vocab_size`.
VOCAB_SIZES = {"bytes": 259, C4_EN: 32_000, LIT_L16S: 16_000}


def vocab_size(spec: str) -> int:
  """The vocabulary size of tokenizer `spec` if known without reading it.

  Raises ValueError for other SentencePiece models: pass the size explicitly
  (their piece count, `get_tokenizer(spec).vocab_size`).
  """
  if spec not in VOCAB_SIZES:
    raise ValueError(f"The vocabulary size of tokenizer {spec!r} is not known "
                     f"here ({sorted(VOCAB_SIZES)}); pass vocab_size= (its "
                     f"piece count).")
  return VOCAB_SIZES[spec]


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


def get_tokenizer(spec: str, *, vocab_size: Optional[int] = None
                  ) -> Tokenizer:
  """"bytes" or "sp:<local or gs:// path>" -> a `Tokenizer`.

  With `vocab_size` (the text tower's embedding rows), raises ValueError if
  the tokenizer produces ids outside it (the model would read garbage rows).
  Cost: one read of the SentencePiece model.
  """
  if spec == "bytes":
    tokenizer = ByteTokenizer()
  elif spec.startswith("sp:"):
    tokenizer = SentencePieceTokenizer(fs.read_bytes(spec[len("sp:"):]))
  else:
    raise ValueError(f"Unknown tokenizer {spec!r}: 'bytes' or 'sp:/path'.")
  if vocab_size is not None and tokenizer.vocab_size > vocab_size:
    raise ValueError(f"Tokenizer {spec!r} has {tokenizer.vocab_size} ids but "
                     f"the text tower embeds {vocab_size}: set the model's "
                     f"text vocab_size to match the tokenizer.")
  return tokenizer
