"""Writes tiny category folders in MVTec AD layout for the data tests."""

from __future__ import annotations

import pathlib

import numpy as np
import PIL.Image


def write_category(root: pathlib.Path, name: str, *, gray: bool = False,
                   size: tuple[int, int] = (40, 32), n_train: int = 3, n_good: int = 2,
                   defects: dict[str, int] | None = None, seed: int = 0) -> dict:
  """Writes <root>/<name>/{train,test,ground_truth} and returns what was written.

  Images are random uint8 (L if gray, else RGB) of size (width, height); each
  anomalous image's mask (0/255) holds two rectangles (two regions) for the first
  defect and one for the others.

  Returns:
    {"train": {rel_path: array}, "test": {rel_path: (array, mask01 or None)}}.
  """
  defects = {"crack": 2, "hole": 1} if defects is None else defects
  rng = np.random.default_rng(seed)
  width, height = size
  shape = (height, width) if gray else (height, width, 3)
  cat = root / name
  written = {"train": {}, "test": {}}

  def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)

  for i in range(n_train):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    save(cat / "train" / "good" / f"{i:03d}.png", image)
    written["train"][f"train/good/{i:03d}.png"] = image
  for i in range(n_good):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    save(cat / "test" / "good" / f"{i:03d}.png", image)
    written["test"][f"test/good/{i:03d}.png"] = (image, None)
  for d, (defect, count) in enumerate(defects.items()):
    for i in range(count):
      image = rng.integers(0, 256, shape, dtype=np.uint8)
      mask = np.zeros((height, width), np.uint8)
      mask[2:6, 3:9] = 255
      if d == 0:
        mask[height - 8:height - 3, width - 10:width - 2] = 255
      save(cat / "test" / defect / f"{i:03d}.png", image)
      save(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
      written["test"][f"test/{defect}/{i:03d}.png"] = (image, (mask > 0).astype(np.uint8))
  return written
