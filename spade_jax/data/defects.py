"""Synthetic defects for the built-in benchmark, each with its exact support.

Every painter changes `image` ([H, W, 3] float32 in [0, 255], edited in place) only
on the pixels of the boolean support it returns, so the ground-truth mask of a
defect is exactly the set of pixels it touched. Painters draw their shape around
a centre chosen by the caller; `paint_defect` places one or more regions inside an
allowed box and never lets the support leave it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

# Names of the defect kinds, as written to test/<kind>/ and ground_truth/<kind>/.
DEFECT_KINDS = ("scratch", "hole", "foreign", "stain")
# Stain colours (RGB): rust, ink, oil, paint, bleach.
_STAIN_COLOURS = np.array([[130, 70, 25], [40, 55, 150], [25, 25, 30], [190, 45, 40],
                           [235, 230, 200]], np.float32)
# (radius range in px, probabilities of 1, 2, 3 regions) per kind.
_SIZES = {"scratch": ((20, 50), (0.5, 0.35, 0.15)),
          "hole": ((5, 11), (0.55, 0.3, 0.15)),
          "foreign": ((9, 17), (0.7, 0.3, 0.0)),
          "stain": ((9, 19), (0.6, 0.3, 0.1))}


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  return np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)


def blob(rng: np.random.Generator, shape: tuple[int, int], centre: np.ndarray,
         radius: float) -> np.ndarray:
  """An irregular, star-shaped, elongated blob: bool [H, W]."""
  rows, cols = _grid(shape)
  theta = rng.uniform(0, np.pi)
  dy, dx = rows - centre[0], cols - centre[1]
  u = dx * np.cos(theta) + dy * np.sin(theta)
  v = (-dx * np.sin(theta) + dy * np.cos(theta)) / rng.uniform(0.55, 1.0)
  angle, dist = np.arctan2(v, u), np.hypot(u, v)
  edge = np.ones_like(angle)
  for k in range(2, 6):  # Low-frequency wobble of the outline.
    edge += rng.uniform(0, 0.3 / (k - 1)) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
  return dist < radius * edge


def _local_mean(image: np.ndarray, support: np.ndarray) -> np.ndarray:
  return image[support].mean(axis=0)


def paint_scratch(rng, image, centre, radius, foreign) -> np.ndarray:
  """A thin curved stroke, brighter on dark surfaces and darker on bright ones."""
  del foreign
  length = 2 * radius
  direction = rng.uniform(0, 2 * np.pi)
  d = np.array([np.sin(direction), np.cos(direction)])
  normal = np.array([d[1], -d[0]])
  p0, p2 = centre - d * length / 2, centre + d * length / 2
  p1 = centre + normal * rng.uniform(-0.3, 0.3) * length
  t = np.linspace(0, 1, int(4 * length))[:, None]
  curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # Quadratic Bezier.
  points = np.zeros(image.shape[:2], bool)
  idx = np.clip(np.rint(curve).astype(int), 0, np.array(image.shape[:2]) - 1)
  points[idx[:, 0], idx[:, 1]] = True
  width = rng.uniform(1.0, 3.0)
  support = ndimage.distance_transform_edt(~points) <= width / 2
  mean = _local_mean(image, support).mean()
  target = mean * 0.3 if mean > 135 else min(255.0, mean + 110)
  image[support] = 0.2 * image[support] + 0.8 * target
  return support


def paint_hole(rng, image, centre, radius, foreign) -> np.ndarray:
  """A dark pit, darkest at its centre."""
  del foreign
  support = blob(rng, image.shape[:2], centre, radius)
  rows, cols = _grid(image.shape[:2])
  depth = np.hypot(rows - centre[0], cols - centre[1])[support] / max(radius, 1.0)
  shade = (0.1 + 0.25 * np.clip(depth, 0, 1))[:, None]
  image[support] = image[support] * shade + 8
  return support


def paint_foreign(rng, image, centre, radius, foreign) -> np.ndarray:
  """A patch of another material (`foreign`: [H, W, 3] float32, same size)."""
  support = blob(rng, image.shape[:2], centre, radius)
  image[support] = foreign[support]
  return support


def paint_stain(rng, image, centre, radius, foreign) -> np.ndarray:
  """A translucent coloured blotch in a colour far from the surface's."""
  del foreign
  support = blob(rng, image.shape[:2], centre, radius)
  mean = _local_mean(image, support)
  far = np.linalg.norm(_STAIN_COLOURS - mean, axis=1) > 90
  colours = _STAIN_COLOURS[far] if far.any() else _STAIN_COLOURS
  colour = colours[rng.integers(len(colours))]
  alpha = rng.uniform(0.5, 0.75)
  texture = ndimage.gaussian_filter(rng.standard_normal(image.shape[:2]), 3)[support]
  a = np.clip(alpha * (1 + 0.15 * texture / (texture.std() + 1e-6)), 0.35, 0.9)[:, None]
  image[support] = (1 - a) * image[support] + a * colour
  return support


PAINTERS: dict[str, Callable[..., np.ndarray]] = {
    "scratch": paint_scratch, "hole": paint_hole, "foreign": paint_foreign,
    "stain": paint_stain}


def paint_defect(rng: np.random.Generator, image: np.ndarray, kind: str,
                 box: tuple[int, int], zone: Callable[[np.random.Generator, float], np.ndarray],
                 foreign: np.ndarray) -> np.ndarray:
  """Paints 1-3 separate regions of defect `kind` onto `image` (in place).

  Args:
    rng: the image's random generator.
    image: [H, W, 3] float32 in [0, 255], edited in place.
    kind: one of DEFECT_KINDS.
    box: (lo, hi): the support stays within rows and columns [lo, hi).
    zone: zone(rng, radius) -> a centre [2] (row, col) for a region of that radius.
    foreign: [H, W, 3] float32, the material pasted by 'foreign'.

  Returns:
    mask: [H, W] bool, the defect's support: no pixel outside it was changed, and
      the painters change every pixel inside it (by > 20 grey levels on average).
  """
  if kind not in PAINTERS:
    raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}")
  (r_lo, r_hi), probs = _SIZES[kind]
  n_regions = 1 + rng.choice(3, p=probs)
  inside = np.zeros(image.shape[:2], bool)
  inside[box[0]:box[1], box[0]:box[1]] = True
  mask = np.zeros(image.shape[:2], bool)
  for _ in range(n_regions):
    radius = rng.uniform(r_lo, r_hi)
    gap = ndimage.distance_transform_edt(~mask) if mask.any() else None
    for _ in range(20):  # Keep regions apart so that they stay separate components.
      centre = zone(rng, radius)
      row, col = np.clip(np.rint(centre).astype(int), 0, np.array(mask.shape) - 1)
      if gap is None or gap[row, col] > 1.8 * radius + 4:
        break
    work = image.copy()
    support = PAINTERS[kind](rng, work, centre, radius, foreign) & inside & ~mask
    image[support] = work[support]
    mask |= support
  return mask
