"""Image geometry: which part of a photo the detector sees, at what size, and the way back.

The detectors' configs bring every image to one backbone input of size (H, W) in one of
two ways (their `resize`, `crop` and `image_size` settings):

* crop=int (the MVTec protocol, evaluate.py's default: resize 256, crop 224): the
  shorter side is resized to `resize` (aspect kept, torchvision's rule), then the centre
  crop x crop square is kept. The rest of the photo is not inspected.
* crop=None (whole image; fit.py's and predict.py's default): every image is resized to
  image_size = (H, W), nothing is cut off. fit_folder, fit.py and evaluate.py choose
  image_size from the first training image when it is not given: its shorter side to
  `resize`, its aspect kept (aspect_size). An image of another aspect ratio is stretched
  to (H, W); the callers log how many were.

Anomaly maps are computed at (H, W) and brought back to each photo's own size with
`to_original` (bilinear, half-pixel centres, as torch's align_corners=False). With a
crop, only the crop's region of the photo has values; the rest is NaN (not inspected).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Size = tuple[int, int]
# The smallest whole-image input side: the backbones' coarsest stride (32), below which
# their last levels would have no position.
MIN_INPUT = 32


def _positive_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def check_image_size(image_size: Any, name: str = "image_size") -> Size | None:
  """`image_size` as a (H, W) tuple of ints, or None.

  Raises:
    ValueError: not None and not two positive ints (names `name`).
  """
  if image_size is None:
    return None
  if isinstance(image_size, (str, bytes)) or not isinstance(image_size, Sequence) \
      or len(image_size) != 2 or not all(_positive_int(v) for v in image_size):
    raise ValueError(f"{name} must be two positive ints (H, W), got {image_size!r}")
  return int(image_size[0]), int(image_size[1])


def parse_image_size(text: str, flag: str = "--image_size") -> Size | None:
  """'H,W' (or 'HxW') -> (H, W); '' or 'none' -> None. ValueError naming `flag`."""
  text = text.strip().lower()
  if text in ("", "none"):
    return None
  parts = text.replace("x", ",").split(",")
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = None
  if size is None or len(size) != 2 or min(size) < 1:
    raise ValueError(f"{flag} must be H,W with two positive ints (e.g. {flag}=256,384), got "
                     f"{text!r}")
  return size


def parse_crop(text: str | int | None, flag: str = "--crop") -> int | None:
  """'none' -> None (the whole image), '224' -> 224. ValueError naming `flag`."""
  if text is None or isinstance(text, (int, np.integer)) and not isinstance(text, bool):
    return None if text is None else int(text)
  text = str(text).strip().lower()
  if text == "none":
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{flag} must be a positive int or 'none' (the whole image, no crop), "
                     f"got {text!r}") from None


def check_geometry(owner: str, resize: Any, crop: Any, image_size: Any) -> Size | None:
  """Checks a config's resize / crop / image_size; returns image_size as a tuple.

  Raises:
    ValueError: resize or crop not a positive int (crop may be None), image_size not
      two positive ints, image_size with a crop, or a crop larger than resize.
  """
  if not _positive_int(resize):
    raise ValueError(f"{owner}.resize must be a positive int, got {resize!r}")
  if crop is not None and not _positive_int(crop):
    raise ValueError(f"{owner}.crop must be a positive int or None (the whole image), got "
                     f"{crop!r}")
  size = check_image_size(image_size, f"{owner}.image_size")
  if size is not None and crop is not None:
    raise ValueError(f"{owner}.image_size={size} resizes the whole image; it needs crop=None "
                     f"(got crop={crop})")
  if crop is not None and crop > resize:
    raise ValueError(f"{owner}.crop={crop} is larger than resize={resize}")
  if crop is None and min(size or (resize,)) < MIN_INPUT:
    what = f"image_size={size}" if size else f"resize={resize}"
    raise ValueError(f"{owner}.{what} is smaller than the backbones' minimum input side "
                     f"{MIN_INPUT} (their coarsest stride) for whole images")
  return size


def aspect_size(resize: int, height: int, width: int) -> Size:
  """(H, W) of an image of height x width with its shorter side resized to `resize`,
  the longer to int(resize * long / short) (torchvision's Resize(int))."""
  if min(height, width) < 1:
    raise ValueError(f"empty image, {height}x{width}")
  if height <= width:
    return resize, int(resize * width / height)
  return int(resize * height / width), resize


def input_size(owner: str, crop: int | None, image_size: Size | None) -> Size:
  """The backbone input (H, W) of a config: (crop, crop) or image_size.

  Raises:
    ValueError: crop=None without image_size (the size is chosen from the images by
      fit_folder / evaluate, or given).
  """
  if crop is not None:
    return crop, crop
  if image_size is None:
    raise ValueError(f"{owner}.crop=None (the whole image) needs image_size=(H, W), the one "
                     "size every image is resized to; fit_folder, fit.py and evaluate.py "
                     "take it from the first training image "
                     "(spade_jax.features.geometry.aspect_size)")
  return image_size


def feature_fields(owner: str, resize: int, crop: int | None,
                   image_size: Size | None) -> dict[str, Any]:
  """The geometry's part of a feature_config JSON: resize and crop, and image_size with
  crop=None (so a cropped config's JSON is what it was before image_size existed)."""
  fields: dict[str, Any] = {"resize": resize, "crop": crop}
  if crop is None:
    fields["image_size"] = list(input_size(owner, crop, image_size))
  return fields


def covered_box(height: int, width: int, resize: int, crop: int | None
                ) -> tuple[float, float, float, float]:
  """(top, left, box height, box width) in the photo's pixels of what the input shows:
  the whole photo with crop=None, else the centre crop's region (preprocessing's rule)."""
  if crop is None:
    return 0.0, 0.0, float(height), float(width)
  rh, rw = aspect_size(resize, height, width)
  top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
  sy, sx = height / rh, width / rw
  return top * sy, left * sx, crop * sy, crop * sx


def _taps(out_size: int, start: float, extent: float, in_size: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per output pixel along one axis: the two input taps, the second's weight, and
  whether the pixel lies inside the covered extent."""
  centre = np.arange(out_size, dtype=np.float64) + 0.5
  inside = (centre >= start) & (centre <= start + extent)
  src = np.clip((centre - start) / extent * in_size - 0.5, 0.0, in_size - 1)
  low = np.floor(src).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  return low, high, (src - low).astype(np.float32), inside


def to_original(anomaly_map: np.ndarray, height: int, width: int, *, resize: int,
                crop: int | None) -> np.ndarray:
  """An anomaly map at the input size, at the photo's own size.

  Args:
    anomaly_map: [H, W] float, the map of the input (crop x crop or image_size).
    height, width: the photo's size.
    resize, crop: the config's (crop=None: the map covers the whole photo, stretched
      back to its aspect if image_size changed it).

  Returns:
    [height, width] float32: bilinear (torch's align_corners=False) over the region the
    input covers; NaN outside it (with a crop: the uninspected border).
  """
  anomaly_map = np.asarray(anomaly_map, np.float32)
  if anomaly_map.ndim != 2:
    raise ValueError(f"anomaly_map must be [H, W], got shape {anomaly_map.shape}")
  top, left, box_h, box_w = covered_box(height, width, resize, crop)
  r0, r1, fy, rows_in = _taps(height, top, box_h, anomaly_map.shape[0])
  c0, c1, fx, cols_in = _taps(width, left, box_w, anomaly_map.shape[1])
  upper, lower = anomaly_map[r0], anomaly_map[r1]  # [height, W]
  fy = fy[:, None]
  rows = upper * (1 - fy) + lower * fy
  out = rows[:, c0] * (1 - fx) + rows[:, c1] * fx
  if not (rows_in.all() and cols_in.all()):
    out[~rows_in] = np.nan
    out[:, ~cols_in] = np.nan
  return out.astype(np.float32)
