"""Kernels: the cost of each kernel of spade_jax.kernels against L2, in the same run.

Two figures per kernel, with random features of a backbone's shapes
(efficientnet_lite0 at 224 by default) and kernels fitted on them
(kernels.from_features):

* knn: spade_jax.knn of one level's positions against K images' positions;
* pixel: seconds per test image of pixel_scores (one kernel per level, "ensemble")
  + anomaly maps, K training images.

The kernels take turns with L2 (common.time_interleaved), so the ratios to L2 are
measured under the same load. The CPU kernel serves every kernel searched as L2 on
transformed rows; the polynomial kernel's elementwise proxy runs in XLA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import spade_jax
from spade_jax import kernels

from . import common, pixel

TITLE = "Kernels: cost against L2 (same run)"
KERNEL_NAMES = ("l2", "mahalanobis", "linear", "rbf", "laplacian", "polynomial", "rff",
                "nystrom")


def _fit(name: str, features: np.ndarray, seed: int) -> Any:
  """The metric of `name` fitted on [N, ..., C] features (a sample of rows)."""
  if name == "l2":
    return "l2"
  rows = features.reshape(-1, features.shape[-1])
  rows = rows[np.random.default_rng(seed).choice(rows.shape[0], min(rows.shape[0], 20000),
                                                 replace=False)]
  return kernels.from_features(name, rows, key=jax.random.key(seed))


def section(names: Sequence[str], grid: int, channels: Sequence[int], k_images: int,
            num_test: int, knn_level: int, repeats: int, image_size: int = 224,
            sigma: float = 4.0) -> dict[str, Any]:
  """Seconds of knn and of pixel scoring per kernel, and their ratios to L2."""
  unknown = sorted(set(names) - set(KERNEL_NAMES))
  if unknown or "l2" not in names:
    raise ValueError(f"names must include l2 and come from {KERNEL_NAMES}, got {names}")
  shapes = pixel.pyramid_shapes(grid, channels)
  train = pixel.pyramid_features(k_images, shapes, seed=20)
  test = pixel.pyramid_features(num_test, shapes, seed=10)
  nbrs = jax.numpy.asarray(np.tile(np.arange(k_images, dtype=np.int32), (num_test, 1)))
  levels = list(shapes)
  level = levels[min(knn_level, len(levels) - 1)]
  h, w, c = shapes[level]
  queries = test[level][0].reshape(h * w, c)
  gallery = train[level].reshape(k_images * h * w, c)
  host = {l: np.asarray(v) for l, v in train.items()}
  metrics = {name: {l: _fit(name, host[l], seed=i) for l in levels}
             for i, name in enumerate(names)}

  def knn_fn(name):
    return lambda: spade_jax.knn(queries, gallery, 1, metrics[name][level],
                                 check_finite_inputs=False)

  def pixel_fn(name):
    def run():
      maps = spade_jax.pixel_scores(test, train, nbrs, kappa=1, metric=metrics[name],
                                    check_finite_inputs=False)
      return spade_jax.anomaly_maps(maps, (image_size, image_size), sigma=sigma)
    return run

  knn_t = common.time_interleaved({n: knn_fn(n) for n in names}, repeats)
  pixel_t = common.time_interleaved({n: pixel_fn(n) for n in names}, repeats)
  rows = []
  for name in names:
    rows.append({"kernel": name,
                 "knn_s": knn_t[name]["median_s"],
                 "knn_vs_l2": knn_t[name]["median_s"] / knn_t["l2"]["median_s"],
                 "knn_first_call_s": knn_t[name]["first_call_s"],
                 "pixel_s_per_image": pixel_t[name]["median_s"] / num_test,
                 "pixel_vs_l2": pixel_t[name]["median_s"] / pixel_t["l2"]["median_s"],
                 "pixel_first_call_s": pixel_t[name]["first_call_s"]})
  return {"shapes": {l: list(s) for l, s in shapes.items()}, "k_images": k_images,
          "num_test": num_test, "knn_shape": [h * w, k_images * h * w, c],
          "knn_level": level, "rows": rows}


def markdown(r: dict[str, Any]) -> list[str]:
  """The per-kernel table."""
  f = common.fmt
  q, m, d = r["knn_shape"]
  lines = [f"Levels {r['shapes']}, K = {r['k_images']}, kappa 1, {r['num_test']} test "
           f"image(s); knn: {q} queries x {m} rows of {d} ({r['knn_level']}), k = 1. Kernels "
           "fitted on the random training features (kernels.from_features); medians, taking "
           "turns with L2."]
  rows = [[x["kernel"], f(x["knn_s"]), f(x["knn_vs_l2"]), f(x["pixel_s_per_image"]),
           f(x["pixel_vs_l2"]), f(x["knn_first_call_s"]), f(x["pixel_first_call_s"])]
          for x in r["rows"]]
  lines += common.table(["kernel", "knn s", "knn / L2", "pixel s / image", "pixel / L2",
                         "knn first call s", "pixel first call s"], rows)
  return lines
