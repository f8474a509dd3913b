"""Tests for the MVTec AD folder reader (spade_jax.data.mvtec)."""

from hostile_fixtures import write_bomb_png
from mvtec_fixtures import write_category
import numpy as np
import PIL.Image
import pytest

from spade_jax.data import mvtec


def _rgb(array):
  return np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array


def test_official_categories():
  assert len(mvtec.MVTEC_CATEGORIES) == 15
  assert {"grid", "screw", "zipper", "metal_nut"} <= set(mvtec.MVTEC_CATEGORIES)


def test_list_categories_ignores_other_entries(tmp_path):
  write_category(tmp_path, "zeta")
  write_category(tmp_path, "alpha", gray=True)
  (tmp_path / "not_a_category" / "train").mkdir(parents=True)
  (tmp_path / ".hidden" / "train" / "good").mkdir(parents=True)
  (tmp_path / ".hidden" / "test").mkdir()
  (tmp_path / "README.txt").write_text("hi")
  assert mvtec.list_categories(tmp_path) == ["alpha", "zeta"]


@pytest.mark.parametrize("gray", [False, True])
def test_load_category_matches_written_files(tmp_path, gray):
  written = write_category(tmp_path, "part", gray=gray, defects={"crack": 2, "hole": 1})
  data = mvtec.load_category(tmp_path, "part")
  assert data.category == "part"
  assert data.train_images.shape == (3, 32, 40, 3) and data.train_images.dtype == np.uint8
  assert data.test_images.shape == (5, 32, 40, 3) and data.test_images.dtype == np.uint8
  assert data.test_masks.shape == (5, 32, 40) and data.test_masks.dtype == np.uint8
  assert data.test_labels.dtype == np.int32
  assert data.train_paths == sorted(written["train"])
  assert data.test_paths == ["test/crack/000.png", "test/crack/001.png", "test/good/000.png",
                             "test/good/001.png", "test/hole/000.png"]
  assert data.test_defects == ["crack", "crack", "good", "good", "hole"]
  np.testing.assert_array_equal(data.test_labels, [1, 1, 0, 0, 1])
  for path, image in zip(data.train_paths, data.train_images):
    np.testing.assert_array_equal(image, _rgb(written["train"][path]))
  for path, image, mask in zip(data.test_paths, data.test_images, data.test_masks):
    expected_image, expected_mask = written["test"][path]
    np.testing.assert_array_equal(image, _rgb(expected_image))
    if expected_mask is None:
      assert not mask.any()
    else:
      np.testing.assert_array_equal(mask, expected_mask)
  assert set(np.unique(data.test_masks)) == {0, 1}


def test_grayscale_becomes_three_equal_channels(tmp_path):
  write_category(tmp_path, "screwlike", gray=True)
  data = mvtec.load_category(tmp_path, "screwlike")
  assert data.train_images.shape[-1] == 3
  np.testing.assert_array_equal(data.train_images[..., 0], data.train_images[..., 2])


def test_resize_and_progress(tmp_path):
  write_category(tmp_path, "part")
  calls = []
  data = mvtec.load_category(tmp_path, "part", resize=16,
                             progress=lambda done, total: calls.append((done, total)))
  assert data.train_images.shape == (3, 16, 16, 3)
  assert data.test_masks.shape == (5, 16, 16)
  assert set(np.unique(data.test_masks)) <= {0, 1}
  assert calls[-1] == (8, 8) and len(calls) == 8
  with pytest.raises(ValueError, match="resize"):
    mvtec.load_category(tmp_path, "part", resize=0)


def test_root_missing(tmp_path):
  missing = tmp_path / "nope"
  for fn in (lambda: mvtec.list_categories(missing),
             lambda: mvtec.load_category(missing, "bottle")):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
      fn()
    assert str(missing) in str(e.value) and "train/good" in str(e.value)


def test_root_not_in_layout(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "a.png").write_bytes(b"")
  with pytest.raises(ValueError, match="no category in MVTec AD layout") as e:
    mvtec.list_categories(tmp_path)
  assert "train/good" in str(e.value) and "ground_truth" in str(e.value)


def test_root_is_a_category(tmp_path):
  write_category(tmp_path, "part")
  with pytest.raises(ValueError, match="itself looks like one category"):
    mvtec.list_categories(tmp_path / "part")


def test_unknown_category(tmp_path):
  write_category(tmp_path, "part")
  with pytest.raises(FileNotFoundError, match="categories found.*part"):
    mvtec.load_category(tmp_path, "bottle")


def test_missing_mask(tmp_path):
  write_category(tmp_path, "part")
  (tmp_path / "part" / "ground_truth" / "hole" / "000_mask.png").unlink()
  with pytest.raises(FileNotFoundError, match="has no mask") as e:
    mvtec.load_category(tmp_path, "part")
  assert "hole/000.png" in str(e.value) and "000_mask.png" in str(e.value)


def test_mask_size_differs(tmp_path):
  write_category(tmp_path, "part")
  bad = tmp_path / "part" / "ground_truth" / "crack" / "001_mask.png"
  PIL.Image.fromarray(np.full((10, 10), 255, np.uint8)).save(bad)
  with pytest.raises(ValueError, match="has size 10x10") as e:
    mvtec.load_category(tmp_path, "part")
  assert str(bad) in str(e.value) and "crack/001.png" in str(e.value)


@pytest.mark.parametrize("rel", ["train/good/001.png", "test/good/000.png",
                                 "ground_truth/crack/000_mask.png"])
def test_corrupt_png_names_the_file(tmp_path, rel):
  write_category(tmp_path, "part")
  bad = tmp_path / "part" / rel
  bad.write_bytes(bad.read_bytes()[:60])  # Truncated PNG.
  with pytest.raises(ValueError, match="cannot decode image file") as e:
    mvtec.load_category(tmp_path, "part")
  assert str(bad) in str(e.value)


def test_no_training_images(tmp_path):
  write_category(tmp_path, "part")
  for path in (tmp_path / "part" / "train" / "good").iterdir():
    path.unlink()
  with pytest.raises(ValueError, match="no training images") as e:
    mvtec.load_category(tmp_path, "part")
  assert "train/good" in str(e.value)


def test_no_test_images(tmp_path):
  write_category(tmp_path, "part", n_good=0, defects={})
  (tmp_path / "part" / "test").mkdir(exist_ok=True)
  with pytest.raises(ValueError, match="no test images"):
    mvtec.load_category(tmp_path, "part")


def test_sizes_differ_within_split(tmp_path):
  write_category(tmp_path, "part")
  odd = tmp_path / "part" / "train" / "good" / "002.png"
  PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(odd)
  with pytest.raises(ValueError, match="one size") as e:
    mvtec.load_category(tmp_path, "part")
  assert "train/good/002.png" in str(e.value)
  data = mvtec.load_category(tmp_path, "part", resize=8)  # resize= handles it.
  assert data.train_images.shape == (3, 8, 8, 3)


def test_read_mask_binarizes_any_nonzero(tmp_path):
  path = tmp_path / "m.png"
  PIL.Image.fromarray(np.array([[0, 1, 128, 255]], np.uint8)).save(path)
  np.testing.assert_array_equal(mvtec.read_mask(path), [[0, 1, 1, 1]])
  rgba = np.zeros((1, 2, 4), np.uint8)
  rgba[..., 3] = 255
  rgba[0, 1, 0] = 255
  PIL.Image.fromarray(rgba).save(path)
  np.testing.assert_array_equal(mvtec.read_mask(path), [[0, 1]])


@pytest.mark.parametrize("rel", ["train/good/001.png", "test/crack/000.png",
                                 "ground_truth/crack/000_mask.png"])
def test_decompression_bomb_names_the_file(tmp_path, rel):
  """A PNG whose header claims 100000 x 100000 pixels: a ValueError naming it, not PIL's
  DecompressionBombError."""
  write_category(tmp_path, "part")
  bomb = tmp_path / "part" / rel
  write_bomb_png(bomb)
  with pytest.raises(ValueError, match="too large") as e:
    mvtec.load_category(tmp_path, "part")
  assert str(bomb) in str(e.value) and "DecompressionBombError" not in str(e.value)
  with pytest.raises(ValueError, match="too large"):
    (mvtec.read_mask if "mask" in rel else mvtec.read_rgb)(bomb)
