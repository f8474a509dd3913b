"""Tests for the ShanghaiTech Campus reader on a tiny fixture in its layout."""

from hostile_fixtures import write_bomb_npy, write_bomb_png
import numpy as np
import pytest
from stc_fixtures import H, W, make_stc_tree

from spade_jax.data import stc


@pytest.fixture
def root(tmp_path):
  return make_stc_tree(tmp_path)


def test_settings_are_the_papers():
  assert stc.STC_SETTINGS["k_images"] == 1 and stc.STC_SETTINGS["kappa"] == 1
  assert stc.STC_SETTINGS["resize"] == 256 and stc.STC_SETTINGS["frame_step"] == 5


def test_train_subsampled_one_in_five(root):
  images, paths = stc.load_stc_train(root, size=None)
  assert paths == [f"training/frames/01_001/{i}.png" for i in (0, 5, 10)] + [
      f"training/frames/02_001/{i}.png" for i in (0, 5)]
  np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 5, 10, 0, 5])
  assert images.shape == (5, H, W, 3) and images.dtype == np.uint8


def test_test_video(root):
  video = stc.load_stc_test_video(root, "02_0128", size=None)
  np.testing.assert_array_equal(video.labels, [0, 0, 1, 1])
  np.testing.assert_array_equal(video.frames[:, 0, 0, 0], [110, 111, 112, 113])
  assert video.masks.dtype == np.uint8 and video.masks[2].sum() == 5 * 12
  assert not video.masks[:2].any()


def test_load_stc_resized(root):
  data = stc.load_stc(root, size=32)
  assert data.category == "stc"
  assert data.train_images.shape == (5, 32, 32, 3)
  assert data.test_images.shape == (8, 32, 32, 3) and data.test_masks.shape == (8, 32, 32)
  np.testing.assert_array_equal(data.test_labels, [0, 0, 1, 1] * 2)
  assert data.test_defects[:3] == ["good", "good", "anomalous"]
  assert data.test_paths[0] == "testing/frames/01_0014/000.png"
  assert set(np.unique(data.test_masks)) == {0, 1}
  assert not data.test_masks[data.test_labels == 0].any()


def test_labels_from_pixel_masks_without_frame_masks(root):
  for path in (root / "testing" / "test_frame_mask").iterdir():
    path.unlink()
  np.testing.assert_array_equal(stc.load_stc_test_video(root, "01_0014").labels, [0, 0, 1, 1])


def test_errors(root, tmp_path_factory):
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(FileNotFoundError, match="does not exist; expected"):
    stc.load_stc(empty / "missing")
  (empty / "training" / "videos").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="extract each video's frames"):
    stc.list_videos(empty, "train")
  np.save(root / "testing" / "test_pixel_mask" / "01_0014.npy", np.zeros((3, H, W)))
  with pytest.raises(ValueError, match="01_0014.npy.*expected \\[4, H, W\\]"):
    stc.load_stc_test_video(root, "01_0014")
  np.save(root / "testing" / "test_pixel_mask" / "01_0014.npy", np.zeros((4, H, W + 1)))
  with pytest.raises(ValueError, match="000.png.*expected equal"):
    stc.load_stc_test_video(root, "01_0014")
  (root / "testing" / "test_pixel_mask" / "02_0128.npy").unlink()
  with pytest.raises(FileNotFoundError, match="no pixel mask.*02_0128.npy"):
    stc.load_stc_test_video(root, "02_0128")


def test_decompression_bomb_frame_names_the_file(root):
  bomb = root / "training" / "frames" / "01_001" / "5.png"
  write_bomb_png(bomb)
  with pytest.raises(ValueError, match="too large") as e:
    stc.load_stc_train(root)
  assert str(bomb) in str(e.value)


@pytest.mark.parametrize("kind", ["huge_header", "pickle", "garbage"])
def test_unreadable_npy_names_the_file(root, kind):
  """A mask file claiming a 10^15-element array (or holding a pickle or garbage): a
  ValueError naming it, not a MemoryError or numpy's message."""
  for name in ("test_pixel_mask", "test_frame_mask"):
    path = root / "testing" / name / "01_0014.npy"
    if kind == "huge_header":
      write_bomb_npy(path, (100_000, 100_000, 100_000) if name == "test_pixel_mask"
                     else (10**15,))
    elif kind == "pickle":
      np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
      path.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="01_0014.npy") as e:
      stc.load_stc_test_video(root, "01_0014")
    assert str(path) in str(e.value)
    np.save(root / "testing" / "test_pixel_mask" / "01_0014.npy", np.zeros((4, H, W), bool))
