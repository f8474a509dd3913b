"""Image and mask preprocessing on the host (NumPy + PIL), torchvision semantics.

SPADE on MVTec AD: Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize with
ImageNet mean/std. torchvision's Resize(int) on a PIL image scales the *shorter*
side to `resize` (the longer to int(resize * long / short)) with PIL's bilinear
filter, which antialiases when downsampling; CenterCrop takes the offsets
int(round((size - crop) / 2)). Doing this with PIL on the host reproduces the
reference pipeline exactly (jax.image.resize weights pixels differently).
Masks get the same geometry with nearest-neighbour resizing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from spade_jax.features import geometry

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _as_list(arrays, what: str, item_rank: int, channels: int | None) -> list[np.ndarray]:
  """Splits [N, ...] / [...] / list-of-[...] input into single items, validated."""
  if isinstance(arrays, (list, tuple)):
    items = [np.asarray(a) for a in arrays]
    if not items:
      raise ValueError(f"{what}: got an empty list")
  else:
    arrays = np.asarray(arrays)
    if arrays.ndim == item_rank + 1:
      items = list(arrays)
    elif arrays.ndim == item_rank:
      items = [arrays]
    else:
      raise ValueError(f"{what}: expected rank {item_rank} or {item_rank + 1}, "
                       f"got shape {arrays.shape}")
    if not items:
      raise ValueError(f"{what}: got an empty batch, shape {arrays.shape}")
  for i, item in enumerate(items):
    if item.ndim != item_rank:
      raise ValueError(f"{what}[{i}]: expected rank {item_rank}, got shape {item.shape}")
    if channels is not None and item.shape[-1] != channels:
      raise ValueError(f"{what}[{i}]: expected {channels} channels (RGB, last axis), got "
                       f"shape {item.shape}; convert grayscale with np.repeat(x, 3, -1)")
    if min(item.shape[:2]) < 1:
      raise ValueError(f"{what}[{i}]: empty image, shape {item.shape}")
  return items


def _resize_crop(image: Image.Image, resize: int | None, crop: int | None,
                 resample: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
  """torchvision Resize(resize) then CenterCrop(crop) on a PIL image; with image_size
  (H, W): a resize to exactly that size instead (whole image, no crop)."""
  if image_size is not None:
    h, w = image_size
    if image.size != (w, h):
      image = image.resize((w, h), resample)
    return np.asarray(image)
  if resize is not None:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    size = (resize, new_long) if w <= h else (new_long, resize)
    if size != (w, h):
      image = image.resize(size, resample)
  if crop is not None:
    w, h = image.size
    if crop > min(w, h):
      raise ValueError(f"crop={crop} is larger than the resized image {h}x{w}")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
  return np.asarray(image)


def _check_sizes(resize, crop, image_size=None):
  for name, value in (("resize", resize), ("crop", crop)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")
  size = geometry.check_image_size(image_size)
  if size is not None and crop is not None:
    raise ValueError(f"image_size={size} resizes the whole image; it needs crop=None")
  return size


def preprocess(images_uint8: np.ndarray | Sequence[np.ndarray], resize: int | None = 256,
               crop: int | None = 224, image_size: tuple[int, int] | None = None
               ) -> np.ndarray:
  """Resize (shorter side), centre-crop and ImageNet-normalize RGB images.

  Args:
    images_uint8: uint8 [N, H, W, 3], one [H, W, 3], or a list of [H_i, W_i, 3].
    resize: target of the shorter side (bilinear, antialiased); None: no resize.
    crop: side of the square centre crop; None: no crop (then all images must
      come out the same size).
    image_size: (H, W): every image resized to exactly this (bilinear, antialiased;
      the aspect ratio changes if it differs), `resize` unused; needs crop=None.

  Returns:
    [N, crop, crop, 3] (or [N, H, W, 3]) float32: (x / 255 - mean) / std.
  """
  image_size = _check_sizes(resize, crop, image_size)
  items = _as_list(images_uint8, "images_uint8", 3, 3)
  for i, item in enumerate(items):
    if item.dtype != np.uint8:
      raise ValueError(f"images_uint8[{i}]: expected dtype uint8, got {item.dtype}")
  out = [_resize_crop(Image.fromarray(x, "RGB"), resize, crop, Image.BILINEAR, image_size)
         for x in items]
  if len({x.shape for x in out}) > 1:
    raise ValueError("images come out with different sizes; pass crop= or image_size=")
  batch = np.stack(out).astype(np.float32) / 255.0
  return (batch - IMAGENET_MEAN) / IMAGENET_STD


def preprocess_masks(masks: np.ndarray | Sequence[np.ndarray], resize: int | None = 256,
                     crop: int | None = 224, image_size: tuple[int, int] | None = None
                     ) -> np.ndarray:
  """The same geometry as `preprocess` for ground-truth masks, nearest resize.

  Args:
    masks: bool or uint8 (nonzero = anomalous) [N, H, W], one [H, W], a list of
      [H_i, W_i], or any of these with a trailing channel axis of 1.
    resize, crop, image_size: as in `preprocess`.

  Returns:
    [N, crop, crop] (or [N, H, W]) bool.
  """
  image_size = _check_sizes(resize, crop, image_size)
  if not isinstance(masks, (list, tuple)):
    masks = np.asarray(masks)
    if masks.ndim in (3, 4) and masks.shape[-1] == 1:
      masks = masks[..., 0]
  else:
    masks = [m[..., 0] if np.ndim(m) == 3 and np.shape(m)[-1] == 1 else m for m in masks]
  items = _as_list(masks, "masks", 2, None)
  out = []
  for i, item in enumerate(items):
    if item.dtype not in (np.uint8, np.bool_):
      raise ValueError(f"masks[{i}]: expected dtype bool or uint8, got {item.dtype}")
    image = Image.fromarray(np.where(item != 0, 255, 0).astype(np.uint8), "L")
    out.append(_resize_crop(image, resize, crop, Image.NEAREST, image_size) != 0)
  if len({x.shape for x in out}) > 1:
    raise ValueError("masks come out with different sizes; pass crop= or image_size=")
  return np.stack(out)
