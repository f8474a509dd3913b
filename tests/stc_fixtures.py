"""A tiny ShanghaiTech Campus tree in its layout (extracted frames + .npy masks)."""

import pathlib

import numpy as np
import PIL.Image

H, W = 24, 40  # Real frames are 480x856; the layout is what matters.


def _frame(value):
  image = np.zeros((H, W, 3), np.uint8)
  image[..., 0] = value
  image[..., 1] = np.arange(W, dtype=np.uint8)[None, :] * 3
  return image


def make_stc_tree(tmp_path: pathlib.Path) -> pathlib.Path:
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
