"""Small synthetic test images shared by the detector tests: smooth colour stripes with
noise, optionally with a bright square planted as the defect."""

import numpy as np


def stripe_images(rng: np.random.Generator, n: int, size: int,
                  defect: tuple[slice, slice] | None = None) -> np.ndarray:
  """[n, size, size, 3] uint8 stripes (a random phase per image) plus N(0, 6^2) noise;
  `defect` (rows, columns) is set to 255 in every image."""
  yy, xx = np.mgrid[:size, :size]
  out = []
  for _ in range(n):
    phase = np.array([0.0, 1.0, 2.0]) + rng.uniform(0, 0.1, 3)
    img = 128 + 50 * np.sin((xx + 0.5 * yy)[..., None] / 4.0 + phase)
    img = img + rng.normal(0, 6, (size, size, 3))
    if defect is not None:
      img[defect] = 255
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return np.stack(out)
