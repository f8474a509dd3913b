"""Evaluation settings (EvalConfig) and the checks a category must pass before any work.

Everything a user can get wrong is checked before any expensive work: the settings
(EvalConfig), the data folder and each category's files (both normal and anomalous
test images, enough training images for k_images), the output folder (created and
written to), and an existing results.json (a JSON object in this layout, written
with this config).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
import numbers
import os
import pathlib
from typing import Any

import numpy as np

from spade_jax.detector import KERNEL_METRICS, PadimConfig, PatchCoreConfig, SpadeConfig, tiling
from spade_jax.detector import ensemble as ensemble_lib
from spade_jax.features import geometry
from spade_jax.search import distances

_DEFAULT = SpadeConfig()
_PATCHCORE = PatchCoreConfig()
_PADIM = PadimConfig()
# Detectors evaluate.py runs: SPADE (detector/spade.py), PatchCore (detector/patchcore.py),
# PaDiM (detector/padim.py) and fused ensembles of them (detector/ensemble.py).
METHODS = ("spade", "patchcore", "padim", "ensemble")
# The settings each method's numbers depend on (recorded in results.json's "config").
_COMMON_KEYS = ("data_dir", "method", "backbone", "weights", "layers", "sigma", "metric",
                "resize", "crop")
_METHOD_KEYS = {
    "spade": ("k_images", "k_image_score", "kappa", "combine", "aggregate", "bandwidth"),
    "patchcore": ("coreset_ratio", "patch_size", "reweight"),
    "padim": ("num_features", "feature_seed", "regularization", "epsilon"),
    "ensemble": ("ensemble_members", "ensemble_combine", "ensemble_statistics",
                 "ensemble_folds"),
}
# Common settings a method does not use (not recorded for it): PaDiM has no metric, an
# ensemble's members have their own metrics and layers.
_UNUSED_KEYS = {"padim": ("metric",), "ensemble": ("layers", "metric")}


def _normalise_path(path: str | os.PathLike[str]) -> str:
  """`path` without trailing slashes, '.' parts or doubled slashes ('..' is kept)."""
  path = os.fspath(path)
  return str(pathlib.PurePath(path)) if path else path


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Everything that determines the numbers of an evaluation run.

  Validated on construction (the method's own config checks, and sigma finite, >= 0
  and at most crop, the anomaly map's side), so a bad setting fails before any work.
  data_dir is stored normalised (no trailing slash, no '.' parts), so equivalent
  spellings give equal configs. layers=None means the method's default (SPADE and
  PaDiM: layer1..3; PatchCore: layer2 + layer3). Only the settings of the chosen method
  are recorded (to_json): k_images, k_image_score, kappa, combine, aggregate and
  bandwidth for "spade"; coreset_ratio, patch_size and reweight for "patchcore" (with
  patchcore_json's image score and reduction); num_features, feature_seed,
  regularization and epsilon (null with "ledoit_wolf") for "padim", which records no
  metric (its distance is the Mahalanobis one). metric may name
  a kernel fitted on the training features (SPADE and PatchCore: KERNEL_METRICS, e.g.
  "mahalanobis"); aggregate ("mean", "softmin", "kde") and bandwidth (None: the median
  heuristic) are SPADE's (SpadeConfig). method "ensemble" (detector/ensemble.py) records
  ensemble_members (canonical METHOD:METRIC:BACKBONE[:LAYERS] texts; None:
  ensemble.DEFAULT_MEMBERS), ensemble_combine, ensemble_statistics and ensemble_folds,
  and no layers or metric (each member has its own); its members take backbone (when
  they name none), weights, sigma, resize, crop and image_size from here.

  Raises:
    ValueError: a setting out of range (the message names it).
  """
  data_dir: str
  backbone: str = "efficientnet_lite0"
  weights: str | None = "imagenet"
  k_images: int = _DEFAULT.k_images
  k_image_score: int = _DEFAULT.k_image_score
  kappa: int = _DEFAULT.kappa
  layers: tuple[str, ...] | None = None
  combine: str = _DEFAULT.combine
  sigma: float = _DEFAULT.sigma
  metric: str = _DEFAULT.metric
  aggregate: str = _DEFAULT.aggregate
  bandwidth: float | None = _DEFAULT.bandwidth
  resize: int = _DEFAULT.resize
  crop: int | None = _DEFAULT.crop
  method: str = "spade"
  coreset_ratio: float = _PATCHCORE.coreset_ratio
  patch_size: int = _PATCHCORE.patch_size
  reweight: bool = _PATCHCORE.reweight
  image_score: str | None = _PATCHCORE.image_score
  topk: int | None = _PATCHCORE.topk
  reduction: str = _PATCHCORE.reduction
  num_features: int | None = _PADIM.num_features
  feature_seed: int = _PADIM.feature_seed
  regularization: str = _PADIM.regularization
  epsilon: float = _PADIM.epsilon
  image_size: tuple[int, int] | None = None
  tile_size: int | None = None
  tile_overlap: int = 0
  tile_merge: str = "mean"
  tile_position_weight: float = 0.0
  ensemble_members: tuple[str, ...] | None = None
  ensemble_combine: str = "mean"
  ensemble_statistics: str = "mean_std"
  ensemble_folds: int = ensemble_lib.DEFAULT_FOLDS

  def __post_init__(self):
    if not isinstance(self.data_dir, (str, os.PathLike)):
      raise ValueError(f"EvalConfig.data_dir must be a path, got {self.data_dir!r}")
    object.__setattr__(self, "data_dir", _normalise_path(self.data_dir))
    if isinstance(self.weights, os.PathLike):
      object.__setattr__(self, "weights", os.fspath(self.weights))
    if self.method not in METHODS:
      raise ValueError(f"EvalConfig.method must be one of {METHODS}, got {self.method!r}")
    if self.method == "ensemble":  # Canonical member texts (a bad one names the flag).
      members = (ensemble_lib.DEFAULT_MEMBERS if self.ensemble_members is None
                 else self.ensemble_members)
      object.__setattr__(self, "ensemble_members",
                         tuple(m.text() for m in ensemble_lib.parse_members(members)))
    if self.layers is None:
      default = {"spade": _DEFAULT, "patchcore": _PATCHCORE, "padim": _PADIM,
                 "ensemble": _PATCHCORE}[self.method]
      object.__setattr__(self, "layers", default.layers)
    if isinstance(self.layers, (list, tuple)):
      object.__setattr__(self, "layers", tuple(self.layers))
    sigma = self.sigma
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
      raise ValueError(f"EvalConfig.sigma must be a number, got {sigma!r}")
    if not math.isfinite(sigma) or sigma < 0:
      raise ValueError(f"EvalConfig.sigma must be finite and >= 0 (0: no blur), got {sigma!r}")
    if isinstance(self.crop, numbers.Real) and not isinstance(self.crop, bool) \
        and sigma > self.crop:
      raise ValueError(
          f"EvalConfig.sigma={sigma!r} is wider than the anomaly maps: it must be at most "
          f"crop={self.crop} pixels (a wider blur only flattens the maps)")
    self.detector_config(batch_size=1)  # The method's checks (k's, layers, crop, ...).
    object.__setattr__(self, "image_size", geometry.check_image_size(self.image_size))
    if self.tile_size is not None:
      tiling.TileConfig(self.tile_size, self.tile_overlap, self.tile_merge,  # Checks them.
                        self.tile_position_weight)
      if self.tile_position_weight and self.method == "padim":
        raise ValueError("EvalConfig.tile_position_weight is for SPADE and PatchCore: "
                         "PaDiM's Gaussians already model each position of a tile")
      if self.crop is not None or self.image_size is not None:
        raise ValueError("EvalConfig.tile_size cuts the images into tiles at their native "
                         "resolution: it needs crop=None and no image_size")
      if self.method == "ensemble":
        raise ValueError("EvalConfig.tile_size: tiles are not supported with method "
                         "'ensemble' yet (drop --tile_size)")
    object.__setattr__(self, "sigma", float(sigma))
    if self.bandwidth is not None:
      object.__setattr__(self, "bandwidth", float(self.bandwidth))

  @property
  def tiles(self) -> tiling.TileConfig | None:
    """The tiling (detector.tiling), or None."""
    if self.tile_size is None:
      return None
    return tiling.TileConfig(self.tile_size, self.tile_overlap, self.tile_merge,
                             self.tile_position_weight)

  def spade_config(self, batch_size: int) -> SpadeConfig:
    return SpadeConfig(k_images=self.k_images, k_image_score=self.k_image_score,
                       kappa=self.kappa, layers=tuple(self.layers), combine=self.combine,
                       sigma=self.sigma, metric=self.metric, aggregate=self.aggregate,
                       bandwidth=self.bandwidth, resize=self.resize, crop=self.crop,
                       image_size=self.image_size, batch_size=batch_size)

  def patchcore_config(self, batch_size: int) -> PatchCoreConfig:
    check_patchcore_scoring(self.metric, self.aggregate, self.bandwidth)
    return PatchCoreConfig(layers=tuple(self.layers), patch_size=self.patch_size,
                           coreset_ratio=self.coreset_ratio, reweight=self.reweight,
                           image_score=self.image_score, topk=self.topk,
                           reduction=self.reduction,
                           metric=self.metric, sigma=self.sigma, resize=self.resize,
                           crop=self.crop, image_size=self.image_size,
                           batch_size=batch_size)

  def padim_config(self, batch_size: int) -> PadimConfig:
    check_padim_scoring(self.metric, self.aggregate, self.bandwidth)
    return PadimConfig(layers=tuple(self.layers), num_features=self.num_features,
                       feature_seed=self.feature_seed, regularization=self.regularization,
                       epsilon=self.epsilon, sigma=self.sigma, resize=self.resize,
                       crop=self.crop, image_size=self.image_size,
                       batch_size=batch_size)

  def member_settings(self, batch_size: int) -> dict[str, Any]:
    """The settings every ensemble member's config takes from this one."""
    return {"sigma": self.sigma, "resize": self.resize, "crop": self.crop,
            "image_size": self.image_size, "batch_size": batch_size}

  def ensemble_config(self, batch_size: int) -> ensemble_lib.EnsembleConfig:
    """The EnsembleConfig, after checking every member's config (ValueError naming
    --ensemble_members and the member)."""
    if self.aggregate != "mean" or self.bandwidth is not None:
      raise ValueError("aggregate / bandwidth are SPADE's (method 'spade'); an ensemble's "
                       "members use their methods' defaults: leave them unset")
    for spec in ensemble_lib.parse_members(self.ensemble_members):
      ensemble_lib.member_config(spec, **self.member_settings(batch_size))
    return ensemble_lib.EnsembleConfig(combine=self.ensemble_combine,
                                       statistics=self.ensemble_statistics,
                                       folds=self.ensemble_folds)

  def detector_config(self, batch_size: int):
    """The chosen method's config (ValueError naming a bad setting): a SpadeConfig,
    PatchCoreConfig, PadimConfig or (method "ensemble") EnsembleConfig."""
    if self.method == "ensemble":
      return self.ensemble_config(batch_size)
    if self.method == "spade":
      return self.spade_config(batch_size)
    if self.method == "padim":
      return self.padim_config(batch_size)
    return self.patchcore_config(batch_size)

  def make_detector(self, batch_size: int):
    """Loads the backbone and builds the chosen detector (spade_jax.Spade, PatchCore or
    Padim)."""
    import spade_jax  # pylint: disable=import-outside-toplevel
    config = self.detector_config(batch_size)  # Before the (slow) backbone load.
    if self.method == "ensemble":  # Each member's backbone, loaded once.
      return ensemble_lib.Ensemble.from_specs(
          self.ensemble_members, config, backbone=self.backbone, weights=self.weights,
          **self.member_settings(batch_size))
    backbone = spade_jax.load_backbone(self.backbone, weights=self.weights)
    detector = {"spade": spade_jax.Spade, "patchcore": spade_jax.PatchCore,
                "padim": spade_jax.Padim}[self.method]
    return detector(backbone, config)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layers"] = list(self.layers)
    if self.method == "padim" and self.regularization != "paper":
      d["epsilon"] = None  # Unused by Ledoit-Wolf: the numbers do not depend on it.
    keys = [k for k in _COMMON_KEYS if k not in _UNUSED_KEYS.get(self.method, ())]
    out = {key: d[key] for key in keys + list(_METHOD_KEYS[self.method])}
    if self.crop is None:  # Whole images: their size (None: each category's first image).
      out["image_size"] = None if self.image_size is None else list(self.image_size)
    if self.tile_size is not None:
      out.update(self.tiles.settings())
    if self.method == "patchcore":
      out.update(patchcore_json(self.patchcore_config(batch_size=1)))
    if self.method == "ensemble":
      out["ensemble_members"] = list(self.ensemble_members)
    return out


def patchcore_json(config: PatchCoreConfig) -> dict[str, Any]:
  """What results.json records of PatchCore's image score and reduction, besides
  coreset_ratio and patch_size: reweight as the config resolves it (also when
  image_score="reweight" chose it), image_score and topk with the top-k mean, and the
  reduction unless "adaptive_avg". Files from before the latter were recorded (max or
  reweighted scores, "adaptive_avg") thus keep their config."""
  out = {"reweight": bool(config.reweight)}
  if config.image_score_rule == "topk":
    out.update(image_score="topk", topk=config.topk)
  if config.reduction != "adaptive_avg":
    out["reduction"] = config.reduction
  return out


def check_patchcore_scoring(metric: str, aggregate: str, bandwidth: float | None) -> None:
  """PatchCore takes a fixed metric or a kernel fitted on its training patches, and
  scores a patch by its nearest bank entries with its own image score: no soft
  aggregate (SPADE's, method "spade").

  Raises:
    ValueError: naming the setting and the fix.
  """
  if metric not in distances.METRICS and metric not in KERNEL_METRICS:
    raise ValueError(
        f"metric {metric!r} is neither a metric {sorted(distances.METRICS)} nor a kernel "
        f"{sorted(KERNEL_METRICS)} (PatchCore takes both)")
  if aggregate != "mean" or bandwidth is not None:
    raise ValueError(
        f"aggregate={aggregate!r}, bandwidth={bandwidth!r}: the soft scores are SPADE's "
        "(method 'spade'); PatchCore scores by its nearest bank entries, so leave "
        "aggregate='mean' and bandwidth unset")


def check_padim_scoring(metric: str, aggregate: str, bandwidth: float | None) -> None:
  """PaDiM scores by the Mahalanobis distance to its Gaussians: no metric, no soft
  aggregate (SPADE's and PatchCore's settings left at their defaults).

  Raises:
    ValueError: naming the setting and the fix.
  """
  if metric != _DEFAULT.metric or aggregate != "mean" or bandwidth is not None:
    raise ValueError(
        f"metric={metric!r}, aggregate={aggregate!r}, bandwidth={bandwidth!r}: PaDiM "
        "(method 'padim') scores by the Mahalanobis distance to its per-position "
        "Gaussians, so leave metric, aggregate and bandwidth unset")


def check_test_labels(name: str, labels: Sequence[int], n_train: int,
                      config: EvalConfig) -> None:
  """Checks that a category's metrics are defined and its k's fit, before any work.

  AUROC and AU-PRO need both normal and anomalous test images; SPADE's k_images and
  k_image_score need that many training images, PaDiM two (a covariance per position;
  PatchCore's bank is checked at fit).

  Raises:
    ValueError: naming the category, the problem and the fix.
  """
  labels = np.asarray(labels)
  n_bad = int(np.count_nonzero(labels))
  n_good = int(labels.size - n_bad)
  leave_out = "or leave it out (--categories=...)"
  if n_bad == 0 or n_good == 0:
    missing, undefined = (("anomalous", "image AUROC, pixel AUROC and AU-PRO are")
                          if n_bad == 0 else ("normal ('good')", "image AUROC is"))
    raise ValueError(
        f"category {name!r} has no {missing} test image ({n_good} normal, {n_bad} "
        f"anomalous): {undefined} undefined; add {missing} test images {leave_out}")
  for key in _METHOD_KEYS[config.method]:
    if key in ("k_images", "k_image_score") and getattr(config, key) > n_train:
      raise ValueError(
          f"category {name!r} has {n_train} training images, fewer than {key}="
          f"{getattr(config, key)}; lower --{key} {leave_out}")
  if config.method == "padim" and n_train < 2:
    raise ValueError(
        f"category {name!r} has {n_train} training image(s); PaDiM needs at least 2 (a "
        f"covariance per position): add training images {leave_out}")
  if config.method == "ensemble" and n_train < config.ensemble_folds:
    raise ValueError(
        f"category {name!r} has {n_train} training image(s), fewer than the ensemble's "
        f"{config.ensemble_folds} held-out folds (--ensemble_folds): add training images "
        f"{leave_out}")


def check_masks(name: str, masks: np.ndarray) -> None:
  """Pixel AUROC and AU-PRO need an anomalous pixel in the (cropped) masks."""
  if not np.any(masks):
    raise ValueError(
        f"category {name!r}: every test mask is empty after resize and crop (no anomalous "
        "pixel): pixel AUROC and AU-PRO are undefined; check its ground_truth masks (and "
        "--resize/--crop, which may cut the defects off) or leave it out")
