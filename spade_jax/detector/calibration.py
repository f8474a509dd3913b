"""A decision threshold from normal images alone, by cross-validation.

Without anomalous examples, the threshold is a high quantile of the scores that
*unseen normal* images get. The training images are split into `folds` contiguous
folds, in file order (folds = number of images: leave-one-out); each fold is scored
against a detector fitted on the other folds, so no image is scored against itself,
and the threshold is numpy.quantile(held-out scores, quantile) (linear interpolation).
At the default quantile 0.99, about 1% of new normal images are expected above it.

Held-out scores come from a gallery one fold smaller than the final index; SPADE's
image score (mean distance to the k nearest training images) can only shrink when
images are added, so leave-one-out (the default) is the closest estimate and fewer
folds err towards a higher threshold (fewer false alarms).

For SPADE the threshold is on the image score, which depends on the pooled features
and on (k_image_score, metric, aggregate, bandwidth) alone: Threshold.settings records
those (SpadeConfig.score_settings; older thresholds without aggregate and bandwidth
were "mean"'s), and the threshold holds for an index with any pixel settings
(k_images, kappa, sigma, ...). PatchCore's records PatchCoreConfig.score_settings,
PaDiM's PadimConfig.score_settings (regularization, epsilon, sigma: each fold refits
the Gaussians, and the image score is the maximum of the blurred map).
Threshold.check(config) refuses a config the threshold does not hold for; every
library path that applies a threshold (predict_folder, Threshold.anomalous) calls it.
Each fold scores as Spade.score does: with a kernel metric the pooled kernel, and
with "softmin" / "kde" without a bandwidth the median-heuristic bandwidth, are fitted
on the fold's training images (metric_fit), as Spade.fit fits them on all of them.

Tiled detectors (detector.tiling; fit.py --calibrate --tile_size): the features' rows
are tiles, `groups` names each row's image. The folds are folds of whole images (all
tiles of an image in one fold: no image is scored against its own tiles), each fold's
detector is fitted on the other images' tiles, and an image's held-out score is the
maximum of its tiles' scores, as Tiled.score scores it; num_images and folds count
images. The threshold holds for the tiling it was calibrated with (the index's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import json
import math
import numbers
from typing import Any

import numpy as np

from spade_jax import scoring
from spade_jax.detector import metric_fit
from spade_jax.detector.padim import Padim
from spade_jax.detector.spade import Spade
from spade_jax.host import progress as progress_lib
from spade_jax.scoring import variants

# score_fold(train_indices, held_out_indices) -> scores of the held-out images [len].
ScoreFold = Callable[[np.ndarray, np.ndarray], np.ndarray]


# Metrics whose kernel is learned with optax per fit: their calibration defaults to
# LEARNED_FOLDS folds instead of leave-one-out (one optax run per fold).
LEARNED_METRICS = ("learned",)
LEARNED_FOLDS = 5
# PatchCore's default folds: leave-one-out would select one coreset per training image.
PATCHCORE_FOLDS = 5
# PaDiM's default folds: each fold refits every position's Gaussian.
PADIM_FOLDS = 5
# Training images each fold's PaDiM needs: a covariance per position.
PADIM_MIN_IMAGES = 2


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A decision threshold on image scores, calibrated on normal images.

  Attributes:
    value: images scoring above it are called anomalous.
    quantile: which quantile of the held-out normal scores it is, in [0, 1].
    folds: cross-validation folds (folds == num_images: leave-one-out).
    num_images: normal images it was calibrated on.
    settings: the scoring settings the scores depend on (the detector config's
      score_settings(): SPADE's k_image_score, metric, aggregate and bandwidth;
      PatchCore's metric, k_nearest, reweight, coreset and patch settings; PaDiM's
      regularization, epsilon and sigma); the threshold only holds for scores made
      with them (check(), anomalous()).
  """
  value: float
  quantile: float
  folds: int
  num_images: int
  settings: dict[str, Any]

  def to_json(self) -> str:
    """Canonical JSON (sorted keys), as stored in an index file."""
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str, where: str) -> Threshold:
    """Parses and checks to_json's output.

    Raises:
      ValueError: not JSON, missing or extra fields, or a value out of range; the
        message starts with `where`.
    """
    try:
      obj = json.loads(text)
    except (ValueError, RecursionError) as e:
      raise ValueError(f"{where}: metadata field 'threshold' is not valid JSON ({e})") from None
    names = sorted(f.name for f in dataclasses.fields(cls))
    if not isinstance(obj, dict) or sorted(obj) != names:
      got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise ValueError(f"{where}: metadata field 'threshold' must be a JSON object with the "
                       f"fields {names}, got {got!r:.200}")
    value, quantile = obj["value"], obj["quantile"]
    folds, num_images = obj["folds"], obj["num_images"]

    def real(x):
      return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    def count(x):
      return isinstance(x, int) and not isinstance(x, bool)

    problems = []
    if not real(value):
      problems.append(f"value={value!r:.50} is not a finite number")
    if not real(quantile) or not 0 <= quantile <= 1:
      problems.append(f"quantile={quantile!r:.50} is not in [0, 1]")
    if not count(folds) or not count(num_images) or not 2 <= folds <= num_images:
      problems.append(f"folds={folds!r:.50}, num_images={num_images!r:.50} are not counts "
                      "with 2 <= folds <= num_images")
    if not isinstance(obj["settings"], dict):
      problems.append("settings is not an object")
    if problems:
      raise ValueError(f"{where}: metadata field 'threshold' is malformed: "
                       f"{'; '.join(problems)}")
    return cls(value=float(value), quantile=float(quantile), folds=folds,
               num_images=num_images, settings=dict(obj["settings"]))

  def conflicts(self, settings: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{name: (calibrated, given)} for the recorded settings that `settings` changes."""
    return {k: (v, settings[k]) for k, v in self.settings.items()
            if k in settings and settings[k] != v}

  def check(self, config: Any, where: str = "threshold") -> None:
    """Raises a ValueError unless this threshold holds for scores made with `config`.

    A threshold holds for the detector and the scoring settings it was calibrated
    with (config.score_settings(): SPADE's k_image_score, metric, aggregate and
    bandwidth; PatchCore's metric, k_nearest, reweight, ...; PaDiM's regularization,
    epsilon, sigma). A setting that an
    older threshold did not record is taken as that detector's default, which is what
    such thresholds were calibrated with (fit.py had no flag for it).

    Args:
      config: the scoring detector's config (SpadeConfig, PatchCoreConfig or
        PadimConfig).
      where: the caller, for the message.

    Raises:
      ValueError: a threshold of another detector, or settings that change the
        scores; names each setting, both values and the fix.
    """
    given = config.score_settings()
    unknown = sorted(set(self.settings) - set(dataclasses.asdict(config)))
    if unknown:
      raise ValueError(
          f"{where}: the threshold was calibrated for another detector (it records "
          f"{unknown}, which a {type(config).__name__} does not have); use the detector "
          "it was calibrated for, or calibrate this one")
    recorded = {**type(config)().score_settings(), **self.settings}
    changed = {k: (recorded[k], v) for k, v in given.items() if k in recorded
               and recorded[k] != v}
    if changed:
      listed = ", ".join(f"{k}={v!r} (calibrated with {c!r})"
                         for k, (c, v) in sorted(changed.items()))
      raise ValueError(
          f"{where}: the threshold does not hold for these scores: {listed}; score with "
          "the settings it was calibrated with, or recalibrate (fit.py --calibrate, "
          "spade_threshold / patchcore_threshold / padim_threshold) with these")

  def anomalous(self, scores: Any, config: Any) -> np.ndarray:
    """[N] bool: scores > value, for image scores made with `config` (check()ed first).

    Args:
      scores: [N] image scores (Spade.score / PatchCore.score / Padim.score).
      config: the config of the detector that made them (detector.config).
    """
    self.check(config, "Threshold.anomalous")
    return np.asarray(scores) > self.value


def check_calibration_args(num_images: int, quantile: float, folds: int | None,
                           min_train: int, what: str = "k_image_score") -> int:
  """Checks the arguments of a calibration; returns the number of folds used.

  Args:
    num_images: training images.
    quantile: in [0, 1].
    folds: >= 2, or None for leave-one-out; more folds than images is leave-one-out.
    min_train: images each fold's detector needs (SPADE: k_image_score), named `what`.

  Raises:
    ValueError: naming the argument and the fix.
  """
  if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not (
      0 <= quantile <= 1):
    raise ValueError(f"calibration quantile must be in [0, 1] (e.g. 0.99), got {quantile!r}")
  if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int)
                            or folds < 2):
    raise ValueError(f"calibration folds must be an int >= 2 (or None: leave-one-out), got "
                     f"{folds!r}")
  if num_images < 2:
    raise ValueError(f"calibration needs at least 2 training images, got {num_images}")
  folds = num_images if folds is None else min(folds, num_images)
  smallest_train = num_images - math.ceil(num_images / folds)
  if smallest_train < min_train:
    raise ValueError(
        f"calibration with {folds} folds fits each fold on as few as {smallest_train} of the "
        f"{num_images} training images, fewer than {what}={min_train}; use more folds (up "
        f"to {num_images}: leave-one-out), a smaller {what}, or more training images")
  return folds


# A learned kernel is fitted with held-out images (scoring.variants.learned_folds): each
# fold's detector needs at least this many training images.
LEARNED_MIN_IMAGES = variants.MIN_LEARNED_IMAGES


def calibration_folds(detector: Any, num_images: int, quantile: float = 0.99,
                      folds: int | None = None, groups: Any = None) -> int:
  """The folds a calibration of `detector` on num_images images runs, checked before any
  work (fit.py, fit_folder and the *_threshold functions all use it).

  folds None is the detector's default: leave-one-out for SPADE, LEARNED_FOLDS for
  SPADE with metric "learned" (one optax run per fold), PATCHCORE_FOLDS for PatchCore
  (one coreset, and kernel, per fold), PADIM_FOLDS for PaDiM (its Gaussians refitted per fold);
  more folds than images is leave-one-out.

  groups ([rows] int, tiles): row r of the features is a tile of image groups[r];
  the folds split the num_images images (never an image's tiles), and each fold's
  training rows (tiles) must be as many as its detector needs (grouped_folds).

  Raises:
    ValueError: see check_calibration_args; also a learned kernel (SPADE's or
      PatchCore's) whose folds would be fitted on fewer than LEARNED_MIN_IMAGES
      images, or PaDiM folds fitted on fewer than PADIM_MIN_IMAGES.
  """
  if groups is not None:
    return grouped_folds(detector, groups, quantile, folds)
  cfg = detector.config
  if isinstance(detector, Spade):
    learned = cfg.metric in LEARNED_METRICS
    if folds is None and learned:
      folds = LEARNED_FOLDS
    folds = check_calibration_args(num_images, quantile, folds, cfg.k_image_score)
    _check_learned_folds(cfg.metric, num_images, folds)
    return folds
  if isinstance(detector, Padim):
    folds = check_calibration_args(num_images, quantile,
                                   PADIM_FOLDS if folds is None else folds, 1,
                                   what="one training image")
    smallest_train = num_images - math.ceil(num_images / folds)
    if smallest_train < PADIM_MIN_IMAGES:
      raise ValueError(
          f"calibration with {folds} folds fits each fold's Gaussians on as few as "
          f"{smallest_train} of the {num_images} training images; PaDiM needs at least "
          f"{PADIM_MIN_IMAGES} (a covariance per position): use more folds (up to "
          f"{num_images}: leave-one-out) or more training images")
    return folds
  folds = check_calibration_args(num_images, quantile,
                                 PATCHCORE_FOLDS if folds is None else folds, 1,
                                 what="one training image")
  _check_learned_folds(cfg.metric, num_images, folds)
  return folds


def _default_folds(detector: Any) -> int | None:
  """calibration_folds' folds=None: None (leave-one-out) for SPADE, else the fixed count."""
  if isinstance(detector, Spade):
    return LEARNED_FOLDS if detector.config.metric in LEARNED_METRICS else None
  return PADIM_FOLDS if isinstance(detector, Padim) else PATCHCORE_FOLDS


def _min_rows(detector: Any) -> tuple[int, str]:
  """(rows each fold's detector is fitted on at least, what they are for)."""
  cfg = detector.config
  if isinstance(detector, Padim):
    return PADIM_MIN_IMAGES, "PaDiM's covariance per position"
  need, what = 1, "one training tile"
  if isinstance(detector, Spade):
    need, what = cfg.k_image_score, f"k_image_score={cfg.k_image_score}"
  if cfg.metric in LEARNED_METRICS and LEARNED_MIN_IMAGES > need:
    need, what = LEARNED_MIN_IMAGES, "the learned kernel (metric='learned')"
  return need, what


def image_groups(counts: Any) -> np.ndarray:
  """[sum(counts)] int: the image of each row, for images of counts[i] rows (tiles) each,
  in order."""
  counts = np.asarray(counts, np.int64)
  return np.repeat(np.arange(len(counts)), counts)


def grouped_folds(detector: Any, groups: Any, quantile: float = 0.99,
                  folds: int | None = None) -> int:
  """calibration_folds for rows grouped into images (tiles: groups[r] is row r's image,
  0 .. num_images - 1, each image's rows contiguous): folds of whole images (folds None:
  the detector's default, leave-one-out of images for SPADE), and every fold's training
  rows as many as the detector needs.

  Raises:
    ValueError: see check_calibration_args, or a fold fitted on too few tiles.
  """
  groups = np.asarray(groups)
  if groups.ndim != 1 or groups.size == 0 or not np.issubdtype(groups.dtype, np.integer) \
      or groups.min() < 0 or np.any(np.diff(groups) < 0):
    raise ValueError("groups must be [rows] image indices in order (each image's rows "
                     f"contiguous), got {groups!r:.200}")
  counts = np.bincount(groups)
  num_images = len(counts)
  folds = check_calibration_args(num_images, quantile,
                                 _default_folds(detector) if folds is None else folds, 0)
  need, what = _min_rows(detector)
  smallest = min(int(counts.sum() - counts[part].sum())
                 for part in np.array_split(np.arange(num_images), folds))
  if smallest < need:
    raise ValueError(
        f"calibration with {folds} folds of whole images fits each fold on as few as "
        f"{smallest} of the {int(counts.sum())} training tiles, fewer than {what} needs "
        f"({need}); use more folds (up to {num_images}: leave-one-out) or more training "
        "images")
  return folds


def _check_learned_folds(metric: str, num_images: int, folds: int) -> None:
  """A learned kernel (metric "learned") is refitted per fold on held-out images: each
  fold's training images must number at least LEARNED_MIN_IMAGES."""
  smallest_train = num_images - math.ceil(num_images / folds)
  if metric in LEARNED_METRICS and smallest_train < LEARNED_MIN_IMAGES:
    raise ValueError(
        f"calibration with {folds} folds fits each fold's learned kernel (metric="
        f"'learned') on as few as {smallest_train} of the {num_images} training images; "
        f"it needs at least {LEARNED_MIN_IMAGES}: add training images or use another "
        "metric")


def describe_folds(folds: int, num_images: int) -> str:
  """"leave-one-out" or "<folds>-fold", for log lines and reports."""
  return "leave-one-out" if folds == num_images else f"{folds}-fold"


def fold_splits(num_images: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """The (train indices, held-out indices) of each of `folds` contiguous folds of
  num_images images (numpy.array_split of the indices, in image order): every image is
  held out exactly once, and never among its own fold's training images."""
  indices = np.arange(num_images)
  return [(np.setdiff1d(indices, held_out, assume_unique=True), held_out)
          for held_out in np.array_split(indices, folds)]


def held_out_scores(score_fold: ScoreFold, num_images: int, folds: int,
                    groups: Any = None) -> np.ndarray:
  """[num_images] scores, each image's from a detector fitted without its fold.

  Folds are contiguous in image order (numpy.array_split of the indices). With groups
  ([rows] image of each row: tiles), the folds split the images, score_fold gets and
  scores rows (tiles), and an image's score is the maximum of its rows' scores (as
  Tiled.score scores an image).
  """
  scores = np.full(num_images, np.nan, np.float64)
  rows_of = None if groups is None else np.asarray(groups)
  report = progress_lib.Progress("calibration: scored", num_images)
  done = 0
  for train, held_out in fold_splits(num_images, folds):
    with progress_lib.quiet():
      if rows_of is None:
        scores[held_out] = np.asarray(score_fold(train, held_out), np.float64)
      else:
        held_rows = np.flatnonzero(np.isin(rows_of, held_out))
        train_rows = np.flatnonzero(~np.isin(rows_of, held_out))
        row_scores = np.asarray(score_fold(train_rows, held_rows), np.float64)
        best = np.full(num_images, -np.inf)
        np.maximum.at(best, rows_of[held_rows], row_scores)
        scores[held_out] = best[held_out]
    done += len(held_out)
    report.update(done)
  return scores


def spade_threshold(spade: Spade, train_pool: np.ndarray, *, quantile: float = 0.99,
                    folds: int | None = None, groups: Any = None
                    ) -> tuple[Threshold, np.ndarray]:
  """SPADE's threshold on image scores from its training images' pooled features.

  Args:
    spade: the detector (its config's k_image_score, metric, aggregate and bandwidth
      are used).
    train_pool: [N, D] float32 pooled features of the N training images (the index's
      train_pool, or Spade.extract's first output), in file order.
    quantile: the quantile of the held-out scores taken as the threshold.
    folds: cross-validation folds; None: leave-one-out, except for a learned kernel
      (metric "learned": every fold learns its kernel with optax, seconds each), where
      None means LEARNED_FOLDS folds.
    groups: tiles (detector.tiling): [N] the image of each row of train_pool, in
      order (image_groups); the folds are folds of whole images and an image's score
      is the maximum of its tiles' (held_out_scores). None: a row is an image.

  Returns:
    (Threshold, held-out scores [images] float64).

  Raises:
    ValueError: see check_calibration_args.
  """
  cfg = spade.config
  pool = np.asarray(train_pool, np.float32)
  if pool.ndim != 2:
    raise ValueError(f"train_pool must be [N, D], got shape {pool.shape}")
  num_images = _num_images(pool.shape[0], groups)
  folds = calibration_folds(spade, pool.shape[0], quantile, folds, groups)

  def score_fold(train: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    kernels, bandwidths = metric_fit.fit_metric(cfg, pool[train], {})  # "pool" alone.
    scores, _ = scoring.image_scores(pool[held_out], pool[train], cfg.k_image_score,
                                     kernels.get("pool", cfg.metric),
                                     aggregate=cfg.aggregate,
                                     bandwidth=bandwidths.get("pool", cfg.bandwidth))
    return np.asarray(scores)

  scores = held_out_scores(score_fold, num_images, folds, groups)
  return quantile_threshold(scores, quantile, folds, cfg.score_settings()), scores


def patchcore_threshold(patchcore, train_patches: np.ndarray, *, quantile: float = 0.99,
                        folds: int | None = None, groups: Any = None
                        ) -> tuple[Threshold, np.ndarray]:
  """PatchCore's threshold on image scores from its training images' patch features.

  Each fold's images are scored against a memory bank (coreset included) fitted on
  the other folds' patches, as PatchCore.fit_features fits the full one: with a
  kernel metric, the kernel too is refitted on each fold's training patches (and the
  fold's coreset selected in its space), so no held-out image shapes its scorer.

  Args:
    patchcore: the detector (spade_jax.PatchCore).
    train_patches: [N, h, w, D] patch features of the N training images
      (PatchCore.extract), in file order.
    quantile: the quantile of the held-out scores taken as the threshold.
    folds: cross-validation folds; None: PATCHCORE_FOLDS.
    groups: tiles: the image of each row, as in spade_threshold.

  Returns:
    (Threshold, held-out scores [N] float64).

  Raises:
    ValueError: see check_calibration_args.
  """
  return refit_threshold(patchcore, train_patches, "train_patches", "[N, h, w, D]",
                         quantile=quantile, folds=folds, groups=groups)


def padim_threshold(padim: Padim, train_embeddings: np.ndarray, *, quantile: float = 0.99,
                    folds: int | None = None, groups: Any = None
                    ) -> tuple[Threshold, np.ndarray]:
  """PaDiM's threshold on image scores from its training images' embeddings.

  Each fold's images are scored (the maximum of their blurred Mahalanobis maps, as
  Padim.score) against Gaussians fitted on the other folds' embeddings, as
  Padim.fit_features fits the full index.

  Args:
    padim: the detector (spade_jax.Padim; its config's regularization, epsilon and
      sigma are used and recorded).
    train_embeddings: [N, h, w, d] embeddings of the N training images (Padim.extract),
      in file order.
    quantile: the quantile of the held-out scores taken as the threshold.
    folds: cross-validation folds; None: PADIM_FOLDS.
    groups: tiles: the image of each row, as in spade_threshold.

  Returns:
    (Threshold, held-out scores [N] float64).

  Raises:
    ValueError: see calibration_folds.
  """
  return refit_threshold(padim, train_embeddings, "train_embeddings", "[N, h, w, d]",
                         quantile=quantile, folds=folds, groups=groups)


def refit_threshold(detector: Any, train_features: np.ndarray, name: str, layout: str, *,
                    quantile: float, folds: int | None, groups: Any = None
                    ) -> tuple[Threshold, np.ndarray]:
  """The threshold of a detector that refits everything per fold (PatchCore, PaDiM):
  each fold's images scored by detector.score_features against
  detector.fit_features of the other folds' features.

  Args:
    detector: a PatchCore or a Padim (its config's score_settings are recorded).
    train_features: [N, h, w, D] features of the N training images (its extract), in
      file order.
    name, layout: the argument's name and layout, for the message of a bad shape.
    quantile, folds, groups: as in patchcore_threshold.

  Returns:
    (Threshold, held-out scores [N] float64).
  """
  features = np.asarray(train_features, np.float32)
  if features.ndim != 4:
    raise ValueError(f"{name} must be {layout}, got shape {features.shape}")
  num_images = _num_images(features.shape[0], groups)
  folds = calibration_folds(detector, features.shape[0], quantile, folds, groups)

  def score_fold(train: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    index = detector.fit_features(features[train])
    scores, _ = detector.score_features(index, features[held_out])
    return np.asarray(scores)

  scores = held_out_scores(score_fold, num_images, folds, groups)
  return quantile_threshold(scores, quantile, folds, detector.config.score_settings()), scores


def quantile_threshold(scores: Any, quantile: float, folds: int,
                       settings: Mapping[str, Any]) -> Threshold:
  """The Threshold at numpy.quantile(scores, quantile) (linear interpolation) of the
  held-out image scores of len(scores) normal images, from `folds` folds, recorded with
  the scoring `settings` it holds for (every calibration ends here: spade_threshold,
  refit_threshold, Ensemble.threshold)."""
  scores = np.asarray(scores, np.float64)
  return Threshold(value=float(np.quantile(scores, quantile)), quantile=float(quantile),
                   folds=int(folds), num_images=int(scores.shape[0]), settings=dict(settings))


def _num_images(rows: int, groups: Any) -> int:
  """Images among `rows` feature rows: rows, or with groups (one per row) their count."""
  if groups is None:
    return int(rows)
  groups = np.asarray(groups)
  if groups.shape != (rows,):
    raise ValueError(f"groups must name the image of each of the {rows} rows, got shape "
                     f"{groups.shape}")
  return int(groups.max()) + 1
