"""Fixed-feature loader: .npy/.npz feature files plus a pairing file."""
import numpy as np
import pytest

from mmal_jax.data.features import load_features


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.normal(size=(5, 4)).astype(np.float32)
  text = rng.normal(size=(7, 3)).astype(np.float64)
  pairs = np.array([[0, 6], [1, 2], [1, 3], [4, 0]])      # image 2, 3 and texts 1, 4, 5: none
  np.save(tmp_path / "image.npy", image)
  np.savez(tmp_path / "text.npz", features=text, other=np.zeros(2))
  np.save(tmp_path / "pairs.npy", pairs)
  (tmp_path / "pairs.csv").write_text(
      "image,text\n" + "".join(f"{i},{t}\n" for i, t in pairs) + "\n")
  return tmp_path, image, text, pairs


@pytest.mark.parametrize("pairs_name", ["pairs.npy", "pairs.csv"])
def test_round_trip(files, pairs_name):
  tmp, image, text, pairs = files
  p = load_features(tmp / "image.npy", tmp / "text.npz", tmp / pairs_name)
  np.testing.assert_array_equal(p.items["image"], image)
  np.testing.assert_array_equal(p.items["text"], text.astype(np.float32))
  assert p.items["text"].dtype == np.float32
  np.testing.assert_array_equal(p.pairs(), pairs)
  assert p.partners("image", 1) == (("text", 2), ("text", 3))
  assert p.partners("image", 2) == () and p.partners("text", 5) == ()


def test_single_array_npz_and_empty_pairs(files):
  tmp, image, _, _ = files
  np.savez(tmp / "image.npz", image)
  (tmp / "none.csv").write_text("image,text\n")
  p = load_features(tmp / "image.npz", tmp / "image.npy", tmp / "none.csv")
  np.testing.assert_array_equal(p.items["image"], image)
  assert p.pairs().shape == (0, 2)


def save(path, array):
  np.save(path, array)
  return path


@pytest.mark.parametrize("make_bad, argument, match", [
    (lambda t: t / "missing.npy", 0, "image features file not found"),
    (lambda t: save(t / "bad.npy", np.array([[1.0, np.nan], [0.0, 1.0], [np.inf, 0]])), 0,
     r"NaN/inf \(as float32\) in 2 rows, first row 0"),
    # Finite in float64, inf once cast to float32: named with its file and row.
    (lambda t: save(t / "big.npy", np.array([[1.0, 2.0], [0.0, 1e39]])), 1,
     r"text features in .*big.npy have NaN/inf \(as float32\) in 1 rows, first row 1"),
    (lambda t: save(t / "bad.npy", np.ones((3, 2), np.int32)), 1, "must be floating point"),
    (lambda t: save(t / "bad.npy", np.ones(3, np.float32)), 0, r"\(N, D\) array, got shape \(3,\)"),
    (lambda t: save(t / "bad.npy", np.ones((0, 3), np.float32)), 0, "non-empty"),
    (lambda t: (np.savez(t / "two.npz", a=np.ones((2, 2)), b=np.ones((2, 2))), t / "two.npz")[1],
     1, r"holds arrays \['a', 'b'\]"),
    (lambda t: ((t / "x.txt").write_text("1"), t / "x.txt")[1], 0, "must be .npy or .npz"),
    (lambda t: ((t / "x.npy").write_bytes(b"garbage"), t / "x.npy")[1], 0, "Cannot read"),
    (lambda t: save(t / "p.npy", np.array([[0, 7]])), 2, "text index 7, outside"),
    (lambda t: save(t / "p.npy", np.array([[0, 1], [0, 1]])), 2, r"repeats the pair \(0, 1\)"),
    (lambda t: save(t / "p.npy", np.array([[0.0, 1.0]])), 2, "int \\(P, 2\\) array"),
    (lambda t: save(t / "p.npy", np.array([0, 1, 2])), 2, "int \\(P, 2\\) array"),
    (lambda t: ((t / "p.csv").write_text("i,t\n0,1\n"), t / "p.csv")[1], 2,
     "header 'image,text'"),
    (lambda t: ((t / "p.csv").write_text("image,text\n0,1\n2;3\n"), t / "p.csv")[1], 2,
     r"p.csv:3: expected 'image_idx,text_idx'"),
    (lambda t: t / "nope.csv", 2, "pairs file not found"),
])
def test_errors(files, make_bad, argument, match):
  tmp = files[0]
  paths = [tmp / "image.npy", tmp / "text.npz", tmp / "pairs.npy"]
  paths[argument] = make_bad(tmp)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    load_features(*paths)
