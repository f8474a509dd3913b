"""Tiling (issue 19, part 3): the tile grid covers every pixel, maps are stitched back
(mean or max, against a brute-force NumPy placement), a 16-pixel defect on a 512 x 4096
strip stands out with tiles and much less without, the stitched map of a defect-free
image has no seams, and tiles on a mesh score as on one device.

A tiny fake backbone (spade_fake_backbone); tiles of 128 pixels.
"""

import jax
import numpy as np
import pytest
from spade_fake_backbone import FakeBackbone
from test_whole_image import smooth_images

import spade_jax
from spade_jax.detector import tiling

STRIP = (512, 4096)
TILE = tiling.TileConfig(tile_size=128, tile_overlap=32)
LAYERS = ("layer1", "layer2")


def spade(image_size=(128, 128), k_images=2):
  return spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
      k_images=k_images, k_image_score=2, layers=LAYERS, crop=None, image_size=image_size,
      batch_size=16))


def test_tile_grid_covers_every_pixel_once_or_more():
  for length, tile, overlap in [(4096, 128, 32), (300, 128, 0), (128, 128, 10), (129, 64, 63)]:
    starts = tiling.tile_grid(length, tile, overlap)
    covered = np.zeros(length, int)
    for s in starts:
      covered[s:s + tile] += 1
    assert covered.min() >= 1 and starts[0] == 0 and starts[-1] == length - tile
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_stitch_against_brute_force():
  rng = np.random.default_rng(0)
  h, w = 50, 70
  boxes = [(y, x) for y in tiling.tile_grid(h, 16, 5) for x in tiling.tile_grid(w, 16, 5)]
  maps = [rng.random((16, 16)).astype(np.float32) for _ in boxes]
  values = [[[] for _ in range(w)] for _ in range(h)]
  for m, (y, x) in zip(maps, boxes):
    for i in range(16):
      for j in range(16):
        # Weight: 1 inside, (distance to the tile's edge + 1) / (overlap + 1) near it.
        wi, wj = (min(1, (min(i, 15 - i) + 1) / 6) for i in (i, j))
        values[y + i][x + j].append((m[i, j], wi * wj))
  mean = np.array([[sum(v * c for v, c in p) / sum(c for _, c in p) for p in row]
                   for row in values])
  peak = np.array([[max(v for v, _ in p) for p in row] for row in values])
  plain = np.array([[np.mean([v for v, _ in p]) for p in row] for row in values])
  np.testing.assert_allclose(tiling.stitch(maps, boxes, h, w, "mean", 5), mean, rtol=1e-6)
  np.testing.assert_allclose(tiling.stitch(maps, boxes, h, w, "mean"), plain, rtol=1e-6)
  np.testing.assert_allclose(tiling.stitch(maps, boxes, h, w, "max"), peak, rtol=1e-6)


@pytest.mark.parametrize("merge", tiling.MERGES)
def test_stitcher_tile_batch_by_tile_batch_equals_stitch(merge):
  """Tiled.score_image's Stitcher (maps added a batch at a time, separable "mean"
  weights) gives stitch()'s map."""
  rng = np.random.default_rng(1)
  config = tiling.TileConfig(32, 7, merge)
  boxes = tiling.tile_boxes(70, 101, config)
  maps = [rng.random((32, 32)).astype(np.float32) for _ in boxes]
  stitcher = tiling.Stitcher(70, 101, config)
  for start in range(0, len(maps), 5):
    stitcher.add(maps[start:start + 5])
  np.testing.assert_allclose(stitcher.result(), tiling.stitch(maps, boxes, 70, 101, merge, 7),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="0 of 12 tiles added"):
    tiling.Stitcher(70, 101, config).result()


def test_bad_tile_settings_are_clear_errors():
  with pytest.raises(ValueError, match="tile_overlap=128 must be smaller than tile_size=128"):
    tiling.TileConfig(128, 128)
  with pytest.raises(ValueError, match="tile_size must be a positive int"):
    tiling.TileConfig(0)
  with pytest.raises(ValueError, match="tile_size=16 is smaller than the backbones' minimum"):
    tiling.TileConfig(16)
  with pytest.raises(ValueError, match="tile merge must be one of"):
    tiling.TileConfig(64, merge="median")
  with pytest.raises(ValueError, match=r"tile_size=128 is larger than the image \(100x400\)"):
    tiling.cut(np.zeros((100, 400, 3), np.uint8), TILE)


@pytest.fixture(name="strips", scope="module")
def fixture_strips():
  train = smooth_images(2, 10, STRIP)
  test = smooth_images(2, 11, STRIP)
  # A 16-pixel defect: 8-pixel dark and light squares, the stripes' mean gray on
  # average (resized to the strip's 64-pixel side, it fades into the stripes).
  defect = np.full((16, 16, 3), 230, np.uint8)
  defect[:8, :8] = defect[8:, 8:] = 25
  test[1, 300:316, 2500:2516] = defect
  return train, test


@pytest.fixture(name="tiled_run", scope="module")
def fixture_tiled_run(strips):
  train, test = strips
  tiled = tiling.Tiled(spade(), TILE)
  index = tiled.fit(train)
  scores, maps = tiled.score(index, test)
  return tiled, index, scores, maps


@pytest.mark.slow
def test_small_defect_on_a_strip_is_flagged_with_tiles_not_without(strips, tiled_run):
  train, test = strips
  _, _, scores, maps = tiled_run
  assert [m.shape for m in maps] == [STRIP] * 2
  tiled_gain = scores[1] / scores[0]
  y, x = np.unravel_index(np.argmax(maps[1]), STRIP)
  assert 290 <= y < 326 and 2490 <= x < 2526, (y, x)
  whole = spade((64, 512))  # The whole strip, resized: its shorter side to 64.
  plain = whole.score(whole.fit(train), test)[0]
  plain_gain = plain[1] / plain[0]
  assert tiled_gain > 1.5 and tiled_gain > plain_gain + 0.5, (tiled_gain, plain_gain)


@pytest.mark.slow
def test_stitched_map_of_a_normal_image_has_no_seams(tiled_run):
  """Across the tile borders the map moves no more than inside the tiles (bound: 1.5x
  the largest step between neighbouring pixels away from any border)."""
  _, _, _, maps = tiled_run
  m = maps[0]
  steps = np.abs(np.diff(m, axis=1))  # steps[:, j]: between columns j and j + 1.
  borders = set()
  for s in tiling.tile_grid(STRIP[1], TILE.tile_size, TILE.tile_overlap):
    borders |= {s - 1, s + TILE.tile_size - 1}  # A tile's first and last column.
  near = np.zeros(steps.shape[1], bool)
  for b in borders:
    near[max(0, b - 2):b + 3] = True
  assert steps[:, near].max() <= 1.5 * steps[:, ~near].max()


@pytest.mark.slow
def test_tiles_on_a_mesh_score_as_on_one_device(strips, tiled_run):
  train, test = strips
  tiled, _, scores, maps = tiled_run
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharded_index = tiled.fit(train, mesh=mesh)
  sharded, sharded_maps = tiled.score(sharded_index, test[1:])
  np.testing.assert_allclose(sharded, scores[1:], rtol=1e-5)
  # Distances near 0 differ by float32 rounding of the blocked products: atol relative
  # to the map's range.
  np.testing.assert_allclose(sharded_maps[0], maps[1], rtol=1e-4, atol=1e-3 * maps[1].max())
