"""Synthetic defects for the built-in benchmark, each with its exact support.

Every painter changes `image` ([H, W, 3] float32 in [0, 255], edited in place) only
on the pixels of the boolean support it returns, so the ground-truth mask of a
defect is exactly the set of pixels it touched. Painters draw their shape around
a centre chosen by the caller; `paint_defect` places one or more regions inside an
allowed box and never lets the support leave it.

Two sets of kinds. DEFECT_KINDS (scratch, hole, foreign, stain) are the standard
benchmark's: strong, changing every pixel of their mask by > 20 grey levels on
average. HARD_DEFECT_KINDS are the hard variant's: fainter, mostly smaller, in 1-2
regions (lengths in output pixels of the 256x256 image, changes in grey levels of
[0, 255], before sensor noise):
- thin_streak: a 1-3 px wide curved line (`_STREAK_WIDTH`), 24-68 px long, whose
  pixels all gain or lose the same 25-50 grey levels (`_STREAK_CONTRAST`; darker on
  bright surfaces, brighter on dark ones). The standard scratch moves its pixels 80%
  of the way to a far grey (about 110 levels on average).
- light_stain: a blob of radius 7-17 px blended towards a stain colour with a peak
  opacity of 0.25-0.55 (`_LIGHT_STAIN_ALPHA`) that fades linearly to 0 at its
  outline over the outer 0.35 radius (`_FADE`). The standard stain: 0.5-0.75, flat.
- colour_cast: a blob of radius 17-31 px whose chroma moves by 15-30 grey levels in
  its most-changed channel (`_CAST_SHIFT`), luminance-neutral (the R, G, B changes
  sum to 0), fading to 0 at its outline like light_stain.
- self_paste: a blob of radius 8-17 px replaced by a patch of the same defect-free
  image taken elsewhere (>= 3.4 radii away, inside the category's defect zone) and
  rotated by 45-315 degrees (`_PASTE_ANGLE`; nearest pixel, so every pasted value is
  one of the image's own): nothing but the discontinuity at its edge, and the rotated
  texture, gives it away.
These strengths were tuned (2.5x the contrasts and 1.2x the sizes of a first, too
faint set) so that PatchCore's image AUROC on the hard variant falls to about 0.8-0.9
on average over the categories (README.md).
Masks of the hard kinds: for thin_streak, light_stain and colour_cast, the pixels the
painter changed by at least HARD_MASK_THRESHOLD grey levels (largest change over R, G,
B); a fainter change is undone, so no pixel outside the mask changes. For self_paste,
the whole pasted blob (a pasted pixel may happen to be close to the one it replaced).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

# Names of the defect kinds, as written to test/<kind>/ and ground_truth/<kind>/.
DEFECT_KINDS = ("scratch", "hole", "foreign", "stain")
# The hard variant's kinds (see the module docstring).
HARD_DEFECT_KINDS = ("thin_streak", "light_stain", "colour_cast", "self_paste")
# Hard kinds other than self_paste: their mask keeps the pixels changed by >= this.
HARD_MASK_THRESHOLD = 2.0
_THRESHOLDED = ("thin_streak", "light_stain", "colour_cast")
_STREAK_WIDTH = (1.0, 3.0)  # px.
_STREAK_CONTRAST = (25.0, 50.0)  # Grey levels added or removed.
_LIGHT_STAIN_ALPHA = (0.25, 0.55)  # Peak opacity.
_CAST_SHIFT = (15.0, 30.0)  # Grey levels, in the most-changed channel.
_PASTE_ANGLE = (45.0, 315.0)  # Degrees.
_FADE = 0.35  # Faded stains and casts reach full strength this many radii inside.
# Stain colours (RGB): rust, ink, oil, paint, bleach.
_STAIN_COLOURS = np.array([[130, 70, 25], [40, 55, 150], [25, 25, 30], [190, 45, 40],
                           [235, 230, 200]], np.float32)
# (radius range in px, probabilities of 1, 2, 3 regions) per kind.
_SIZES = {"scratch": ((20, 50), (0.5, 0.35, 0.15)),
          "hole": ((5, 11), (0.55, 0.3, 0.15)),
          "foreign": ((9, 17), (0.7, 0.3, 0.0)),
          "stain": ((9, 19), (0.6, 0.3, 0.1)),
          "thin_streak": ((12, 34), (0.7, 0.3, 0.0)),
          "light_stain": ((7, 17), (0.7, 0.3, 0.0)),
          "colour_cast": ((17, 31), (0.8, 0.2, 0.0)),
          "self_paste": ((8, 17), (0.7, 0.3, 0.0))}


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


def _curve(rng: np.random.Generator, shape: tuple[int, int], centre: np.ndarray,
           length: float) -> np.ndarray:
  """The pixels of a gently curved line through `centre`: bool [H, W]."""
  direction = rng.uniform(0, 2 * np.pi)
  d = np.array([np.sin(direction), np.cos(direction)])
  normal = np.array([d[1], -d[0]])
  p0, p2 = centre - d * length / 2, centre + d * length / 2
  p1 = centre + normal * rng.uniform(-0.3, 0.3) * length
  t = np.linspace(0, 1, int(4 * length))[:, None]
  curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # Quadratic Bezier.
  points = np.zeros(shape, bool)
  idx = np.clip(np.rint(curve).astype(int), 0, np.array(shape) - 1)
  points[idx[:, 0], idx[:, 1]] = True
  return points


def _fade(support: np.ndarray, radius: float) -> np.ndarray:
  """[H, W] float32: 0 outside `support`, rising to 1 at _FADE * radius inside it."""
  inside = ndimage.distance_transform_edt(support)
  return np.clip(inside / (_FADE * radius), 0, 1).astype(np.float32)


def _stain_colour(rng: np.random.Generator, image: np.ndarray,
                  support: np.ndarray) -> np.ndarray:
  mean = _local_mean(image, support)
  far = np.linalg.norm(_STAIN_COLOURS - mean, axis=1) > 90
  colours = _STAIN_COLOURS[far] if far.any() else _STAIN_COLOURS
  return colours[rng.integers(len(colours))]


def paint_scratch(rng, image, centre, radius, foreign, zone) -> np.ndarray:
  """A thin curved stroke, brighter on dark surfaces and darker on bright ones."""
  del foreign, zone
  points = _curve(rng, image.shape[:2], centre, 2 * radius)
  width = rng.uniform(1.0, 3.0)
  support = ndimage.distance_transform_edt(~points) <= width / 2
  mean = _local_mean(image, support).mean()
  target = mean * 0.3 if mean > 135 else min(255.0, mean + 110)
  image[support] = 0.2 * image[support] + 0.8 * target
  return support


def paint_hole(rng, image, centre, radius, foreign, zone) -> np.ndarray:
  """A dark pit, darkest at its centre."""
  del foreign, zone
  support = blob(rng, image.shape[:2], centre, radius)
  rows, cols = _grid(image.shape[:2])
  depth = np.hypot(rows - centre[0], cols - centre[1])[support] / max(radius, 1.0)
  shade = (0.1 + 0.25 * np.clip(depth, 0, 1))[:, None]
  image[support] = image[support] * shade + 8
  return support


def paint_foreign(rng, image, centre, radius, foreign, zone) -> np.ndarray:
  """A patch of another material (`foreign`: [H, W, 3] float32, same size)."""
  del zone
  support = blob(rng, image.shape[:2], centre, radius)
  image[support] = foreign[support]
  return support


def paint_stain(rng, image, centre, radius, foreign, zone) -> np.ndarray:
  """A translucent coloured blotch in a colour far from the surface's."""
  del foreign, zone
  support = blob(rng, image.shape[:2], centre, radius)
  colour = _stain_colour(rng, image, support)
  alpha = rng.uniform(0.5, 0.75)
  texture = ndimage.gaussian_filter(rng.standard_normal(image.shape[:2]), 3)[support]
  a = np.clip(alpha * (1 + 0.15 * texture / (texture.std() + 1e-6)), 0.35, 0.9)[:, None]
  image[support] = (1 - a) * image[support] + a * colour
  return support


def paint_thin_streak(rng, image, centre, radius, foreign, zone) -> np.ndarray:
  """A faint thin curved line: every pixel shifted by the same few grey levels."""
  del foreign, zone
  points = _curve(rng, image.shape[:2], centre, 2 * radius)
  width = rng.uniform(*_STREAK_WIDTH)
  support = ndimage.distance_transform_edt(~points) <= width / 2
  sign = -1.0 if _local_mean(image, support).mean() > 135 else 1.0
  image[support] = np.clip(image[support] + sign * rng.uniform(*_STREAK_CONTRAST), 0, 255)
  return support


def paint_light_stain(rng, image, centre, radius, foreign, zone) -> np.ndarray:
  """A faint, soft-edged translucent blotch in a colour far from the surface's."""
  del foreign, zone
  support = blob(rng, image.shape[:2], centre, radius)
  colour = _stain_colour(rng, image, support)
  alpha = rng.uniform(*_LIGHT_STAIN_ALPHA) * _fade(support, radius)[support][:, None]
  image[support] = (1 - alpha) * image[support] + alpha * colour
  return support


def paint_colour_cast(rng, image, centre, radius, foreign, zone) -> np.ndarray:
  """A weak, soft-edged, luminance-neutral hue shift over a blob."""
  del foreign, zone
  support = blob(rng, image.shape[:2], centre, radius)
  phi = rng.uniform(0, 2 * np.pi)  # Direction in the opponent-colour plane.
  direction = (np.cos(phi) * np.array([1, -1, 0]) / np.sqrt(2) +
               np.sin(phi) * np.array([1, 1, -2]) / np.sqrt(6))
  shift = rng.uniform(*_CAST_SHIFT) * direction / np.abs(direction).max()
  weight = _fade(support, radius)[support][:, None]
  image[support] = np.clip(image[support] + weight * shift.astype(np.float32), 0, 255)
  return support


def paint_self_paste(rng, image, centre, radius, foreign, zone) -> np.ndarray:
  """A rotated patch of the same image (`foreign`: the defect-free image) from elsewhere.

  The source centre is drawn with `zone` (the category's defect zone) at least 3.4
  radii from `centre`, so that source and target blobs never overlap; nearest-pixel
  sampling, so that every pasted value is one of `foreign`'s pixels.
  """
  support = blob(rng, image.shape[:2], centre, radius)
  best, best_gap = None, -1.0
  for _ in range(50):
    source = zone(rng, radius)
    gap = float(np.hypot(*(source - centre)))
    if gap > best_gap:
      best, best_gap = source, gap
    if gap >= 3.4 * radius:
      break
  angle = np.deg2rad(rng.uniform(*_PASTE_ANGLE))
  rows, cols = np.nonzero(support)
  dr, dc = rows - centre[0], cols - centre[1]
  src_rows = np.rint(best[0] + np.cos(angle) * dr - np.sin(angle) * dc).astype(int)
  src_cols = np.rint(best[1] + np.sin(angle) * dr + np.cos(angle) * dc).astype(int)
  src_rows = np.clip(src_rows, 0, image.shape[0] - 1)
  src_cols = np.clip(src_cols, 0, image.shape[1] - 1)
  image[rows, cols] = foreign[src_rows, src_cols]
  return support


PAINTERS: dict[str, Callable[..., np.ndarray]] = {
    "scratch": paint_scratch, "hole": paint_hole, "foreign": paint_foreign,
    "stain": paint_stain, "thin_streak": paint_thin_streak,
    "light_stain": paint_light_stain, "colour_cast": paint_colour_cast,
    "self_paste": paint_self_paste}


def paint_defect(rng: np.random.Generator, image: np.ndarray, kind: str,
                 box: tuple[int, int], zone: Callable[[np.random.Generator, float], np.ndarray],
                 foreign: np.ndarray) -> np.ndarray:
  """Paints 1-3 separate regions of defect `kind` onto `image` (in place).

  Args:
    rng: the image's random generator.
    image: [H, W, 3] float32 in [0, 255], edited in place.
    kind: one of DEFECT_KINDS or HARD_DEFECT_KINDS.
    box: (lo, hi): the support stays within rows and columns [lo, hi).
    zone: zone(rng, radius) -> a centre [2] (row, col) for a region of that radius.
    foreign: [H, W, 3] float32, the material pasted by 'foreign'; for 'self_paste',
      the defect-free image itself (the source of its patches).

  Returns:
    mask: [H, W] bool, the defect's support: no pixel outside it was changed. The
      standard painters change every pixel inside it (by > 20 grey levels on
      average); for the hard ones see the module docstring.
  """
  if kind not in PAINTERS:
    raise ValueError(f"unknown defect kind {kind!r}; expected one of "
                     f"{DEFECT_KINDS + HARD_DEFECT_KINDS}")
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
    support = PAINTERS[kind](rng, work, centre, radius, foreign, zone) & inside & ~mask
    if kind in _THRESHOLDED:  # Faint edges: the mask is where the change is visible.
      support &= np.abs(work - image).max(axis=-1) >= HARD_MASK_THRESHOLD
    image[support] = work[support]
    mask |= support
  return mask
