"""UnalignedPool, its helpers, stream buffers and AnnotationState."""
import itertools
import json

import numpy as np
import pytest

from mmal_jax.data import pool as pool_lib
from mmal_jax.data.annotation import Answer, AnnotationState
from mmal_jax.data.pool import UnalignedPool


def coco_like_pool():
  """4 images, 7 texts: image 0 -> texts 0,1,2; image 1 -> 3,4; image 2 -> none;
  image 3 -> 5; text 6 has no image."""
  pairs = [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (3, 5)]
  return UnalignedPool(items={"image": np.zeros((4, 2, 2, 3), np.uint8),
                              "text": [f"t{i}" for i in range(7)]},
                       links={("image", "text"): pairs})


def grouped_pool(rng, num_groups=6):
  """A one-to-one grouped pool (2 per group) with items stored in shuffled order."""
  n = 2 * num_groups
  img_perm, txt_perm = rng.permutation(n), rng.permutation(n)
  # Logical item j (group j // 2) sits at image img_perm[j] and text txt_perm[j].
  groups_img = np.empty(n, np.int64)
  groups_txt = np.empty(n, np.int64)
  groups_img[img_perm] = np.arange(n) // 2
  groups_txt[txt_perm] = np.arange(n) // 2
  return UnalignedPool(items={"image": np.arange(n, dtype=np.float32)[:, None],
                              "text": np.arange(n, dtype=np.float32)[:, None]},
                       links={("image", "text"): np.stack([img_perm, txt_perm], 1)},
                       groups={"image": groups_img, "text": groups_txt})


def test_partners_one_to_many_and_missing():
  p = coco_like_pool()
  assert p.modalities == ("image", "text")
  assert p.sizes == {"image": 4, "text": 7}
  assert p.partners("image", 0) == (("text", 0), ("text", 1), ("text", 2))
  assert p.partners("text", 4) == (("image", 1),)
  assert p.partners("image", 2) == ()
  assert p.partners("text", 6) == ()
  np.testing.assert_array_equal(p.num_partners("image", "text"), [3, 2, 0, 1])
  np.testing.assert_array_equal(p.partner_array("text", "image"), [0, 0, 0, 1, 1, 3, -1])
  with pytest.raises(ValueError, match="image item 0 has 3 partners"):
    p.partner_array("image", "text")
  np.testing.assert_array_equal(p.pairs("text", "image")[:2], [[0, 0], [1, 0]])


def test_links_are_canonicalised_and_sorted():
  p = UnalignedPool(items={"image": np.zeros((3, 1)), "text": ["a", "b", "c"]},
                    links={("text", "image"): [[2, 0], [0, 1]]})
  assert list(p.links) == [("image", "text")]
  np.testing.assert_array_equal(p.pairs(), [[0, 2], [1, 0]])
  assert p.partners("text", 2) == (("image", 0),)


def test_three_modalities():
  p = UnalignedPool(items={"image": np.zeros((2, 1)), "text": ["a", "b"],
                           "audio": np.zeros((3, 1))},
                    links={("image", "text"): [[0, 1]], ("audio", "image"): [[2, 0]]})
  assert p.partners("image", 0) == (("text", 1), ("audio", 2))
  assert p.pairs("text", "audio").shape == (0, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(items={}), "at least one modality"),
    (dict(items={"image": np.zeros((0, 3))}), "'image' has no items"),
    (dict(items={"image": np.zeros((2, 1)), "text": ["a"]},
          links={("image", "audio"): [[0, 0]]}), "unknown modality 'audio'"),
    (dict(items={"image": np.zeros((2, 1)), "text": ["a"]},
          links={("image", "text"): [[0, 0], [2, 0]]}), "row 1 has image index 2, outside"),
    (dict(items={"image": np.zeros((2, 1)), "text": ["a"]},
          links={("image", "text"): [[1, 0], [1, 0]]}), r"repeats the pair \(1, 0\)"),
    (dict(items={"image": np.zeros((2, 1)), "text": ["a"]},
          links={("image", "text"): [[0.0, 0.0]]}), r"int \(P, 2\) array, got float64"),
    (dict(items={"image": np.zeros((2, 1))}, links={("image", "image"): [[0, 1]]}),
     "itself"),
    (dict(items={"image": np.zeros((2, 1))}, groups={"image": [0]}), r"shape \(2,\)"),
    (dict(items={"image": "abc"}), "numpy array or a sequence"),
])
def test_pool_validation(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    UnalignedPool(**kwargs)


def test_partners_bad_ref():
  p = coco_like_pool()
  with pytest.raises(ValueError, match="text index 7 is outside"):
    p.partners("text", 7)
  with pytest.raises(ValueError, match="unknown modality 'audio'"):
    p.partners("audio", 0)


def test_subset_drops_links_of_removed_items():
  p = coco_like_pool()
  sub = p.subset({"image": [0, 3]})          # images 1, 2 removed
  assert sub.sizes == {"image": 2, "text": 7}
  np.testing.assert_array_equal(sub.pairs(), [[0, 0], [0, 1], [0, 2], [1, 5]])
  assert sub.partners("text", 3) == ()       # its image is gone: missing partner
  sub2 = p.subset({"text": np.arange(7) % 2 == 0})
  assert sub2.items["text"] == ("t0", "t2", "t4", "t6")
  np.testing.assert_array_equal(sub2.pairs(), [[0, 0], [0, 1], [1, 2]])
  with pytest.raises(ValueError, match="mask has shape"):
    p.subset({"text": np.ones(3, bool)})
  with pytest.raises(IndexError, match="outside"):
    p.subset({"text": [9]})


def test_group_layout_pairs_images_with_their_captions():
  p = grouped_pool(np.random.default_rng(0))
  img, txt = pool_lib.group_layout(p)
  assert img.shape == txt.shape == (6, 2)
  truth = {tuple(r) for r in p.pairs()}
  for g in range(6):
    assert (p.groups["image"][img[g]] == g).all() and (p.groups["text"][txt[g]] == g).all()
    for k in range(2):
      assert (img[g, k], txt[g, k]) in truth


def test_group_layout_errors():
  p = coco_like_pool()
  with pytest.raises(ValueError, match="needs group ids"):
    pool_lib.group_layout(p)
  bad = UnalignedPool(items=p.items, links=p.links,
                      groups={"image": [0, 0, 1, 1], "text": [0, 0, 0, 1, 1, 1, 1]})
  with pytest.raises(ValueError, match="same number k"):
    pool_lib.group_layout(bad)


def test_split_groups_is_disjoint_complete_and_seeded():
  p = grouped_pool(np.random.default_rng(1), num_groups=10)
  train, held_out = pool_lib.split_groups(p, 3, seed=5)
  assert held_out.sizes == {"image": 6, "text": 6}
  assert train.sizes == {"image": 14, "text": 14}
  eval_ids = set(held_out.groups["image"])
  assert len(eval_ids) == 3 and not eval_ids & set(train.groups["image"])
  # Every item kept its partner: values stored in items identify the original item.
  for part in (train, held_out):
    original = {tuple(r) for r in p.pairs()}
    for i, t in part.pairs():
      assert (int(part.items["image"][i, 0]), int(part.items["text"][t, 0])) in original
    assert len(part.pairs()) == part.num_items("image")
  again, _ = pool_lib.split_groups(p, 3, seed=5)
  np.testing.assert_array_equal(again.items["image"], train.items["image"])
  with pytest.raises(ValueError, match="num_eval_groups=10"):
    pool_lib.split_groups(p, 10, seed=0)
  with pytest.raises(ValueError, match="group ids for every modality"):
    pool_lib.split_groups(coco_like_pool(), 1, seed=0)


def _components_reference(pool):
  """Union-find over all items; returns a canonical partition (set of frozensets)."""
  nodes = [(m, i) for m in pool.modalities for i in range(pool.num_items(m))]
  parent = {v: v for v in nodes}

  def find(v):
    while parent[v] != v:
      v = parent[v]
    return v

  for (a, b), rows in pool.links.items():
    for i, j in rows:
      parent[find((a, int(i)))] = find((b, int(j)))
  parts = {}
  for v in nodes:
    parts.setdefault(find(v), set()).add(v)
  return {frozenset(s) for s in parts.values()}


@pytest.mark.parametrize("seed", range(4))
def test_matching_components_vs_union_find(seed):
  rng = np.random.default_rng(seed)
  n_img, n_txt = 30, 40
  rows = np.unique(rng.integers(0, [n_img, n_txt], (25, 2)), axis=0)   # many-to-many
  p = UnalignedPool(items={"image": np.zeros((n_img, 1)), "text": np.zeros((n_txt, 1))},
                    links={("image", "text"): rows})
  comp = pool_lib.matching_components(p)
  got = {}
  for m, ids in comp.items():
    for i, c in enumerate(ids):
      got.setdefault(int(c), set()).add((m, i))
  assert {frozenset(s) for s in got.values()} == _components_reference(p)
  assert sorted(got) == list(range(len(got)))
  assert pool_lib.count_units(comp) == len(_components_reference(p))


def test_stream_buffers_are_disjoint_complete_and_keep_partners_together():
  p = coco_like_pool()     # units: {i0,t0,t1,t2}, {i1,t3,t4}, {i2}, {i3,t5}, {t6}
  buffers = list(pool_lib.stream_buffers(p, 2, seed=0))
  assert len(buffers) == 3
  for size in (1, 2, 4, 5, 6):
    assert pool_lib.num_stream_buffers(5, size) == len(
        list(pool_lib.stream_buffers(p, size, seed=0)))
  for m in p.modalities:
    seen = np.concatenate([b[m] for b in buffers])
    assert sorted(seen) == list(range(p.num_items(m)))      # each item exactly once
    for b in buffers:
      assert (np.diff(b[m]) > 0).all()
  for b in buffers:
    for i in b["image"]:
      assert {t for _, t in p.partners("image", int(i))} <= set(b["text"].tolist())
  again = list(pool_lib.stream_buffers(p, 2, seed=0))
  assert all(np.array_equal(x[m], y[m]) for x, y in zip(buffers, again) for m in p.modalities)


def test_stream_buffers_one_to_one_sizes_and_seeds():
  n = 50
  p = UnalignedPool(items={"image": np.zeros((n, 1)), "text": np.zeros((n, 1))},
                    links={("image", "text"): np.stack([np.arange(n), np.arange(n)[::-1]], 1)})
  buffers = list(pool_lib.stream_buffers(p, 16, seed=3))
  assert [len(b["image"]) for b in buffers] == [16, 16, 16, 2]
  assert [len(b["text"]) for b in buffers] == [16, 16, 16, 2]
  other = list(pool_lib.stream_buffers(p, 16, seed=4))
  assert not np.array_equal(buffers[0]["image"], other[0]["image"])
  with pytest.raises(ValueError, match="buffer_size must be an int >= 1, got 0"):
    pool_lib.stream_buffers(p, 0, seed=0)


def test_annotation_state_apply_and_views():
  p = coco_like_pool()
  s = AnnotationState.for_pool(p)
  s.apply([Answer(0, "image", 0, p.partners("image", 0)), Answer(0, "text", 6, ())])
  s.apply([Answer(1, "text", 4, p.partners("text", 4))])
  assert s.cost == 3 and s.last_round == 1
  np.testing.assert_array_equal(s.pairs(), [[0, 0], [0, 1], [0, 2], [1, 4]])
  np.testing.assert_array_equal(s.pairs("text", "image"), [[0, 0], [1, 0], [2, 0], [4, 1]])
  np.testing.assert_array_equal(s.queried["text"], [0, 0, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(s.annotated["text"], [1, 1, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(s.paired("text"), [1, 1, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(s.unannotated("image"), [2, 3])
  np.testing.assert_array_equal(s.unannotated("text", among=[6, 5, 3, 0]), [3, 5])


def test_annotation_state_mutual_queries_in_one_round():
  p = coco_like_pool()
  s = AnnotationState.for_pool(p)
  s.apply([Answer(0, "image", 3, (("text", 5),)), Answer(0, "text", 5, (("image", 3),))])
  np.testing.assert_array_equal(s.pairs(), [[3, 5]])
  assert s.cost == 2


@pytest.mark.parametrize("answers, match", [
    ([Answer(1, "image", 0, ())], "already annotated"),
    ([Answer(1, "text", 1, ())], "already annotated"),       # revealed as a partner
    ([Answer(1, "image", 2, ()), Answer(1, "image", 2, ())], "queried twice"),
    ([Answer(1, "audio", 0, ())], "unknown modality 'audio'"),
    ([Answer(1, "image", 9, ())], "image index 9 is outside"),
    ([Answer(1, "image", 2, (("image", 3),))], "own modality"),
    ([Answer(1, "image", 2, (("text", 70),))], "partner: text index 70"),
    ([Answer(1, "image", 2, (("text", 6), ("text", 6)))], "listed twice"),
    ([Answer(-1, "image", 2, ())], "round_index"),
])
def test_annotation_state_rejects_bad_answers_atomically(answers, match):
  p = coco_like_pool()
  s = AnnotationState.for_pool(p)
  s.apply([Answer(0, "image", 0, p.partners("image", 0))])
  before = s.to_json()
  with pytest.raises(ValueError, match=match):
    s.apply([Answer(1, "image", 3, (("text", 5),))] + answers)
  assert s.to_json() == before
  assert not s.annotated["image"][3]


def test_annotation_state_json_round_trip(tmp_path):
  p = coco_like_pool()
  s = AnnotationState.for_pool(p)
  for r, (m, i) in enumerate([("image", 1), ("text", 6), ("image", 3)]):
    s.apply([Answer(r, m, i, p.partners(m, i))])
  restored = AnnotationState.from_json(s.to_json(), p)
  assert restored.log == s.log
  for m in p.modalities:
    np.testing.assert_array_equal(restored.annotated[m], s.annotated[m])
    np.testing.assert_array_equal(restored.queried[m], s.queried[m])
  np.testing.assert_array_equal(restored.pairs(), s.pairs())
  path = tmp_path / "state" / "annotation.json"
  s.save(path)
  loaded = AnnotationState.load(path, p)
  assert loaded.log == s.log
  assert [f.name for f in path.parent.iterdir()] == ["annotation.json"]   # no temp left


def test_annotation_state_from_json_errors():
  p = coco_like_pool()
  s = AnnotationState.for_pool(p)
  with pytest.raises(ValueError, match="pool sizes"):
    AnnotationState.from_json(s.to_json(), p.subset({"image": [0]}))
  with pytest.raises(ValueError, match="not valid JSON"):
    AnnotationState.from_json("{", p)
  with pytest.raises(ValueError, match="version"):
    AnnotationState.from_json(json.dumps({"num_items": {}, "log": []}))
  bad = json.loads(s.to_json())
  bad["log"] = [{"round": 0, "modality": "image", "index": 9, "partners": []}]
  with pytest.raises(ValueError, match="image index 9 is outside"):
    AnnotationState.from_json(json.dumps(bad))


def test_take_arrays_and_tuples():
  p = coco_like_pool()
  assert p.take("text", [6, 0]) == ("t6", "t0")
  assert p.take("image", np.array([1, 2])).shape == (2, 2, 2, 3)
  assert list(itertools.islice(pool_lib.stream_buffers(p, 10, 0), 5))[0]["text"].size == 7
