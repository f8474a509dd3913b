"""Tests for the ShanghaiTech Campus reader on a tiny fixture in its layout."""

import numpy as np
import PIL.Image
import pytest

from spade_jax.data import stc

H, W = 24, 40  # Real frames are 480x856; the layout is what matters.


def _frame(value):
  image = np.zeros((H, W, 3), np.uint8)
  image[..., 0] = value
  image[..., 1] = np.arange(W, dtype=np.uint8)[None, :] * 3
  return image


@pytest.fixture
def root(tmp_path):
  """2 training videos (12 and 7 frames), 2 test videos (4 frames each)."""
  for video, n in (("01_001", 12), ("02_001", 7)):
    folder = tmp_path / "training" / "frames" / video
    folder.mkdir(parents=True)
    for i in range(n):  # Unpadded numbers: ordering must be numeric, not by name.
      PIL.Image.fromarray(_frame(i)).save(folder / f"{i}.png")
  (tmp_path / "testing" / "test_pixel_mask").mkdir(parents=True)
  (tmp_path / "testing" / "test_frame_mask").mkdir(parents=True)
  for v, video in enumerate(("01_0014", "02_0128")):
    folder = tmp_path / "testing" / "frames" / video
    folder.mkdir(parents=True)
    masks = np.zeros((4, H, W), bool)
    masks[2:, 5:10, 8:20] = True
    for i in range(4):
      PIL.Image.fromarray(_frame(100 + 10 * v + i)).save(folder / f"{i:03d}.png")
    np.save(tmp_path / "testing" / "test_pixel_mask" / f"{video}.npy", masks)
    np.save(tmp_path / "testing" / "test_frame_mask" / f"{video}.npy",
            np.array([0, 0, 1, 1], np.int8))
  return tmp_path


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
