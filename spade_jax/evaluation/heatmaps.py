"""Heatmap figures for anomaly maps, drawn with NumPy and written with PIL.

An evaluation figure (render_heatmap) is three panels side by side, separated by a
white gap:
  image | image with the ground-truth contour (red) | anomaly map (jet) over the image.
A prediction figure (render_prediction, no ground truth) is the first and last panel.
The image panels show the image as the detector saw it (model_view: resized and
centre-cropped), which is the frame the anomaly maps are in.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import PIL.Image
from scipy import ndimage

from spade_jax.host import atomic

CONTOUR_RGB = (255, 0, 0)
_GAP = 4  # White pixels between panels.
# Matplotlib's 'jet' as piecewise-linear ramps of (position, value) per channel.
_JET = {
    0: [(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)],
    1: [(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)],
    2: [(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)],
}


def _jet_lut() -> np.ndarray:
  x = np.linspace(0, 1, 256)
  lut = np.stack([np.interp(x, *zip(*_JET[c])) for c in range(3)], axis=-1)
  return np.rint(lut * 255).astype(np.uint8)


JET_LUT = _jet_lut()  # [256, 3] uint8.


def colormap(values: np.ndarray) -> np.ndarray:
  """[...] floats in [0, 1] (clipped) -> [..., 3] uint8 jet colours."""
  index = np.rint(np.clip(values, 0, 1) * 255).astype(np.intp)
  return JET_LUT[index]


def contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
  """[H, W] bool: the inner boundary, `width` px thick, of the regions of `mask`."""
  mask = np.asarray(mask) > 0
  return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3)), iterations=width)


def normalize(anomaly_map: np.ndarray, vmin: float | None = None,
              vmax: float | None = None) -> np.ndarray:
  """Maps [vmin, vmax] (default: the map's min and max) to [0, 1], clipped."""
  lo = float(anomaly_map.min()) if vmin is None else float(vmin)
  hi = float(anomaly_map.max()) if vmax is None else float(vmax)
  if hi <= lo:
    return np.zeros(anomaly_map.shape, np.float32)
  return np.clip((anomaly_map - lo) / (hi - lo), 0, 1).astype(np.float32)


def model_view(images_uint8: np.ndarray, *, resize: int, crop: int | None,
               image_size: tuple[int, int] | None = None) -> np.ndarray:
  """[N, crop, crop, 3] (crop=None: [N, H, W, 3], image_size) uint8: the images resized
  and centre-cropped as the detector sees them (spade_jax.preprocess without the
  normalisation), i.e. the maps' frame.

  images_uint8: [N, H, W, 3] uint8 or a list of [H_i, W_i, 3] uint8.
  """
  from spade_jax.features import preprocessing as pp  # pylint: disable=import-outside-toplevel
  x = pp.preprocess(images_uint8, resize=resize, crop=crop, image_size=image_size)
  x = x * np.asarray(pp.IMAGENET_STD, np.float32) + np.asarray(pp.IMAGENET_MEAN, np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _check_image_and_map(image: np.ndarray, anomaly_map: np.ndarray, alpha: float
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(image [H, W, 3] uint8, anomaly_map [H, W] float32), checked."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
  anomaly_map = np.asarray(anomaly_map, np.float32)
  if anomaly_map.shape != image.shape[:2]:
    raise ValueError(f"anomaly_map must be [H, W] = {image.shape[:2]}, got "
                     f"{anomaly_map.shape}")
  if not np.isfinite(anomaly_map).all():
    raise ValueError("anomaly_map holds NaN or infinite values")
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  return image, anomaly_map


def _overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float | None,
             vmax: float | None, alpha: float) -> np.ndarray:
  colours = colormap(normalize(anomaly_map, vmin, vmax)).astype(np.float32)
  return np.rint((1 - alpha) * image + alpha * colours).astype(np.uint8)


def render_prediction(image: np.ndarray, anomaly_map: np.ndarray, *,
                      vmin: float | None = None, vmax: float | None = None,
                      alpha: float = 0.5) -> np.ndarray:
  """image | anomaly map over the image: [H, 2 W + gap, 3] uint8 (see render_heatmap)."""
  image, anomaly_map = _check_image_and_map(image, anomaly_map, alpha)
  gap = np.full((image.shape[0], _GAP, 3), 255, np.uint8)
  return np.concatenate([image, gap, _overlay(image, anomaly_map, vmin, vmax, alpha)], axis=1)


def save_png(path: str | os.PathLike, figure: np.ndarray) -> pathlib.Path:
  """Writes an [H, W, 3] uint8 figure to `path` as PNG, atomically (parents created)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic.atomic_path(path) as tmp:
    PIL.Image.fromarray(figure).save(tmp, format="png")
  return path


def render_heatmap(image: np.ndarray, mask: np.ndarray | None, anomaly_map: np.ndarray,
                   *, vmin: float | None = None, vmax: float | None = None,
                   alpha: float = 0.5) -> np.ndarray:
  """The three-panel figure as an array.

  Args:
    image: [H, W, 3] uint8 (or [H, W] uint8 grayscale).
    mask: [H, W] ground truth (non-zero = anomalous), or None (no contour).
    anomaly_map: [H, W] float scores.
    vmin, vmax: the score range mapped to the colormap (default: the map's range).
    alpha: opacity of the colormap over the image.

  Returns:
    [H, 3 W + 2 gap, 3] uint8.
  """
  image, anomaly_map = _check_image_and_map(image, anomaly_map, alpha)
  with_contour = image.copy()
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
      raise ValueError(f"mask must be [H, W] = {image.shape[:2]}, got {mask.shape}")
    with_contour[contour(mask)] = CONTOUR_RGB
  overlay = _overlay(image, anomaly_map, vmin, vmax, alpha)
  gap = np.full((image.shape[0], _GAP, 3), 255, np.uint8)
  return np.concatenate([image, gap, with_contour, gap, overlay], axis=1)


def save_heatmap_png(path: str | os.PathLike, image: np.ndarray, mask: np.ndarray | None,
                     anomaly_map: np.ndarray, *, vmin: float | None = None,
                     vmax: float | None = None, alpha: float = 0.5) -> pathlib.Path:
  """Writes render_heatmap(...) to `path` as PNG, atomically; returns the path.

  Parent folders are created. The file appears complete or not at all (written to a
  temporary file in the same folder, then renamed).
  """
  figure = render_heatmap(image, mask, anomaly_map, vmin=vmin, vmax=vmax, alpha=alpha)
  return save_png(path, figure)
