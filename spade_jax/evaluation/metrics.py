"""MVTec AD evaluation metrics on the host (NumPy / SciPy).

* image_auroc / pixel_auroc: area under the ROC curve, ties counted half (the
  Mann-Whitney statistic with average ranks; identical to sklearn's roc_auc_score).
* au_pro: the official MVTec AD evaluation (Bergmann et al., `pro_curve_util.
  compute_pro` + `generic_util.trapezoid`): regions are 8-connected components of each
  mask (scipy.ndimage.label, 3x3 ones); at every distinct score threshold t (pixels with
  score >= t are positive), PRO(t) = mean over all regions of all images of the
  fraction of the region above t, FPR(t) = fraction of all anomaly-free pixels above t;
  the curve gets (0, 0) and (1, 1) appended, is integrated with the trapezoid rule
  from FPR 0 to fpr_limit (the endpoint linearly interpolated) and divided by
  fpr_limit.

Everything is one sort plus cumulative sums, so a category at full mask resolution
(e.g. 100 x 1024 x 1024 pixels) takes seconds, not a Python loop over thresholds.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _as_binary(labels, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.dtype != bool:
    if not np.isin(labels, (0, 1)).all():
      raise ValueError(f"{name} must be binary (0/1 or bool), got values "
                       f"{np.unique(labels)[:5]}")
    labels = labels.astype(bool)
  return labels


def _as_scores(scores, name: str) -> np.ndarray:
  scores = np.asarray(scores)
  if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype,
                                                                  np.complexfloating):
    raise ValueError(f"{name} must be real numbers, got dtype {scores.dtype}")
  if not np.isfinite(scores).all():
    raise ValueError(f"{name} contains NaN or Inf")
  return scores


def _sort_with_payload(scores: np.ndarray, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorts flat scores ascending and carries a payload along: (sorted scores, payload).

  float32 scores with a payload < 2**32 take a fast path: the score's bits are mapped
  to an order-preserving uint32 key and packed with the payload into one uint64, so a
  plain np.sort (several times faster than np.argsort on ~1e8 pixels) does the work.
  Order among equal scores is unspecified: callers group ties by float equality on
  the sorted scores (so -0.0 and +0.0, adjacent in key order, are one group). Other
  dtypes (float64 has no room for a payload) use argsort.
  """
  if scores.dtype == np.float32 and (payload.size == 0 or int(payload.max()) < 2**32):
    bits = scores.view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    key = np.where(negative, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    packed = np.sort((key << np.uint64(32)) | payload.astype(np.uint64))
    key = (packed >> np.uint64(32)).astype(np.uint32)
    negative = ~(key >> np.uint32(31)).astype(bool)
    bits = np.where(negative, ~key, key & np.uint32(0x7FFFFFFF))
    return bits.view(np.float32), (packed & np.uint64(0xFFFFFFFF)).astype(payload.dtype)
  order = np.argsort(scores)
  return scores[order], payload[order]


def _roc_auc(labels: np.ndarray, scores: np.ndarray, what: str) -> float:
  """AUROC of flat bool labels vs flat scores via average ranks (ties count 1/2)."""
  num_pos = int(labels.sum())
  num_neg = labels.size - num_pos
  if num_pos == 0 or num_neg == 0:
    raise ValueError(f"{what} needs both anomalous and normal samples; got {num_pos} "
                     f"anomalous and {num_neg} normal")
  sorted_scores, sorted_labels = _sort_with_payload(scores, labels.astype(np.uint8))
  # Average rank (1-based) of each group of equal scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], sorted_scores.size]
  group_rank = 0.5 * (starts + 1 + ends)
  group_of = np.repeat(np.arange(starts.size), ends - starts)
  pos_rank_sum = group_rank[group_of][sorted_labels.astype(bool)].sum(dtype=np.float64)
  u = pos_rank_sum - num_pos * (num_pos + 1) / 2.0
  return float(u / (num_pos * num_neg))


def image_auroc(labels, scores) -> float:
  """Image-level AUROC.

  Args:
    labels: [N] binary (1 / True = anomalous).
    scores: [N] float, higher = more anomalous.

  Returns:
    AUROC in [0, 1] (== sklearn.metrics.roc_auc_score(labels, scores)).
  """
  labels = _as_binary(labels, "labels")
  scores = _as_scores(scores, "scores")
  if labels.ndim != 1 or scores.shape != labels.shape:
    raise ValueError(f"labels and scores must both be [N]; got {labels.shape} and "
                     f"{scores.shape}")
  return _roc_auc(labels, scores, "image_auroc")


def _check_masks_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
  masks = _as_binary(masks, "masks")
  maps = _as_scores(maps, "maps")
  if masks.shape != maps.shape:
    raise ValueError(f"masks shape {masks.shape} differs from maps shape {maps.shape}; "
                     "resize the maps (or masks) to the same resolution first")
  if masks.ndim != 3:
    raise ValueError(f"masks and maps must be [N, H, W], got shape {masks.shape}")
  return masks, maps


def pixel_auroc(masks, maps) -> float:
  """Pixel-level AUROC over all pixels of all images.

  Args:
    masks: [N, H, W] binary ground truth.
    maps: [N, H, W] float anomaly maps, same shape.

  Returns:
    AUROC in [0, 1].
  """
  masks, maps = _check_masks_maps(masks, maps)
  return _roc_auc(masks.ravel(), maps.ravel(), "pixel_auroc")


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
  """The official (FPR, PRO) curve, one point per distinct score, plus (0,0), (1,1).

  Args:
    masks: [N, H, W] binary ground truth.
    maps: [N, H, W] float anomaly maps.

  Returns:
    (fprs, pros), both [P + 2] float64, FPR non-decreasing.
  """
  masks, maps = _check_masks_maps(masks, maps)
  # Global region ids: 0 = anomaly-free pixel, 1.. = regions of all images in turn.
  region_ids = np.zeros(masks.shape, np.int32)
  region_sizes = [np.zeros(1, np.int64)]
  num_regions = 0
  for i, mask in enumerate(masks):
    labeled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n:
      region_ids[i] = np.where(labeled > 0, labeled + num_regions, 0)
      region_sizes.append(np.bincount(labeled.ravel(), minlength=n + 1)[1:])
      num_regions += n
  num_ok = int(np.count_nonzero(region_ids == 0))
  if num_regions == 0:
    raise ValueError("au_pro needs at least one anomalous region in masks")
  if num_ok == 0:
    raise ValueError("au_pro needs at least one anomaly-free pixel in masks")
  sizes = np.concatenate(region_sizes).astype(np.float64)
  # Each region pixel contributes 1/|region| to its region's overlap fraction; the
  # running sum in descending score order is then sum over regions of the overlap.
  pixel_weight = np.where(sizes > 0, 1.0 / np.maximum(sizes, 1), 0.0)
  pixel_weight[0] = 0.0

  scores = maps.ravel()
  sorted_scores, ids = _sort_with_payload(scores, region_ids.ravel())
  sorted_scores, ids = sorted_scores[::-1], ids[::-1]  # Descending score order.
  fps = np.cumsum(ids == 0, dtype=np.float64)
  overlap = np.cumsum(pixel_weight[ids])
  # One point per threshold: keep the last pixel of each run of equal scores.
  keep = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
  fprs = np.minimum(fps[keep] / num_ok, 1.0)
  pros = np.minimum(overlap[keep] / num_regions, 1.0)
  return np.r_[0.0, fprs, 1.0], np.r_[0.0, pros, 1.0]


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
  """Trapezoid area under (x, y), x sorted ascending, cut at x_max (interpolated).

  Same semantics as MVTec's generic_util.trapezoid.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  correction = 0.0
  if x_max is not None:
    if not np.any(x == x_max):
      ins = int(np.searchsorted(x, x_max, side="right"))
      if not 0 < ins < len(x):
        raise ValueError(f"x_max={x_max} is outside the curve's range "
                         f"[{x[0]}, {x[-1]}]")
      y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (
          x[ins] - x[ins - 1])
      correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
  return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def au_pro(masks, maps, fpr_limit: float = 0.3) -> float:
  """Normalised area under the PRO curve up to `fpr_limit` (MVTec AD official).

  Args:
    masks: [N, H, W] binary ground truth (at the maps' resolution).
    maps: [N, H, W] float anomaly maps, higher = more anomalous.
    fpr_limit: integration limit on the FPR axis, in (0, 1].

  Returns:
    AU-PRO / fpr_limit, in [0, 1].
  """
  if not 0 < fpr_limit <= 1:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
  fprs, pros = pro_curve(masks, maps)
  return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit
