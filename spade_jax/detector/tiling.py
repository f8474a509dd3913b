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
(float32, H x W, the output itself) on the host: each tile batch's maps are added into
it as they come (Stitcher; the "mean" weights are separable, two 1-D arrays).

Tile position as a feature (research option, TileConfig.position_weight > 0; off by
default): each tile's normalised centre (y, x) in [0, 1] of its image, times the
weight, is appended to every feature of the tile (SPADE: its pooled feature and every
level's patch features; PatchCore: every patch feature) before fitting and scoring, so
that a tiled gallery or memory bank compares a tile preferably with the training tiles
at the same place (a position difference d adds weight^2 |d|^2 to a squared L2
distance). PaDiM refuses it (its Gaussians already model each position).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from spade_jax.detector.ensemble import Ensemble
from spade_jax.detector.padim import Padim
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
    position_weight: > 0 appends each tile's normalised centre (y, x), times this
      weight, to its features (module docstring); 0 (the default): off.
  """
  tile_size: int
  tile_overlap: int = 0
  merge: str = "mean"
  position_weight: float = 0.0

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
    w = self.position_weight
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) \
        or w < 0:
      raise ValueError(f"tile_position_weight must be a finite number >= 0 (0: off), got "
                       f"{w!r}")
    object.__setattr__(self, "position_weight", float(w))

  def settings(self) -> dict[str, Any]:
    """What an index fitted on tiles records (JSON values; the position weight only
    when on, so indexes and results without it are as before)."""
    out = {"tile_size": int(self.tile_size), "tile_overlap": int(self.tile_overlap),
           "tile_merge": self.merge}
    if self.position_weight:
      out["tile_position_weight"] = self.position_weight
    return out


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


class Stitcher:
  """stitch() for one image's full tile grid (tile_boxes), tile batch by tile batch: the
  only H x W array is the float32 output; "mean"'s weights are separable (the grid's
  rows times its columns), kept as two 1-D arrays. Equals stitch() on the same tiles."""

  def __init__(self, height: int, width: int, config: TileConfig):
    self.config = config
    self.boxes = tile_boxes(height, width, config)
    self._done = 0
    t, o = config.tile_size, config.tile_overlap
    if config.merge == "max":
      self.out = np.full((height, width), -np.inf, np.float32)
      return
    self.out = np.zeros((height, width), np.float32)
    self._ramp = ramp(t, o)
    self._rows = np.zeros(height, np.float64)
    for y in tile_grid(height, t, o):
      self._rows[y:y + t] += self._ramp
    self._cols = np.zeros(width, np.float64)
    for x in tile_grid(width, t, o):
      self._cols[x:x + t] += self._ramp

  def add(self, tile_maps: Sequence[np.ndarray]) -> None:
    """The maps of the next len(tile_maps) tiles, in tile_boxes' order."""
    t = self.config.tile_size
    boxes = self.boxes[self._done:self._done + len(tile_maps)]
    self._done += len(tile_maps)
    for m, (y, x) in zip(tile_maps, boxes):
      view = self.out[y:y + t, x:x + t]
      if self.config.merge == "max":
        np.maximum(view, m, out=view)
      else:
        view += (np.outer(self._ramp, self._ramp) * m).astype(np.float32)

  def result(self) -> np.ndarray:
    """[H, W] float32, once every tile was added."""
    if self._done != len(self.boxes):
      raise ValueError(f"Stitcher: {self._done} of {len(self.boxes)} tiles added")
    if self.config.merge == "mean":
      for i, row in enumerate(self._rows):  # Row by row: no H x W temporary.
        self.out[i] /= (row * self._cols).astype(np.float32)
    return self.out


def tile_positions(height: int, width: int, boxes: Sequence[tuple[int, int]],
                   tile: int) -> np.ndarray:
  """[len(boxes), 2] float32: each tile's centre (y, x), as fractions of the image's
  height and width (in [0, 1])."""
  b = np.asarray(boxes, np.float64).reshape(-1, 2)
  return ((b + tile / 2) / np.array([height, width], np.float64)).astype(np.float32)


def with_positions(features: Any, positions: np.ndarray, weight: float) -> Any:
  """A detector's extract() output with weight * positions ([N, 2]) appended to every
  feature: Spade's (pool [N, D], {level: [N, h, w, C]}) -> D + 2 and C + 2; PatchCore's
  [N, h, w, D] -> D + 2."""
  pos = (weight * np.asarray(positions, np.float32)).astype(np.float32)

  def grid(x):
    x = np.asarray(x, np.float32)
    extra = np.broadcast_to(pos[:, None, None, :], (*x.shape[:3], 2))
    return np.concatenate([x, extra], axis=-1)

  if isinstance(features, tuple):
    pool, levels = features
    return (np.concatenate([np.asarray(pool, np.float32), pos], axis=-1),
            {l: grid(v) for l, v in levels.items()})
  return grid(features)


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
    if isinstance(detector, Ensemble):
      raise ValueError("tiles (--tile_size) are not supported with an ensemble yet: tile "
                       "its members one by one, or score the ensemble untiled")
    if tiles.position_weight and isinstance(detector, Padim):
      raise ValueError("tile_position_weight is for SPADE and PatchCore: PaDiM's Gaussians "
                       "already model each position of a tile (drop it or use another "
                       "method)")
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

  def _add_positions(self, features: Any, positions: np.ndarray) -> Any:
    if not self.tiles.position_weight:
      return features
    return with_positions(features, positions, self.tiles.position_weight)

  def extract(self, images: Sequence[np.ndarray]) -> tuple[Any, list[int]]:
    """(the detector's extract() of every tile of every image, image by image, with the
    tiles' positions appended when position_weight > 0; tiles per image)."""
    tiles, positions, counts = [], [], []
    for image in images:
      image = np.asarray(image)
      cuts, boxes = cut(image, self.tiles)
      tiles += cuts
      positions.append(tile_positions(image.shape[0], image.shape[1], boxes,
                                      self.tiles.tile_size))
      counts.append(len(cuts))
    return self._add_positions(self.detector.extract(tiles),
                               np.concatenate(positions)), counts

  def fit(self, train_images: np.ndarray | Sequence[np.ndarray], **kwargs) -> Any:
    """The detector's fit on the training images' tiles (kwargs: mesh=, axis=)."""
    if not self.tiles.position_weight:
      return self.detector.fit(self.training_tiles(train_images), **kwargs)
    features, _ = self.extract(train_images)
    return self.detector.fit_features(*feature_args(features), **kwargs)

  def _tile_batches(self, count: int) -> Iterator[slice]:
    step = TILE_BATCHES * self.config.batch_size
    for start in range(0, count, step):
      yield slice(start, start + step)

  def score_image(self, index: Any, image: np.ndarray, **kwargs) -> tuple[float, np.ndarray]:
    """(score, map [H, W] float32) of one [H, W, 3] uint8 image, its tiles scored a tile
    batch at a time and stitched as they come (kwargs: mesh=, axis=)."""
    image = np.asarray(image)
    tiles, boxes = cut(image, self.tiles)
    positions = tile_positions(image.shape[0], image.shape[1], boxes, self.tiles.tile_size)
    stitcher = Stitcher(image.shape[0], image.shape[1], self.tiles)
    best = -np.inf
    for rows in self._tile_batches(len(tiles)):
      if self.tiles.position_weight:
        features = self._add_positions(self.detector.extract(tiles[rows]), positions[rows])
        s, m = self.detector.score_features(index, *feature_args(features), **kwargs)
      else:
        s, m = self.detector.score(index, tiles[rows], **kwargs)
      best = max(best, float(np.max(s)))
      stitcher.add(list(m))
    return best, stitcher.result()

  def score(self, index: Any, images: np.ndarray | Sequence[np.ndarray], **kwargs
            ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(scores [N] float32: each image's largest tile score, maps: N arrays [H_i, W_i]
    float32 at the images' own sizes)."""
    results = [self.score_image(index, image, **kwargs) for image in images]
    return (np.array([s for s, _ in results], np.float32), [m for _, m in results])

  def assemble(self, tile_scores: np.ndarray, tile_maps: Sequence[np.ndarray],
               sizes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """score()'s output from the scores and maps of every tile of images of these
    (H, W) sizes, image by image in tile_boxes' order (e.g. score_features of extract's
    features)."""
    scores, maps, start = [], [], 0
    for h, w in sizes:
      stitcher = Stitcher(h, w, self.tiles)
      n = len(stitcher.boxes)
      stitcher.add(list(tile_maps[start:start + n]))
      scores.append(float(np.max(tile_scores[start:start + n])))
      maps.append(stitcher.result())
      start += n
    if start != len(tile_scores):
      raise ValueError(f"Tiled.assemble: {len(tile_scores)} tile scores for {start} tiles")
    return np.array(scores, np.float32), maps


def feature_args(features: Any) -> tuple:
  """A detector's extract() output as the arguments of its fit_features / score_features:
  Spade's (pool, {level: features}), or PatchCore's patches (PaDiM's embeddings) alone."""
  return features if isinstance(features, tuple) else (features,)
