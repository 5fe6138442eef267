"""COCO-format loader, on ../shared/data/coco_mini (skipped when absent) and tiny fakes."""
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from mmal_jax.data.coco import load_coco

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("MMAL_SHARED", REPO.parent / "shared"))
COCO_MINI = SHARED / "data" / "coco_mini"


def coco_split(split):
  if not (COCO_MINI / "annotations" / f"captions_{split}2017.json").is_file():
    pytest.skip(f"COCO mini not found at {COCO_MINI} (set MMAL_SHARED to the shared folder).")
  return (COCO_MINI / "annotations" / f"captions_{split}2017.json",
          COCO_MINI / f"{split}2017")


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_mini_one_to_many(split):
  captions_json, image_dir = coco_split(split)
  data = json.loads(captions_json.read_text())
  p = load_coco(captions_json, image_dir)
  assert p.num_items("image") == len(data["images"])
  assert p.num_items("text") == len(data["annotations"])
  captions_by_file = {}
  file_of_id = {im["id"]: im["file_name"] for im in data["images"]}
  for ann in data["annotations"]:
    captions_by_file.setdefault(file_of_id[ann["image_id"]], []).append(ann["caption"].strip())
  for i, path in enumerate(p.items["image"]):
    assert os.path.isfile(path)
    partners = [p.items["text"][t] for _, t in p.partners("image", i)]
    assert partners == captions_by_file[os.path.basename(path)]
  assert (p.num_partners("text", "image") == 1).all()
  assert p.num_partners("image", "text").min() >= 5


def test_coco_mini_first_caption_resized_and_limited():
  captions_json, image_dir = coco_split("val")
  data = json.loads(captions_json.read_text())
  p = load_coco(captions_json, image_dir, max_images=6, image_size=32, first_caption_only=True)
  assert p.items["image"].shape == (6, 32, 32, 3) and p.items["image"].dtype == np.uint8
  assert p.items["image"].std() > 10
  first = [next(a["caption"].strip() for a in data["annotations"] if a["image_id"] == im["id"])
           for im in data["images"][:6]]
  assert list(p.items["text"]) == first
  np.testing.assert_array_equal(p.pairs(), np.stack([np.arange(6)] * 2, 1))


@pytest.fixture
def fake_coco(tmp_path):
  """2 images on disk, 3 captions (image 2 has none)."""
  image_dir = tmp_path / "images"
  image_dir.mkdir()
  for name, colour in (("a.jpg", (255, 0, 0)), ("b.png", (0, 0, 255))):
    Image.new("RGB", (20, 10), colour).save(image_dir / name)
  data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.png"}],
          "annotations": [{"image_id": 3, "id": 1, "caption": "blue "},
                          {"image_id": 7, "id": 2, "caption": "red"},
                          {"image_id": 7, "id": 3, "caption": "crimson"}]}
  return tmp_path, image_dir, data


def write(path, data):
  path.write_text(json.dumps(data))
  return path


def test_fake_coco_order_and_missing_partner(fake_coco):
  tmp, image_dir, data = fake_coco
  data["images"].append({"id": 9, "file_name": "a.jpg"})
  p = load_coco(write(tmp / "c.json", data), image_dir, image_size=16)
  assert p.items["text"] == ("red", "crimson", "blue")
  np.testing.assert_array_equal(p.pairs(), [[0, 0], [0, 1], [1, 2]])
  assert p.partners("image", 2) == ()
  assert tuple(p.items["image"][1, 0, 0]) == (0, 0, 255)


def test_fake_coco_errors(fake_coco):
  tmp, image_dir, data = fake_coco
  good = write(tmp / "good.json", data)
  with pytest.raises(FileNotFoundError, match="captions file not found"):
    load_coco(tmp / "nope.json", image_dir)
  (tmp / "broken.json").write_text("{\"images\": [")
  with pytest.raises(ValueError, match="Cannot read COCO captions file .*broken.json"):
    load_coco(tmp / "broken.json", image_dir)
  with pytest.raises(ValueError, match="needs 'images' and 'annotations'"):
    load_coco(write(tmp / "x.json", {"images": []}), image_dir)
  with pytest.raises(FileNotFoundError, match="image folder not found"):
    load_coco(good, tmp / "no_dir")
  with pytest.raises(ValueError, match="lists no images"):
    load_coco(write(tmp / "e.json", {"images": [], "annotations": []}), image_dir)
  with pytest.raises(ValueError, match="unknown image id 5"):
    load_coco(write(tmp / "u.json", dict(data, annotations=data["annotations"] + [
        {"image_id": 5, "caption": "?"}])), image_dir)
  with pytest.raises(ValueError, match="image id 7 is listed twice"):
    load_coco(write(tmp / "d.json", dict(data, images=data["images"] * 2)), image_dir)
  with pytest.raises(ValueError, match="no captions for the 2 selected"):
    load_coco(write(tmp / "n.json", dict(data, annotations=[])), image_dir)
  with pytest.raises(ValueError, match="max_images must be an int >= 1"):
    load_coco(good, image_dir, max_images=0)
  os.remove(image_dir / "b.png")
  with pytest.raises(FileNotFoundError, match=r"1 of 2 images .* are not in .*b.png"):
    load_coco(good, image_dir)
  (image_dir / "b.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="Cannot decode image .*b.png"):
    load_coco(good, image_dir, image_size=8)


def test_coco_mini_copy_with_absent_image(tmp_path):
  captions_json, image_dir = coco_split("val")
  data = json.loads(captions_json.read_text())
  small = dict(data, images=data["images"][:3])
  small["annotations"] = [a for a in data["annotations"]
                          if a["image_id"] in {im["id"] for im in small["images"]}]
  (tmp_path / "img").mkdir()
  for im in small["images"][:2]:
    shutil.copy(image_dir / im["file_name"], tmp_path / "img")
  with pytest.raises(FileNotFoundError, match=small["images"][2]["file_name"]):
    load_coco(write(tmp_path / "c.json", small), tmp_path / "img")
