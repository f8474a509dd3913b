r"""What tiling costs and gains: a small defect on a large strip, with and without tiles.

  python experiments/tiling_cost.py --resize=64,256 --tile_size=256 --tile_overlap=32

Synthetic 512 x 4096 strips (smooth stripes and a little noise, as a line-scan camera's
normal parts); one test strip carries a 16 x 16 pixel defect of dark and light squares
whose mean is the stripes' gray. The same detector (SPADE, efficientnet_lite0 with its
packaged ImageNet weights) is fitted on the training strips and scores the test strips
as a whole strip resized (its shorter side to each --resize) and as native-resolution
tiles (spade_jax.detector.tiling; --notiles: not). Prints a Markdown table: seconds per megapixel of
scoring (after a warm-up call, so compilation is not counted) and the defect strip's
score over the normal strip's, for each.
"""

from collections.abc import Sequence
import time

from absl import app, flags
import numpy as np

_TILE = flags.DEFINE_integer("tile_size", 256, "Tile side.")
_OVERLAP = flags.DEFINE_integer("tile_overlap", 32, "Tile overlap.")
_RESIZE = flags.DEFINE_list("resize", ["256"], "Shorter sides of the untiled inputs "
                            "(one row each).")
_TILES = flags.DEFINE_bool("tiles", True, "Also the tiled row.")
_TRAIN = flags.DEFINE_integer("num_train", 3, "Training strips.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Detector batch size.")

STRIP = (512, 4096)


def strips(n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  h, w = STRIP
  y, x = np.mgrid[:h, :w]
  gray = 128 + 50 * np.sin((x + y) / 5.0)
  out = gray[None, :, :, None] + rng.normal(0, 3, (n, h, w, 3))
  return np.clip(out, 0, 255).astype(np.uint8)


def timed_scores(score, images) -> tuple[np.ndarray, float]:
  score(images[:1])  # Warm-up: compile.
  start = time.perf_counter()
  scores = score(images)
  return scores, time.perf_counter() - start


def main(argv: Sequence[str]) -> None:
  del argv
  import spade_jax  # pylint: disable=import-outside-toplevel
  from spade_jax.detector import tiling  # pylint: disable=import-outside-toplevel
  train, test = strips(_TRAIN.value, 0), strips(2, 1)
  defect = np.full((16, 16, 3), 230, np.uint8)
  defect[:8, :8] = defect[8:, 8:] = 25
  test[1, 300:316, 2500:2516] = defect
  backbone = spade_jax.load_backbone("efficientnet_lite0", weights="imagenet")
  k = min(3, _TRAIN.value)
  megapixels = len(test) * STRIP[0] * STRIP[1] / 1e6
  rows = []
  for h in (int(r) for r in _RESIZE.value):
    whole = spade_jax.Spade(backbone, spade_jax.SpadeConfig(
        k_images=k, k_image_score=k, crop=None, image_size=(h, h * STRIP[1] // STRIP[0]),
        batch_size=_BATCH.value))
    index = whole.fit(train)
    scores, seconds = timed_scores(lambda x, d=whole, i=index: d.score(i, x)[0], test)
    rows.append((f"whole strip resized to {h}x{h * STRIP[1] // STRIP[0]}", seconds, scores))
  if not _TILES.value:
    _print(rows, megapixels)
    return
  tiles = tiling.TileConfig(_TILE.value, _OVERLAP.value)
  tiled = tiling.Tiled(spade_jax.Spade(backbone, spade_jax.SpadeConfig(
      k_images=k, k_image_score=k, batch_size=_BATCH.value)), tiles)
  index = tiled.fit(train)
  scores, seconds = timed_scores(lambda x: tiled.score(index, x)[0], test)
  count = len(tiling.tile_boxes(*STRIP, tiles))
  rows.append((f"tiles {tiles.tile_size}, overlap {tiles.tile_overlap} ({count} per strip)",
               seconds, scores))
  _print(rows, megapixels)


def _print(rows, megapixels: float) -> None:
  print("| input | s / megapixel (scoring) | defect score / normal score |")
  print("|---|---|---|")
  for name, seconds, scores in rows:
    print(f"| {name} | {seconds / megapixels:.2f} | {scores[1] / scores[0]:.2f} |")


if __name__ == "__main__":
  app.run(main)
