"""Byte and SentencePiece tokenizers: round trips, sticky EOS, padding."""
import io

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import sentencepiece

from mmal_jax import tokenizers

SENTENCES = [
    "a photo of a cat on a mat", "two dogs playing in the snow",
    "a red car parked near the old bridge", "an apple with a note",
    "a cold drink on a hot day", "the cat sat on the red mat",
] * 20


@pytest.fixture(scope="module")
def sp_model_path(tmp_path_factory):
  """A tiny SentencePiece model trained in memory: pad 0, EOS 1, BOS 2."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=40,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0)
  path = tmp_path_factory.mktemp("sp") / "tiny.model"
  path.write_bytes(model.getvalue())
  return str(path)


@hypothesis.given(st.lists(st.text(max_size=20), min_size=1, max_size=4))
def test_bytes_round_trip(texts):
  tok = tokenizers.get_tokenizer("bytes")
  ids = tok.encode(texts, length=82, add_bos=True)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), 82)
  assert np.all((ids >= 0) & (ids < tok.vocab_size))
  assert tok.decode(ids) == texts


def test_sticky_eos_truncation_and_padding():
  tok = tokenizers.get_tokenizer("bytes")
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (259, 0, 1, 2)
  ids = tok.encode(["ab", "abcdef"], length=4)
  a, b = ord("a") + 3, ord("b") + 3
  np.testing.assert_array_equal(ids, [[a, b, 1, 0], [a, b, ord("c") + 3, 1]])
  # SigLIP pads with EOS so that the last position is always EOS.
  np.testing.assert_array_equal(
      tok.encode(["ab"], length=5, pad_id=tok.eos_id), [[a, b, 1, 1, 1]])
  np.testing.assert_array_equal(
      tok.encode(["abc"], length=3, add_bos=True, add_eos=False), [[2, a, b]])
  assert tok.decode(tok.encode(["abcdef"], length=4)) == ["abc"]
  with pytest.raises(ValueError):
    tok.encode(["x"], length=1, add_bos=True)


def test_sentencepiece_round_trip(sp_model_path):
  tok = tokenizers.get_tokenizer(f"sp:{sp_model_path}")
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.vocab_size == 40
  texts = ["a cat on a mat", "two dogs in the snow", "a red car"]
  ids = tok.encode(texts, length=32, add_bos=True)
  assert ids.shape == (3, 32) and ids.dtype == np.int32
  assert tok.decode(ids) == texts
  rows_ending = [row[row != tok.pad_id][-1] for row in ids]
  assert rows_ending == [tok.eos_id] * 3
  short = tok.encode(["a red car parked near the old bridge"], length=4)
  assert short[0, -1] == tok.eos_id


def test_sentencepiece_without_bos(tmp_path):
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=30,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  path = tmp_path / "nobos.model"
  path.write_bytes(model.getvalue())
  tok = tokenizers.get_tokenizer(f"sp:{path}")
  assert tok.bos_id is None
  with pytest.raises(ValueError):
    tok.encode(["a cat"], length=8, add_bos=True)


def test_unknown_spec():
  with pytest.raises(ValueError):
    tokenizers.get_tokenizer("wordpiece")


def test_sentencepiece_from_gcs(gcs_bucket, sp_model_path):
  from mmal_jax import fs  # pylint: disable=g-import-not-at-top
  path = f"{gcs_bucket}/vocab/tiny.model"
  fs.write_bytes(path, open(sp_model_path, "rb").read())
  tok = tokenizers.get_tokenizer(f"sp:{path}")
  local = tokenizers.get_tokenizer(f"sp:{sp_model_path}")
  np.testing.assert_array_equal(tok.encode(["a red car"], 8),
                                local.encode(["a red car"], 8))


def test_vocab_size_must_cover_the_tokenizer(sp_model_path):
  assert tokenizers.get_tokenizer("bytes", vocab_size=259).vocab_size == 259
  with pytest.raises(ValueError, match="259 ids but the text tower embeds 50"):
    tokenizers.get_tokenizer("bytes", vocab_size=50)
  tokenizers.get_tokenizer(f"sp:{sp_model_path}", vocab_size=40)
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizers.get_tokenizer(f"sp:{sp_model_path}", vocab_size=32)
  assert tokenizers.vocab_size("bytes") == 259
  assert tokenizers.vocab_size(tokenizers.C4_EN) == 32_000
  with pytest.raises(ValueError, match="pass vocab_size"):
    tokenizers.vocab_size(f"sp:{sp_model_path}")
