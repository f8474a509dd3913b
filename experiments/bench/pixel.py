"""Pixel scoring: seconds per test image of pixel_scores + anomaly_maps (no backbone).

Random features with a backbone's pyramid shapes (wide_resnet50_2 at 224 by default);
the memory section scores the same call (make_pixel_fn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import gc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import spade_jax

from . import common

TITLE = "Pixel scoring (no backbone)"


def pyramid_shapes(grid: int, channels: Sequence[int]) -> dict[str, tuple[int, int, int]]:
  """{'layer1': (grid, grid, C1), 'layer2': (grid/2, grid/2, C2), ...} (WRN50-2 at 224)."""
  return {f"layer{i + 1}": (grid >> i, grid >> i, c) for i, c in enumerate(channels)}


def pyramid_features(num_images: int, shapes: dict[str, tuple[int, int, int]],
                     seed: int) -> dict[str, jax.Array]:
  """Random features {level: [num_images, H, W, C]}, one seed per level."""
  return {level: common.random_normal(seed + i, (num_images, *shape))
          for i, (level, shape) in enumerate(shapes.items())}


def pixel_flops(shapes: dict[str, tuple[int, int, int]], k_images: int, combine: str) -> float:
  """Matmul FLOPs of one test image's pixel scores (2 * positions * gallery * depth)."""
  if combine == "cat":
    h, w, _ = max(shapes.values(), key=lambda s: s[0] * s[1])
    depth = sum(s[2] for s in shapes.values())
    return 2.0 * (h * w) * (k_images * h * w) * depth
  return sum(2.0 * (h * w) * (k_images * h * w) * c for h, w, c in shapes.values())


def make_pixel_fn(combine: str, k_images: int, num_test: int, shapes, image_size: int,
                  sigma: float, train_images: int | None = None) -> Callable[[], jax.Array]:
  """Inputs on the device + a call: pixel_scores of num_test images, then anomaly maps.

  The training set holds train_images (default k_images) images; each test image's K
  neighbours are spread evenly over it.
  """
  train_images = train_images or k_images
  test = pyramid_features(num_test, shapes, seed=10)
  train = pyramid_features(train_images, shapes, seed=20)
  nbrs = np.arange(k_images, dtype=np.int32) * (train_images // k_images)
  nbrs = jnp.asarray(np.tile(nbrs[None], (num_test, 1)))

  def run():
    scores = spade_jax.pixel_scores(test, train, nbrs, kappa=1, combine=combine,
                                    check_finite_inputs=False)
    return spade_jax.anomaly_maps(scores, (image_size, image_size), sigma=sigma)

  return run


def section(k_images: int, num_test: int, grid: int, channels: Sequence[int],
            combine_modes: Sequence[str], repeats: int, image_size: int = 224,
            sigma: float = 4.0) -> dict[str, Any]:
  """Seconds per test image of pixel_scores + anomaly_maps (no backbone), random features."""
  shapes = pyramid_shapes(grid, channels)
  rows = []
  for combine in combine_modes:
    run = make_pixel_fn(combine, k_images, num_test, shapes, image_size, sigma)
    timing = common.time_calls(run, repeats)
    flops = pixel_flops(shapes, k_images, combine)
    per_image = timing["median_s"] / num_test
    rows.append({"combine": combine, "k_images": k_images, "num_test": num_test,
                 "s_per_image": per_image, "gflop_per_image": flops / 1e9,
                 "gflops": common.gflops(flops, per_image), **timing})
    del run
    gc.collect()
  maps = common.random_normal(3, (num_test, grid, grid))
  map_timing = common.time_calls(
      lambda: spade_jax.anomaly_maps(maps, (image_size, image_size), sigma=sigma), repeats)
  return {"shapes": {k: list(v) for k, v in shapes.items()}, "image_size": image_size,
          "rows": rows, "anomaly_map_s_per_image": map_timing["median_s"] / num_test}


def markdown(r: dict[str, Any]) -> list[str]:
  """The levels line, the per-combine table and the anomaly-map time."""
  f = common.fmt
  rows = [[x["combine"], x["k_images"], x["num_test"], f(x["s_per_image"]),
           f(x["gflop_per_image"]), f(x["gflops"]), f(x["first_call_s"])]
          for x in r["rows"]]
  lines = [f"Levels {r['shapes']}, kappa 1, maps upsampled to {r['image_size']}^2 + "
           "Gaussian sigma 4 (included)."]
  lines += common.table(["combine", "K", "test images", "s / test image",
                         "matmul GFLOP / image", "GFLOP/s", "first call s"], rows)
  lines.append(f"\nAnomaly map alone (upsample + blur): "
               f"{r['anomaly_map_s_per_image'] * 1e3:.2f} ms / image.")
  return lines
