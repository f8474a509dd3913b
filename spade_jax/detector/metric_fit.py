"""What a kernel metric or a soft aggregate fits on SPADE's training features.

SpadeConfig.metric may name a kernel (KERNEL_METRICS: the scoring.variants with a
kernel) fitted per part, the pooled vectors ("pool") and each layer; "softmin" /
"kde" without a bandwidth take the median heuristic of the training images per part
(in the metric's units). fit_metric fits both by scoring.variants (fit_variant,
median_bandwidths), for Spade.fit / fit_kernels (spade.py) and for the calibration
(calibration.py, "pool" alone on each fold). PatchCoreConfig.metric may name the same
kernels, fitted once on all training patches (fit_patch_kernel, for patchcore.py).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from spade_jax.scoring import aggregate as aggregate_lib
from spade_jax.scoring import variants
from spade_jax.search import sharding

# SpadeConfig.metric names of fitted kernels (scoring.variants.VARIANTS with a kernel;
# "learned": Mahalanobis learned with optax); the other names are distances.METRICS.
KERNEL_METRICS = tuple(name for name, v in variants.VARIANTS.items() if v.kernel is not None)
AGGREGATES = aggregate_lib.AGGREGATES


def check_bandwidth(bandwidth: Any, aggregate: str) -> None:
  """SpadeConfig.bandwidth: None, or (with "softmin" / "kde") a finite number > 0."""
  if bandwidth is None:
    return
  if aggregate == "mean":
    raise ValueError(f"SpadeConfig.bandwidth={bandwidth!r} is only used by aggregate="
                     "'softmin' or 'kde'; leave it None with aggregate='mean'")
  if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.number)) \
      or not np.isfinite(bandwidth) or bandwidth <= 0:
    raise ValueError(f"SpadeConfig.bandwidth must be a finite number > 0 (or None: the "
                     f"median heuristic), got {bandwidth!r}")


def host_rows(gallery: Any) -> np.ndarray:
  """[M, ...] NumPy rows of a gallery (a ShardedGallery without its padding; with
  several processes, gathered from all of them: every process gets every row)."""
  if not isinstance(gallery, sharding.ShardedGallery):
    return np.asarray(gallery)
  if jax.process_count() == 1:
    return gallery.to_numpy()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.asarray(multihost_utils.process_allgather(gallery.data, tiled=True))
  valid = np.asarray(multihost_utils.process_allgather(gallery.valid, tiled=True))
  return data[valid]


def fit_metric(config: Any, train_pool: Any, train_features: dict[str, Any], *,
               kernels: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], dict[str, float]]:
  """The kernels and median bandwidths scoring with `config` needs, from training
  features (host or device arrays, unsharded).

  Args:
    config: a SpadeConfig; its metric, aggregate, bandwidth and combine say what is
      fitted.
    train_pool: [M, D] pooled training features.
    train_features: level -> [M, h, w, C]; {} fits the "pool" part alone (calibration).
    kernels: {part: kernel} already fitted for config.metric (reused, not refitted);
      None: fitted here when the metric is a kernel.

  Returns:
    ({part: kernel} (empty for a fixed metric), {part: h} (empty unless
    config.needs_bandwidths)), parts "pool" and the levels (or "cat").

  Raises:
    ValueError: a median bandwidth that is not > 0 (duplicate training images: pass
      SpadeConfig.bandwidth).
  """
  if not config.is_kernel:
    kernels = {}
  elif kernels is None:
    kernels = variants.fit_variant(config.metric, train_pool, train_features).kernels()
  if not config.needs_bandwidths:
    return kernels, {}
  metrics = kernels or {p: config.metric for p in ("pool", *train_features, "cat")}
  pool_h, level_h = variants.median_bandwidths(train_pool, train_features, metrics=metrics,
                                               combine=config.combine)
  bandwidths = {"pool": pool_h, **level_h}
  bad = {p: h for p, h in bandwidths.items() if not (np.isfinite(h) and h > 0)}
  if bad:
    raise ValueError(f"the median-heuristic bandwidths {bad} of aggregate="
                     f"{config.aggregate!r} are not > 0 (identical training images?); pass "
                     "SpadeConfig.bandwidth (--bandwidth)")
  return kernels, bandwidths


def fit_patch_kernel(metric: str, patches: Any) -> Any:
  """PatchCore's kernel of `metric` (KERNEL_METRICS) from its training patch features,
  by scoring.variants.fit_kernel: closed form or a heuristic ("mahalanobis": Ledoit-Wolf,
  ...), or learned with optax ("learned": held-out folds of whole images, never patches
  of one image).

  Args:
    metric: a name of KERNEL_METRICS.
    patches: [M, h, w, D] (host or device, unsharded) patch features of the M training
      images.

  Returns:
    The kernel (of [D] rows), on the default device.

  Raises:
    ValueError: an unknown metric, fewer than 3 images for "learned", degenerate
      features (the kernel family's own checks).
  """
  if metric not in KERNEL_METRICS:
    raise ValueError(f"metric {metric!r} is not a kernel; kernels: {list(KERNEL_METRICS)}")
  kernel, _ = variants.fit_kernel(metric, np.asarray(patches, np.float32))
  return kernel
