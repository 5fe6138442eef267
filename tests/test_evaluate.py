"""Metrics against plain numpy references (loops / full matrices), ties included."""
import itertools

import numpy as np
import pytest

from mmal_jax import evaluate
from mmal_jax.evaluators import common


def unit_rows(rng, n, d=16):
  z = rng.normal(size=(n, d))
  return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def tied_rows(rng, n):
  """Unit rows drawn from 6 vectors with entries +-0.5: many exact ties, exact dot products."""
  base = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [-1, 1, 1, -1],
                   [1, 1, 1, -1], [-1, -1, 1, 1]], np.float32) / 2
  return base[rng.integers(0, len(base), n)]


# ---------------------------------------------------------------- references

def retrieval_reference(zimg, ztxt, text_to_image, ks):
  """Sort candidates by similarity, ties putting correct candidates last."""
  s = zimg.astype(np.float64) @ ztxt.astype(np.float64).T
  out = {}
  hits = {k: [] for k in ks}
  for i in range(len(zimg)):
    positive = text_to_image == i
    if not positive.any():
      continue
    order = sorted(range(len(ztxt)), key=lambda t: (-s[i, t], positive[t]))
    for k in ks:
      hits[k].append(positive[order[:k]].any())
  out.update({f"i2t_r@{k}": 100 * np.mean(h) for k, h in hits.items()})
  hits = {k: [] for k in ks}
  for t in range(len(ztxt)):
    if text_to_image[t] < 0:
      continue
    order = sorted(range(len(zimg)), key=lambda i: (-s[i, t], i == text_to_image[t]))
    for k in ks:
      hits[k].append(text_to_image[t] in order[:k])
  out.update({f"t2i_r@{k}": 100 * np.mean(h) for k, h in hits.items()})
  return out


def pseudo_label_reference(zimg, ztxt, pairs):
  s = zimg.astype(np.float64) @ ztxt.astype(np.float64).T
  truth = {tuple(p) for p in pairs.tolist()}
  i2t = [(i, int(np.argmax(s[i]))) in truth for i in sorted({p[0] for p in truth})]
  t2i = [(int(np.argmax(s[:, t])), t) in truth for t in sorted({p[1] for p in truth})]
  return {"i2t": 100 * np.mean(i2t), "t2i": 100 * np.mean(t2i),
          "mean": 50 * (np.mean(i2t) + np.mean(t2i))}


def colorswap_reference(zimg, ztxt, image_index, text_index):
  text, image = [], []
  for g in range(len(image_index)):
    i0, i1 = zimg[image_index[g]].astype(np.float64)
    c0, c1 = ztxt[text_index[g]].astype(np.float64)
    text.append(i0 @ c0 > i0 @ c1 and i1 @ c1 > i1 @ c0)
    image.append(c0 @ i0 > c0 @ i1 and c1 @ i1 > c1 @ i0)
  text, image = np.array(text), np.array(image)
  return {"text": 100 * text.mean(), "image": 100 * image.mean(),
          "group": 100 * (text & image).mean()}


def groupmatch_reference(zimg, ztxt, image_index, text_index):
  hits = []
  for g in range(len(image_index)):
    s = zimg[image_index[g]].astype(np.float64) @ ztxt[text_index[g]].astype(np.float64).T
    k = len(s)
    totals = {p: sum(s[j, p[j]] for j in range(k)) for p in itertools.permutations(range(k))}
    identity = tuple(range(k))
    hits.append(all(totals[identity] > v for p, v in totals.items() if p != identity))
  return 100 * np.mean(hits)


def gap_reference(zimg, ztxt):
  zimg, ztxt = zimg.astype(np.float64), ztxt.astype(np.float64)
  off_diagonal = lambda s: (s.sum() - np.trace(s)) / (len(s) * (len(s) - 1))
  return {"gap": np.linalg.norm(zimg.mean(0) - ztxt.mean(0)),
          "intra_image_cos": off_diagonal(zimg @ zimg.T),
          "intra_text_cos": off_diagonal(ztxt @ ztxt.T),
          "cross_cos": (zimg @ ztxt.T).mean()}


def assert_dicts_close(got, want, atol=1e-6):
  assert set(got) == set(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=atol), key


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("seed, tied", [(0, False), (1, False), (2, True), (3, True)])
def test_retrieval_recall_vs_reference(seed, tied, monkeypatch):
  rng = np.random.default_rng(seed)
  n_img, n_txt = 23, 61
  text_to_image = rng.integers(0, n_img, n_txt)
  text_to_image[:4] = -1                       # captions without an image
  text_to_image[text_to_image == 5] = 6        # image 5 has no caption
  zimg, ztxt = ((tied_rows(rng, n_img), tied_rows(rng, n_txt)) if tied else
                (unit_rows(rng, n_img), unit_rows(rng, n_txt)))
  want = retrieval_reference(zimg, ztxt, text_to_image, (1, 5, 10))
  assert_dicts_close(evaluate.retrieval_recall(zimg, ztxt, text_to_image), want)
  monkeypatch.setattr(common, "BLOCK_ELEMENTS", 7 * 61)   # several blocks, padded tail
  assert_dicts_close(evaluate.retrieval_recall(zimg, ztxt, text_to_image), want)


def test_retrieval_perfect_and_tie_counts_against():
  z = np.eye(4, dtype=np.float32)
  got = evaluate.retrieval_recall(z, z, np.arange(4), ks=(1,))
  assert got == {"i2t_r@1": 100.0, "t2i_r@1": 100.0}
  # Two identical captions of different images: each ties with the wrong one.
  got = evaluate.retrieval_recall(z[:2], z[[0, 0]], np.array([0, 1]), ks=(1, 2))
  assert got == {"i2t_r@1": 0.0, "i2t_r@2": 100.0, "t2i_r@1": 50.0, "t2i_r@2": 100.0}


@pytest.mark.parametrize("seed, tied", [(0, False), (1, True)])
def test_pseudo_label_accuracy_vs_reference(seed, tied, monkeypatch):
  rng = np.random.default_rng(seed)
  n_img, n_txt = 19, 40
  pairs = np.unique(np.stack([rng.integers(0, n_img, 30), rng.permutation(n_txt)[:30]], 1),
                    axis=0)
  zimg, ztxt = ((tied_rows(rng, n_img), tied_rows(rng, n_txt)) if tied else
                (unit_rows(rng, n_img), unit_rows(rng, n_txt)))
  want = pseudo_label_reference(zimg, ztxt, pairs)
  assert_dicts_close(evaluate.pseudo_label_accuracy(zimg, ztxt, pairs), want)
  monkeypatch.setattr(common, "BLOCK_ELEMENTS", 50)
  assert_dicts_close(evaluate.pseudo_label_accuracy(zimg, ztxt, pairs), want)


def test_pseudo_label_accuracy_on_aligned_embeddings():
  rng = np.random.default_rng(0)
  z = unit_rows(rng, 12)
  got = evaluate.pseudo_label_accuracy(z, z, np.stack([np.arange(12)] * 2, 1))
  assert got == {"i2t": 100.0, "t2i": 100.0, "mean": 100.0}


def margin_reference(zimg, ztxt, pairs):
  s = zimg.astype(np.float64) @ ztxt.astype(np.float64).T
  truth = {tuple(p) for p in pairs.tolist()}
  correct, incorrect = [], []
  for sims, items, as_pair in (
      (s, sorted({p[0] for p in truth}), lambda i, j: (i, j)),
      (s.T, sorted({p[1] for p in truth}), lambda t, i: (i, t))):
    for i in items:
      top = np.sort(sims[i])
      hit = as_pair(i, int(np.argmax(sims[i]))) in truth
      (correct if hit else incorrect).append(top[-1] - top[-2])
  return {"correct": np.mean(correct), "incorrect": np.mean(incorrect)}


def test_margin_by_correctness_vs_reference():
  rng = np.random.default_rng(3)
  zimg, ztxt = unit_rows(rng, 30), unit_rows(rng, 30)
  ztxt[:15] = zimg[:15] + 0.05 * unit_rows(rng, 15)  # Half clearly matched.
  ztxt = ztxt / np.linalg.norm(ztxt, axis=1, keepdims=True)
  pairs = np.stack([np.arange(30)] * 2, 1)
  got = evaluate.margin_by_correctness(zimg, ztxt, pairs)
  assert_dicts_close(got, margin_reference(zimg, ztxt, pairs), atol=1e-5)
  assert got["correct"] > got["incorrect"]


def test_pool_metrics_on_a_shapes_pool():
  from mmal_jax.data import shapes  # pylint: disable=g-import-not-at-top
  pool = shapes.make_colorswap(6, 16, seed=0)
  rng = np.random.default_rng(0)
  zimg, ztxt = unit_rows(rng, 12), unit_rows(rng, 12)
  got = evaluate.pool_metrics(zimg, ztxt, pool)
  want = {f"colorswap/{k}": v for k, v in evaluate.colorswap_scores(
      zimg, ztxt).items()}
  want["groupmatch"] = evaluate.groupmatch_score(zimg, ztxt)
  for key, value in want.items():
    assert got[key] == value, key
  assert {"retrieval/i2t_r@1", "pseudo_label/mean", "margin/correct",
          "modality_gap/gap"} <= set(got)


@pytest.mark.parametrize("seed, tied", [(0, False), (1, True)])
def test_colorswap_scores_vs_reference(seed, tied):
  rng = np.random.default_rng(seed)
  g = 40
  zimg, ztxt = ((tied_rows(rng, 2 * g), tied_rows(rng, 2 * g)) if tied else
                (unit_rows(rng, 2 * g, 4), unit_rows(rng, 2 * g, 4)))
  consecutive = np.arange(2 * g).reshape(g, 2)
  want = colorswap_reference(zimg, ztxt, consecutive, consecutive)
  assert_dicts_close(evaluate.colorswap_scores(zimg, ztxt), want)
  image_index = rng.permutation(2 * g).reshape(g, 2)
  text_index = rng.permutation(2 * g).reshape(g, 2)
  assert_dicts_close(evaluate.colorswap_scores(zimg, ztxt, image_index, text_index),
                     colorswap_reference(zimg, ztxt, image_index, text_index))


def test_colorswap_scores_hand_made():
  # Group 0 perfect; in group 1 image 1 is equally close to both captions: the tie
  # fails the text score, while each caption still prefers its own image.
  e = np.eye(3, dtype=np.float32)
  c = np.array([1, 1, 0], np.float32) / np.sqrt(2)
  zimg = np.stack([e[0], e[1], e[0], c])
  ztxt = np.stack([e[0], e[1], e[0], e[1]])
  got = evaluate.colorswap_scores(zimg, ztxt)
  assert got == {"text": 50.0, "image": 100.0, "group": 50.0}


@pytest.mark.parametrize("k, tied", [(2, False), (2, True), (3, False), (3, True)])
def test_groupmatch_vs_reference(k, tied):
  rng = np.random.default_rng(k + 10 * tied)
  g = 30
  zimg, ztxt = ((tied_rows(rng, k * g), tied_rows(rng, k * g)) if tied else
                (unit_rows(rng, k * g, 4), unit_rows(rng, k * g, 4)))
  image_index = rng.permutation(k * g).reshape(g, k)
  text_index = rng.permutation(k * g).reshape(g, k)
  got = evaluate.groupmatch_score(zimg, ztxt, image_index, text_index)
  assert got == pytest.approx(groupmatch_reference(zimg, ztxt, image_index, text_index))
  if k == 2:
    s = np.einsum("gid,gjd->gij", zimg[image_index].astype(np.float64),
                  ztxt[text_index].astype(np.float64))
    closed_form = s[:, 0, 0] + s[:, 1, 1] > s[:, 0, 1] + s[:, 1, 0]
    assert got == pytest.approx(100 * closed_form.mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_modality_gap_vs_reference(seed):
  rng = np.random.default_rng(seed)
  zimg = unit_rows(rng, 37)
  ztxt = unit_rows(rng, 53) + 0.5             # a shifted cone, then renormalised
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  assert_dicts_close(evaluate.modality_gap(zimg, ztxt), gap_reference(zimg, ztxt), atol=1e-5)


def test_modality_gap_identical_modalities():
  rng = np.random.default_rng(0)
  z = unit_rows(rng, 20)
  got = evaluate.modality_gap(z, z)
  assert got["gap"] == pytest.approx(0, abs=1e-6)
  assert got["intra_image_cos"] == pytest.approx(got["intra_text_cos"])


@pytest.mark.parametrize("call, match", [
    (lambda z: evaluate.modality_gap(2 * z, z), "L2-normalised"),
    (lambda z: evaluate.modality_gap(np.where(z > 0.5, np.nan, z), z), "zimg holds NaN"),
    (lambda z: evaluate.modality_gap(z, z[:, :3] / np.linalg.norm(z[:, :3], axis=1,
                                                                  keepdims=True)),
     "dimensions differ"),
    (lambda z: evaluate.modality_gap(z[:1], z), "at least 2 image rows"),
    (lambda z: evaluate.modality_gap(z[0], z), r"\(N, D\) array"),
    (lambda z: evaluate.modality_gap(z.astype(np.int32), z), "floating point"),
    (lambda z: evaluate.retrieval_recall(z, z, np.arange(5)), r"text_to_image has shape \(5,\)"),
    (lambda z: evaluate.retrieval_recall(z, z, np.arange(6) + 1), "outside"),
    (lambda z: evaluate.retrieval_recall(z, z, -np.ones(6, int)), "No caption has an image"),
    (lambda z: evaluate.retrieval_recall(z, z, np.arange(6), ks=(0,)), "ks"),
    (lambda z: evaluate.pseudo_label_accuracy(z, z, np.array([[0, 6]])), r"pairs\[:, 1\]"),
    (lambda z: evaluate.pseudo_label_accuracy(z, z, np.array([0, 1])), r"\(P, 2\)"),
    (lambda z: evaluate.colorswap_scores(z, z[:4]), "same even number"),
    (lambda z: evaluate.colorswap_scores(z, z, np.arange(6).reshape(2, 3),
                                         np.arange(6).reshape(2, 3)), "2 images and 2 captions"),
    (lambda z: evaluate.groupmatch_score(z, z, np.arange(6).reshape(2, 3),
                                         np.arange(4).reshape(2, 2)), "of one shape"),
    (lambda z: evaluate.groupmatch_score(z, z, np.arange(6).reshape(6, 1),
                                         np.arange(6).reshape(6, 1)), "groups of 2..8"),
])
def test_metric_errors(call, match):
  z = unit_rows(np.random.default_rng(0), 6, 4)
  with pytest.raises(ValueError, match=match):
    call(z)


def test_colorswap_chance_levels_of_random_embeddings():
  # The chance lines drawn on ColorSwap panels (report.figure).
  from mmal_jax.evaluators import colorswap
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(
      np.float32)
  scores = evaluate.colorswap_scores(unit(rng.normal(size=(40000, 8))),
                                     unit(rng.normal(size=(40000, 8))))
  for k, chance in colorswap.CHANCE.items():  # 4 standard errors.
    assert abs(scores[k] - chance) < 4 * np.sqrt(chance * (100 - chance)
                                                 / 20000), (k, scores[k])
