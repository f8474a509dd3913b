"""Kernelized SPADE variants by name: fit on the training features, then score.

A variant says which kernel measures distances (one fitted per feature set: the
pooled vectors and each pyramid level, whose sizes differ) and how the k (kappa)
nearest distances become a score (aggregate.py):

    fitted = variants.fit_variant("mahalanobis", train_pool, train_features)
    scores, nbrs = image_scores(test_pool, train_pool, k, **fitted.image_kwargs())
    maps = pixel_scores(test_features, train_features, nbrs, kappa, **fitted.pixel_kwargs())

* "l2": SPADE (L2, mean);
* "mahalanobis", "linear", "rbf", "laplacian", "polynomial", "rff", "nystrom": the
  kernel of spade_jax.kernels of that name, from_features on each feature set;
* "learned": Mahalanobis whose shrinkage and bandwidth are learned with optax on the
  training features only (kernels.learn; default objective: likelihood
  cross-validation over 5 folds of images, min(5, M) with M < 5 training images and
  at least 3 of them: learned_folds; "synthetic": the pooled kernel learns from
  synthetic anomalies, whose features the caller passes);
* "softmin", "kde": L2 with the soft scores of aggregate.py, the bandwidth h set from
  the training images alone: the median distance of a training image (or of its
  positions) to its nearest other training image (median heuristic).

Everything is fitted from normal training features; no test image is seen.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

from absl import logging
import jax
import numpy as np

from spade_jax.scoring import api
from spade_jax.search import api as search_api
from spade_jax.search import kernels

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Variant:
  """kernel: a spade_jax.kernels name (None: L2); learned: fit with optax;
  aggregate: aggregate.AGGREGATES."""
  kernel: str | None = None
  learned: bool = False
  aggregate: str = "mean"


VARIANTS = {
    "l2": Variant(),
    "mahalanobis": Variant("mahalanobis"),
    "learned": Variant("mahalanobis", learned=True),
    "linear": Variant("linear"),
    "rbf": Variant("rbf"),
    "laplacian": Variant("laplacian"),
    "polynomial": Variant("polynomial"),
    "rff": Variant("rff"),
    "nystrom": Variant("nystrom"),
    "softmin": Variant(aggregate="softmin"),
    "kde": Variant(aggregate="kde"),
}
OBJECTIVES = ("loo", "synthetic")
# Folds of training images that the learned variants cross-fit over (fewer with fewer
# images: learned_folds).
LEARNED_FOLDS = 5
# The fewest training images of a learned variant: each fold's Mahalanobis covariance
# is estimated on the other images' pooled features, which needs 2 of them.
MIN_LEARNED_IMAGES = 3


def learned_folds(num_images: int) -> int:
  """The folds of images that metric="learned" cross-fits over with `num_images`
  training images: min(LEARNED_FOLDS, num_images). A pure check that callers can make
  before any feature extraction.

  Args:
    num_images: the number of training images (M).

  Returns:
    The number of folds F, 3 <= F <= LEARNED_FOLDS.

  Raises:
    ValueError: fewer than MIN_LEARNED_IMAGES (3) training images, or not an int.
  """
  if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)):
    raise ValueError(f"num_images must be an int, got {num_images!r}")
  if num_images < MIN_LEARNED_IMAGES:
    raise ValueError(
        f"metric='learned' needs at least {MIN_LEARNED_IMAGES} training images, got "
        f"{num_images}: it cross-fits its kernels over folds of training images, each "
        f"fold's covariance estimated on the pooled features of the other images (at "
        f"least 2 of them)")
  return int(min(LEARNED_FOLDS, num_images))


@dataclasses.dataclass(frozen=True)
class FittedVariant:
  """A variant's fitted metrics and bandwidths.

  Attributes:
    name: the variant's name.
    pool_metric: the metric of the image scores (a kernel, or a metric name).
    level_metrics: level -> the metric of its pixel scores.
    aggregate: "mean", "softmin" or "kde".
    pool_bandwidth: h of the image scores (None for "mean").
    level_bandwidths: level -> h of its pixel scores (None for "mean").
    losses: feature set -> the learning curve (learned variants).
  """
  name: str
  pool_metric: Any
  level_metrics: dict[str, Any]
  aggregate: str = "mean"
  pool_bandwidth: float | None = None
  level_bandwidths: dict[str, float] | None = None
  losses: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def image_kwargs(self) -> dict[str, Any]:
    """metric / aggregate / bandwidth keyword arguments of spade_jax.image_scores."""
    return {"metric": self.pool_metric, "aggregate": self.aggregate,
            "bandwidth": self.pool_bandwidth}

  def pixel_kwargs(self) -> dict[str, Any]:
    """metric / aggregate / bandwidth keyword arguments of spade_jax.pixel_scores
    ("ensemble": one metric and bandwidth per level)."""
    return {"metric": dict(self.level_metrics), "aggregate": self.aggregate,
            "bandwidth": None if self.level_bandwidths is None else dict(self.level_bandwidths)}

  def kernels(self) -> dict[str, Any]:
    """{"pool": metric, level: metric}: what kernels.kernel_to_arrays stores."""
    return {"pool": self.pool_metric, **self.level_metrics}


def median_bandwidths(train_pool: Any, train_features: Mapping[str, Any], *,
                      k_images: int = 5, max_images: int = 8,
                      metrics: Mapping[str, Any] | None = None,
                      combine: str = "ensemble") -> tuple[float, dict[str, float]]:
  """The median heuristic of the soft scores, from the training images alone: h of the
  image scores = the median distance of a training image to its nearest other one;
  h of a level = the median distance of a training image's positions to their nearest
  position in its k_images nearest other images (max_images images used).

  Args:
    train_pool: [M, D] pooled training features (M >= 2).
    train_features: level -> [M, h, w, C] training features (may be empty).
    k_images: nearest other images whose positions form a level's gallery.
    max_images: training images whose positions are scored (evenly spaced).
    metrics: part -> metric (a name, Metric or kernel) the distances are measured in:
      "pool" and each level ("ensemble") or "cat"; a missing part is L2.
    combine: "ensemble" (one h per level) or "cat" (one h, under the key "cat", for
      the concatenated levels, as pixel_scores(combine="cat") measures them).

  Returns:
    (h of the image scores, {level or "cat": h}), in the metrics' distance units.
  """
  metrics = dict(metrics or {})
  num = int(np.shape(train_pool)[0])
  if num < 2:
    raise ValueError("the soft scores' bandwidth needs at least 2 training images")
  dist, idx = search_api.knn(train_pool, train_pool, min(num, k_images + 1),
                             metrics.get("pool", "l2"))
  dist, idx = np.asarray(dist), np.asarray(idx)
  others = [row[row != i][:k_images] for i, row in enumerate(idx)]
  pool_h = float(np.median([d[row != i][0] for i, (d, row) in enumerate(zip(dist, idx))]))
  chosen = np.linspace(0, num - 1, min(num, max_images)).astype(int)
  nbrs = np.stack([others[i] for i in chosen]).astype(np.int32)
  levels = {}
  if combine == "cat" and train_features:
    maps = api.pixel_scores({l: np.asarray(f)[chosen] for l, f in train_features.items()},
                            dict(train_features), nbrs, combine="cat",
                            metric=metrics.get("cat", "l2"))
    levels["cat"] = float(np.median(np.asarray(maps)))
    return pool_h, levels
  for level, feats in train_features.items():
    maps = api.pixel_scores({level: np.asarray(feats)[chosen]}, {level: feats}, nbrs,
                            metric=metrics.get(level, "l2"))
    levels[level] = float(np.median(np.asarray(maps)))
  return pool_h, levels


def fit_kernel(name: str, features: Any, *, key: Array | None = None,
               objective: Any = None, steps: int = 100, learning_rate: float = 0.05
               ) -> tuple[Any, np.ndarray | None]:
  """The kernel of variant `name` for one feature set (what fit_variant fits per part).

  Args:
    name: a key of VARIANTS with a kernel (not "l2", "softmin", "kde").
    features: [M, ..., D] normal training features, rows grouped by image along the
      first axis (e.g. [M, h, w, C] patches): a learned kernel's held-out folds are
      whole images, never rows of one image (min(LEARNED_FOLDS, M) folds).
    key: PRNG key (random kernels, folds); default jax.random.key(0).
    objective: a learned kernel's objective; None: kernels.DEFAULT_OBJECTIVE over
      learned_folds(M) folds.
    steps, learning_rate: Adam's, for learned variants.

  Returns:
    (the kernel, the learning curve [steps] of a learned variant, else None).

  Raises:
    ValueError: an unknown name, one without a kernel, fewer than 3 images for a
      learned variant.
  """
  variant = VARIANTS.get(name) if isinstance(name, str) else None
  if variant is None or variant.kernel is None:
    raise ValueError(f"variant {name!r} has no kernel; variants with one: "
                     f"{sorted(n for n, v in VARIANTS.items() if v.kernel is not None)}")
  key = jax.random.key(0) if key is None else key
  if not variant.learned:
    return kernels.from_features(variant.kernel, features, key=key), None
  if objective is None:
    objective = dataclasses.replace(kernels.DEFAULT_OBJECTIVE,
                                    folds=learned_folds(int(np.shape(features)[0])))
  kernel, curve = kernels.learn(variant.kernel, features, objective=objective, steps=steps,
                                learning_rate=learning_rate, key=key)
  return kernel, np.asarray(curve)


def fit_variant(name: str, train_pool: Any, train_features: Mapping[str, Any], *,
                objective: str = "loo", steps: int = 100, learning_rate: float = 0.05,
                key: Array | None = None, anomalies: tuple[Any, Any] | None = None
                ) -> FittedVariant:
  """Fits variant `name` (VARIANTS) on normal training features.

  Args:
    name: a key of VARIANTS.
    train_pool: [M, D] pooled training features.
    train_features: level -> [M, h, w, C] training features.
    objective: "loo" (kernels.DEFAULT_OBJECTIVE) or "synthetic" (the pooled kernel
      learns from `anomalies`; the levels by "loo") for learned variants.
    steps, learning_rate: Adam's, for learned variants.
    key: PRNG key (random kernels, folds).
    anomalies: ([A, D] pooled features of synthetic anomalies of the training images,
      [A] their source images), for objective="synthetic".

  Returns:
    The FittedVariant.

  Raises:
    ValueError: unknown name or objective, missing anomalies, fewer than 3 training
      images for a learned variant (learned_folds).
  """
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  variant = VARIANTS[name]
  key = jax.random.key(0) if key is None else key
  feats = {"pool": train_pool, **train_features}
  losses = {}
  if variant.kernel is None:
    metrics = {part: "l2" for part in feats}
  elif not variant.learned:
    metrics = kernels.for_levels(variant.kernel, feats, key=key)
  else:
    num_images = int(np.shape(train_pool)[0])
    folds = learned_folds(num_images)
    if folds < LEARNED_FOLDS:
      logging.info("variant %r: %d training images, so %d folds instead of %d", name,
                   num_images, folds, LEARNED_FOLDS)
    metrics = {}
    for i, (part, x) in enumerate(feats.items()):
      part_key = jax.random.fold_in(key, i)
      goal = dataclasses.replace(kernels.DEFAULT_OBJECTIVE, folds=folds)
      if objective == "synthetic" and part == "pool":
        if anomalies is None:
          raise ValueError('objective="synthetic" needs the anomalies\' pooled features')
        # Its k nearest normal images come from the rest of a fold (its default k = 5).
        rest = num_images - num_images // folds
        goal = kernels.SyntheticAUROC(anomalies=np.asarray(anomalies[0]),
                                      sources=np.asarray(anomalies[1]), folds=folds,
                                      k=min(kernels.SyntheticAUROC.k, rest))
      metrics[part], losses[part] = fit_kernel(name, x, key=part_key, objective=goal,
                                               steps=steps, learning_rate=learning_rate)
  pool_h, level_h = None, None
  if variant.aggregate != "mean":
    pool_h, level_h = median_bandwidths(train_pool, train_features)
  return FittedVariant(name=name, pool_metric=metrics["pool"],
                       level_metrics={l: metrics[l] for l in train_features},
                       aggregate=variant.aggregate, pool_bandwidth=pool_h,
                       level_bandwidths=level_h, losses=losses)
