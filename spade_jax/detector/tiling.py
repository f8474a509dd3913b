"""Tiling for large images: any detector, tile by tile, at the images' native resolution.

  tiled = Tiled(spade_jax.PatchCore(backbone, config), TileConfig(tile_size=256,
                                                                  tile_overlap=32))
  index = tiled.fit(train_images)              # every training tile is a training image
  scores, maps = tiled.score(index, images)    # maps: one [H_i, W_i] per image

An image of H x W is cut into tile_size x tile_size tiles, tile_overlap pixels shared by
neighbours, the last row and column of tiles flush with the image's edges (tile_grid):
no pixel is resized or left out. The detector (its config set to crop=None, image_size
= (T, T): every tile is one input, so one compiled program per tile size) is fitted on
the training images' tiles and scores each test tile through its public fit / score. A
tile's map lands where the tile came from; where tiles overlap the maps are averaged
with weights that fade each tile out across the overlap (merge="mean": no seams where
a tile's edge effects begin) or their maximum is kept ("max"). The image score is the maximum of its
tiles' scores (SPADE: each tile's image kNN runs against the training tiles).

Memory is bounded by the tiles scored at once (TILE_BATCHES x the detector's batch_size),
never by the image: a tile batch's features, plus the one stitched map of the image
(float32, H x W) on the host.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
from typing import Any

import numpy as np

from spade_jax.features import geometry

MERGES = ("mean", "max")
TILE_BATCHES = 4  # Tiles per detector.score call = this many detector batches.


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """How images are tiled.

  Attributes:
    tile_size: T, the side of the square tiles, in the images' own pixels.
    tile_overlap: O, the pixels neighbouring tiles share (0 <= O < T).
    merge: how overlapping tile maps combine: "mean" (weighted: stitch) or "max".
  """
  tile_size: int
  tile_overlap: int = 0
  merge: str = "mean"

  def __post_init__(self):
    if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, (int, np.integer)) \
        or self.tile_size < 1:
      raise ValueError(f"tile_size must be a positive int, got {self.tile_size!r}")
    if isinstance(self.tile_overlap, bool) or not isinstance(
        self.tile_overlap, (int, np.integer)) or self.tile_overlap < 0:
      raise ValueError(f"tile_overlap must be an int >= 0, got {self.tile_overlap!r}")
    if self.tile_overlap >= self.tile_size:
      raise ValueError(f"tile_overlap={self.tile_overlap} must be smaller than tile_size="
                       f"{self.tile_size}")
    if self.tile_size < geometry.MIN_INPUT:
      raise ValueError(f"tile_size={self.tile_size} is smaller than the backbones' minimum "
                       f"input side {geometry.MIN_INPUT}")
    if self.merge not in MERGES:
      raise ValueError(f"tile merge must be one of {MERGES}, got {self.merge!r}")

  def settings(self) -> dict[str, Any]:
    """What an index fitted on tiles records (JSON values)."""
    return {"tile_size": int(self.tile_size), "tile_overlap": int(self.tile_overlap),
            "tile_merge": self.merge}


def tile_grid(length: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of the tiles along one axis of `length` pixels: a step of
  tile - overlap, the last tile flush with the end (it may overlap more).

  Raises:
    ValueError: the axis is shorter than the tile.
  """
  if length < tile:
    raise ValueError(f"tile_size={tile} is larger than the image side {length}")
  starts = list(range(0, length - tile + 1, tile - overlap))
  if starts[-1] + tile < length:
    starts.append(length - tile)
  return starts


def tile_boxes(height: int, width: int, config: TileConfig) -> list[tuple[int, int]]:
  """(top, left) of every tile of a height x width image, row by row."""
  try:
    rows = tile_grid(height, config.tile_size, config.tile_overlap)
    cols = tile_grid(width, config.tile_size, config.tile_overlap)
  except ValueError:
    raise ValueError(f"tile_size={config.tile_size} is larger than the image "
                     f"({height}x{width}); choose a tile_size at most {min(height, width)} "
                     "or do not tile") from None
  return [(top, left) for top in rows for left in cols]


def cut(image: np.ndarray, config: TileConfig) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
  """The tiles of one [H, W, 3] image (views, no copy) and their (top, left)."""
  boxes = tile_boxes(image.shape[0], image.shape[1], config)
  t = config.tile_size
  return [image[y:y + t, x:x + t] for y, x in boxes], boxes


def ramp(tile: int, overlap: int) -> np.ndarray:
  """[tile] float64 weights of "mean" stitching along one axis: 1 inside, falling
  linearly to 1 / (overlap + 1) over the overlap at each edge, so a tile's map fades out
  where its neighbour's fades in (no seam where a tile's edge effects begin)."""
  i = np.arange(tile, dtype=np.float64)
  return np.minimum(1.0, (np.minimum(i, tile - 1 - i) + 1) / (overlap + 1))


def stitch(tile_maps: Sequence[np.ndarray], boxes: Sequence[tuple[int, int]],
           height: int, width: int, merge: str = "mean", overlap: int = 0) -> np.ndarray:
  """[height, width] float32 of the tiles' [T, T] maps placed at their boxes. Where tiles
  overlap: "mean" is their average weighted by ramp(T, overlap) along each axis (the
  plain average with overlap=0), "max" their maximum."""
  if merge == "max":
    out = np.full((height, width), -np.inf, np.float32)
    for m, (y, x) in zip(tile_maps, boxes):
      t0, t1 = m.shape
      np.maximum(out[y:y + t0, x:x + t1], m, out=out[y:y + t0, x:x + t1])
    return out
  total = np.zeros((height, width), np.float64)
  weight = np.zeros((height, width), np.float64)
  for m, (y, x) in zip(tile_maps, boxes):
    t0, t1 = m.shape
    w = np.outer(ramp(t0, overlap), ramp(t1, overlap))
    total[y:y + t0, x:x + t1] += w * m
    weight[y:y + t0, x:x + t1] += w
  return (total / weight).astype(np.float32)


def tiled_detector(detector: Any, config: TileConfig) -> Any:
  """`detector` with crop=None and image_size=(T, T): a tile is one input, not resized."""
  t = config.tile_size
  if detector.config.crop is None and detector.config.image_size == (t, t):
    return detector
  return type(detector)(detector.backbone,
                        dataclasses.replace(detector.config, crop=None, image_size=(t, t)))


class Tiled:
  """A detector (Spade, PatchCore, Padim) applied tile by tile (module docstring).

  Attributes:
    detector: the detector, its config set to the tiles' input (tiled_detector).
    tiles: the TileConfig.
  """

  def __init__(self, detector: Any, tiles: TileConfig):
    if not isinstance(tiles, TileConfig):
      raise ValueError(f"tiles must be a TileConfig, got {type(tiles).__name__}")
    self.tiles = tiles
    self.detector = tiled_detector(detector, tiles)

  @property
  def config(self):
    return self.detector.config

  def training_tiles(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every tile of every image ([T, T, 3] uint8 each), image by image."""
    out = []
    for image in images:
      out += cut(np.asarray(image), self.tiles)[0]
    return out

  def fit(self, train_images: np.ndarray | Sequence[np.ndarray], **kwargs) -> Any:
    """The detector's fit on the training images' tiles (kwargs: mesh=, axis=)."""
    return self.detector.fit(self.training_tiles(train_images), **kwargs)

  def _tile_batches(self, tiles: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
    step = TILE_BATCHES * self.config.batch_size
    for start in range(0, len(tiles), step):
      yield tiles[start:start + step]

  def score_image(self, index: Any, image: np.ndarray, **kwargs) -> tuple[float, np.ndarray]:
    """(score, map [H, W] float32) of one [H, W, 3] uint8 image, its tiles scored a tile
    batch at a time (kwargs: mesh=, axis=)."""
    image = np.asarray(image)
    tiles, boxes = cut(image, self.tiles)
    scores, maps = [], []
    for batch in self._tile_batches(tiles):
      s, m = self.detector.score(index, batch, **kwargs)
      scores.append(s)
      maps += list(m)
    merged = stitch(maps, boxes, image.shape[0], image.shape[1], self.tiles.merge,
                    self.tiles.tile_overlap)
    return float(np.max(np.concatenate(scores))), merged

  def score(self, index: Any, images: np.ndarray | Sequence[np.ndarray], **kwargs
            ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(scores [N] float32: each image's largest tile score, maps: N arrays [H_i, W_i]
    float32 at the images' own sizes)."""
    results = [self.score_image(index, image, **kwargs) for image in images]
    return (np.array([s for s, _ in results], np.float32), [m for _, m in results])
