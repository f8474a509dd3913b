"""Synthetic anomalies made from normal images: cut-paste and noise / texture blends.

For objectives that learn from normal images only (spade_jax.kernels.SyntheticAUROC):
every anomaly is one training image, changed inside a mask, so that the caller can
score the changed images against the clean ones.

* `cut_paste` (CutPaste, Li et al. 2021): a rectangle of the image (2-15% of the
  region's area, aspect ratio 0.3-3.3, log-uniform) is cut out, its brightness and
  colour jittered, and pasted at another place of the same image;
* `noise_blend` (after DRAEM, Zavrtanik et al. 2021): a smooth random field (value noise
  of a random scale, standing in for DRAEM's Perlin noise) is thresholded into blobs
  (2-25% of the region), and inside them the image is blended with a texture, here a
  flipped / rotated other training image (DRAEM draws textures from DTD), with opacity
  beta in [0.3, 1].

Host NumPy on uint8 [H, W, 3] images; deterministic for a seed. `box` limits the
changes to a region (e.g. the centre crop that the features see).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

KINDS = ("cut_paste", "noise_blend")
Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom / right exclusive.


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"{name} must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
  return image


def _check_box(box: Box | None, shape: tuple[int, ...]) -> Box:
  h, w = shape[:2]
  if box is None:
    return (0, 0, h, w)
  top, left, bottom, right = (int(v) for v in box)
  if not (0 <= top < bottom <= h and 0 <= left < right <= w) or min(bottom - top,
                                                                    right - left) < 8:
    raise ValueError(f"box must be (top, left, bottom, right) inside the {h}x{w} image and "
                     f"at least 8 px wide, got {box!r}")
  return (top, left, bottom, right)


def cut_paste(image: np.ndarray, rng: np.random.Generator, *, box: Box | None = None,
              area: tuple[float, float] = (0.02, 0.15),
              aspect: tuple[float, float] = (0.3, 3.3)) -> tuple[np.ndarray, np.ndarray]:
  """A rectangle of the image pasted elsewhere in it (CutPaste).

  Args:
    image: [H, W, 3] uint8.
    rng: NumPy generator.
    box: region (top, left, bottom, right) the patch is cut from and pasted into.
    area: range of the patch area, as a fraction of the box.
    aspect: range of its aspect ratio (log-uniform).

  Returns:
    (the changed copy [H, W, 3] uint8, its mask [H, W] bool: the pasted rectangle).
  """
  image = _check_image(image)
  top, left, bottom, right = _check_box(box, image.shape)
  bh, bw = bottom - top, right - left
  size = rng.uniform(*area) * bh * bw
  ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
  ph = int(np.clip(round(np.sqrt(size * ratio)), 2, bh - 1))
  pw = int(np.clip(round(np.sqrt(size / ratio)), 2, bw - 1))
  sy, sx = rng.integers(top, bottom - ph + 1), rng.integers(left, right - pw + 1)
  patch = image[sy:sy + ph, sx:sx + pw].astype(np.float32)
  # Colour jitter (brightness and per-channel gain), as CutPaste's augmentation.
  patch = patch * rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, size=3)
  for _ in range(10):  # A target that does not coincide with the source.
    ty, tx = rng.integers(top, bottom - ph + 1), rng.integers(left, right - pw + 1)
    if abs(ty - sy) >= ph // 2 or abs(tx - sx) >= pw // 2:
      break
  out = image.copy()
  out[ty:ty + ph, tx:tx + pw] = np.clip(np.round(patch), 0, 255).astype(np.uint8)
  mask = np.zeros(image.shape[:2], bool)
  mask[ty:ty + ph, tx:tx + pw] = True
  return out, mask


def _blobs(rng: np.random.Generator, shape: tuple[int, int],
           area: tuple[float, float]) -> np.ndarray:
  """A bool mask of smooth random blobs covering a fraction in `area` of `shape`."""
  h, w = shape
  scale = 2 ** rng.integers(2, 6)  # Grid cells of 4-32 px.
  grid = rng.standard_normal((h // scale + 2, w // scale + 2))
  field = ndimage.zoom(grid, scale, order=3)[:h, :w]
  field = ndimage.gaussian_filter(field, scale / 4)
  threshold = np.quantile(field, 1.0 - rng.uniform(*area))
  return field > threshold


def noise_blend(image: np.ndarray, texture: np.ndarray, rng: np.random.Generator, *,
                box: Box | None = None, area: tuple[float, float] = (0.02, 0.25),
                opacity: tuple[float, float] = (0.3, 1.0)) -> tuple[np.ndarray, np.ndarray]:
  """The image blended with a texture inside smooth random blobs (after DRAEM).

  Args:
    image: [H, W, 3] uint8.
    texture: [H, W, 3] uint8 of the same size (e.g. another training image).
    rng: NumPy generator.
    box: region the blobs lie in.
    area: range of the blobs' area, as a fraction of the box.
    opacity: range of beta: out = (1 - beta) image + beta texture inside the blobs.

  Returns:
    (the changed copy [H, W, 3] uint8, its mask [H, W] bool).
  """
  image = _check_image(image)
  texture = _check_image(texture, "texture")
  if texture.shape != image.shape:
    raise ValueError(f"texture {texture.shape} and image {image.shape} differ in size")
  top, left, bottom, right = _check_box(box, image.shape)
  mask = np.zeros(image.shape[:2], bool)
  mask[top:bottom, left:right] = _blobs(rng, (bottom - top, right - left), area)
  square = image.shape[0] == image.shape[1]
  texture = np.rot90(texture, rng.integers(4) if square else 2 * rng.integers(2))
  if rng.integers(2):
    texture = texture[:, ::-1]
  beta = rng.uniform(*opacity)
  out = image.astype(np.float32)
  out[mask] = (1.0 - beta) * out[mask] + beta * texture[mask].astype(np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8), mask


def synthetic_anomalies(images: np.ndarray | Sequence[np.ndarray], *, seed: int = 0,
                        per_image: int = 1, kinds: Sequence[str] = KINDS,
                        box: Box | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """per_image anomalies of every training image, the kinds taken in turn.

  Args:
    images: [N, H, W, 3] uint8 normal training images (N >= 2 for noise_blend).
    seed: the generator's seed.
    per_image: anomalies made from each image.
    kinds: from KINDS.
    box: region the changes lie in (default the whole image).

  Returns:
    (anomalies [N * per_image, H, W, 3] uint8, sources [N * per_image] int32: the
    image each was made from, masks [N * per_image, H, W] bool).

  Raises:
    ValueError: bad images, an unknown kind, per_image < 1.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or \
      images.shape[0] < 1:
    raise ValueError(f"images must be [N, H, W, 3] uint8, got {images.shape} {images.dtype}")
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or not kinds:
    raise ValueError(f"kinds must be from {KINDS}, got {list(kinds)}")
  if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
    raise ValueError(f"per_image must be a positive int, got {per_image!r}")
  if "noise_blend" in kinds and images.shape[0] < 2:
    raise ValueError("noise_blend needs at least 2 images (another one is the texture)")
  rng = np.random.default_rng(seed)
  out, sources, masks = [], [], []
  for i in range(images.shape[0]):
    for j in range(per_image):
      kind = kinds[(i * per_image + j) % len(kinds)]
      if kind == "cut_paste":
        changed, mask = cut_paste(images[i], rng, box=box)
      else:
        other = (i + rng.integers(1, images.shape[0])) % images.shape[0]
        changed, mask = noise_blend(images[i], images[other], rng, box=box)
      out.append(changed)
      sources.append(i)
      masks.append(mask)
  return np.stack(out), np.asarray(sources, np.int32), np.stack(masks)
