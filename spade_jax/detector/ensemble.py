"""Fused ensembles: several detectors (SPADE, PatchCore, PaDiM, each with its kernel,
layers and backbone), each standardised by its own held-out normal scores, combined.

  ensemble = Ensemble.from_specs("patchcore:l2:efficientnet_lite0,padim::efficientnet_lite1")
  index = ensemble.fit(train_images_uint8)        # EnsembleIndex, no hidden state
  scores, maps = ensemble.score(index, test_images_uint8)

Standardisation. A member's raw scores live on its own scale (an L2 distance, a
Mahalanobis distance, ...), so they are made comparable before they are combined. For
each member, `fit` splits the training images into `folds` contiguous folds of whole
images (calibration.fold_splits, the calibration's folds), refits the member on the
other folds and scores the held-out fold: every training image gets an image score and
an anomaly map from a detector that never saw it. From these held-out normal outputs:

  image statistics (c_m, s_m) of the N held-out image scores,
  pixel statistics (c'_m, s'_m) of all N x H x W held-out map pixels,

with (c, s) = (mean, standard deviation) ("mean_std", the default) or (median,
1.4826 x median absolute deviation) ("median_mad"). A test image's member outputs
become z_m = (score_m - c_m) / s_m and Z_m = (map_m - c'_m) / s'_m, and the ensemble's
outputs are their mean (combine="mean", the default) or maximum ("max") over the M
members. A scale below SCALE_FLOOR x max(1, |c|) (constant held-out outputs) is raised
to it. The final member indices are then fitted on all training images.

Maps of members with other input sizes are resized (bilinear, half-pixel centres) to
the ensemble's output size, the first member's input_size, before they are combined.

Member syntax (parse_members, evaluate.py --ensemble_members): members separated by
commas, each METHOD:METRIC:BACKBONE[:LAYERS] with
  METHOD   spade, patchcore or padim;
  METRIC   the member's metric or kernel (SpadeConfig / PatchCoreConfig.metric),
           empty: the method's default (PaDiM takes none: leave it empty);
  BACKBONE a backbone name, empty: the ensemble's default backbone;
  LAYERS   optional, levels joined by '+' (layer1+layer2+layer3), empty or absent:
           the method's default.
e.g. "patchcore:l2:efficientnet_lite0,padim::efficientnet_lite1:layer1+layer2".

A SPADE member whose k_images or k_image_score exceeds a fold's training images uses
that many in the fold (its final fit keeps its own).

Index folders: save_ensemble_index / load_ensemble_index (index_ensemble.py) store every member's
index file (index_file.save_index) and a JSON manifest of the statistics and the files'
SHA-256, atomically; loading reads JSON and safetensors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

from flax import struct
import jax
import numpy as np

from spade_jax.detector import calibration, common
from spade_jax.detector.padim import Padim, PadimConfig
from spade_jax.detector.patchcore import PatchCore, PatchCoreConfig
from spade_jax.detector.spade import Spade, SpadeConfig
from spade_jax.host import progress
from spade_jax.scoring import anomaly_map

Mesh = jax.sharding.Mesh

COMBINES = ("mean", "max")
STATISTICS = ("mean_std", "median_mad")
MEMBER_METHODS = ("spade", "patchcore", "padim")
DEFAULT_FOLDS = 5
# A held-out scale below SCALE_FLOOR * max(1, |centre|) is raised to it.
SCALE_FLOOR = 1e-6
# 1.4826 MAD is the standard deviation of a Gaussian.
MAD_TO_STD = 1.4826
FLAG = "--ensemble_members"


@dataclasses.dataclass(frozen=True)
class MemberSpec:
  """One member as parse_members reads it (None: the default)."""
  method: str
  metric: str | None = None
  backbone: str | None = None
  layers: tuple[str, ...] | None = None

  def text(self) -> str:
    """Canonical METHOD:METRIC:BACKBONE[:LAYERS] (parse_member's input)."""
    parts = [self.method, self.metric or "", self.backbone or ""]
    if self.layers:
      parts.append("+".join(self.layers))
    return ":".join(parts)


def parse_member(text: str, flag: str = FLAG) -> MemberSpec:
  """One member METHOD:METRIC:BACKBONE[:LAYERS] (module docstring).

  Raises:
    ValueError: naming `flag`, the member and what is wrong with it.
  """
  from spade_jax.features.backbones import BACKBONES  # pylint: disable=import-outside-toplevel
  from spade_jax.search import distances  # pylint: disable=import-outside-toplevel
  syntax = "METHOD:METRIC:BACKBONE[:LAYERS], e.g. patchcore:l2:efficientnet_lite0"
  parts = text.strip().split(":")
  if len(parts) not in (3, 4):
    raise ValueError(f"{flag}: member {text!r} must be {syntax} (3 or 4 fields separated "
                     f"by ':', got {len(parts)})")
  method, metric, backbone = (p.strip() for p in parts[:3])
  layers_text = parts[3].strip() if len(parts) == 4 else ""
  if method not in MEMBER_METHODS:
    raise ValueError(f"{flag}: member {text!r} has METHOD {method!r}; it must be one of "
                     f"{', '.join(MEMBER_METHODS)}")
  kernels = calibration.metric_fit.KERNEL_METRICS
  if method == "padim" and metric:
    raise ValueError(f"{flag}: member {text!r}: padim has no metric (Mahalanobis "
                     f"distances to its Gaussians); leave METRIC empty (padim::BACKBONE)")
  if metric and metric not in distances.METRICS and metric not in kernels:
    raise ValueError(f"{flag}: member {text!r} has METRIC {metric!r}; it must be a metric "
                     f"{sorted(distances.METRICS)} or a kernel {sorted(kernels)}, or empty")
  if backbone and backbone not in BACKBONES:
    raise ValueError(f"{flag}: member {text!r} has BACKBONE {backbone!r}; it must be one of "
                     f"{sorted(BACKBONES)}, or empty (the default --backbone)")
  layers = None
  if layers_text:
    layers = tuple(l.strip() for l in layers_text.split("+"))
    if not all(layers) or len(set(layers)) != len(layers):
      raise ValueError(f"{flag}: member {text!r} has LAYERS {layers_text!r}; they must be "
                       "distinct level names joined by '+', e.g. layer1+layer2+layer3")
  return MemberSpec(method, metric or None, backbone or None, layers)


def parse_members(members: str | Sequence[str], flag: str = FLAG) -> tuple[MemberSpec, ...]:
  """Members from "m1,m2,..." or a list of member texts (parse_member each).

  Raises:
    ValueError: no member, a bad one or a repeated one (names `flag`).
  """
  items = members.split(",") if isinstance(members, str) else list(members)
  items = [m for m in (i.strip() for i in items) if m]
  if not items:
    raise ValueError(f"{flag}: no members given; list at least one METHOD:METRIC:BACKBONE")
  specs = tuple(parse_member(m, flag) for m in items)
  seen = set()
  for spec in specs:
    if spec in seen:
      raise ValueError(f"{flag}: member {spec.text()!r} is listed twice")
    seen.add(spec)
  return specs


# The README's recommendation for faint defects (evaluate.py --method=ensemble without
# --ensemble_members), chosen by measurement on builtin_hard over defect seeds (README,
# "Ensembles"): PatchCore L2 on Lite0 and PatchCore with a Mahalanobis (whitened) patch
# space on Lite1, averaged.
DEFAULT_MEMBERS = (
    "patchcore:l2:efficientnet_lite0",
    "patchcore:mahalanobis:efficientnet_lite1",
)


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
  """How members are standardised and combined (module docstring).

  Attributes:
    combine: "mean" or "max" of the standardised member outputs.
    statistics: "mean_std" or "median_mad" of the held-out normal outputs.
    folds: folds of whole training images whose held-out outputs give each member's
      statistics (>= 2; more than the images: leave-one-out).
  """
  combine: str = "mean"
  statistics: str = "mean_std"
  folds: int = DEFAULT_FOLDS

  def __post_init__(self):
    if self.combine not in COMBINES:
      raise ValueError(f"EnsembleConfig.combine must be one of {COMBINES}, got "
                       f"{self.combine!r}")
    if self.statistics not in STATISTICS:
      raise ValueError(f"EnsembleConfig.statistics must be one of {STATISTICS}, got "
                       f"{self.statistics!r}")
    if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
      raise ValueError(f"EnsembleConfig.folds must be an int >= 2, got {self.folds!r}")

  def score_settings(self) -> dict[str, Any]:
    """The settings the ensemble's image score depends on besides its index: all three
    (a calibrated threshold records them, calibration.Threshold; the members and their
    statistics are the index's own)."""
    return dataclasses.asdict(self)


@struct.dataclass
class EnsembleIndex:
  """A fitted ensemble: the members' indices and their standardisation statistics.

  Attributes:
    indices: the M members' fitted indices (SpadeIndex, PatchCoreIndex, PadimIndex), in
      member order.
    image_center, image_scale: [M] float32 statistics of each member's held-out image
      scores.
    pixel_center, pixel_scale: [M] float32 statistics of each member's held-out map
      pixels.
    members: the members' names (Ensemble.names; static).
    statistics: EnsembleConfig.statistics they were computed with (static).
  """
  indices: tuple[Any, ...]
  image_center: Any
  image_scale: Any
  pixel_center: Any
  pixel_scale: Any
  members: tuple[str, ...] = struct.field(pytree_node=False)
  statistics: str = struct.field(pytree_node=False, default="mean_std")


def member_name(detector: Any) -> str:
  """METHOD:METRIC:BACKBONE:LAYERS of a member detector (its config's values)."""
  return _name(_method_of(detector), detector.config, detector.backbone.name)


def _name(method: str, config: Any, backbone: str) -> str:
  metric = "" if method == "padim" else config.metric
  return f"{method}:{metric}:{backbone}:{'+'.join(config.layers)}"


def resolved_names(members: str | Sequence[str], backbone: str, flag: str = FLAG
                   ) -> tuple[str, ...]:
  """The member_name of each member Ensemble.from_specs(members, backbone=backbone)
  builds (defaults filled in), without loading a backbone: what an EnsembleIndex's
  members are compared with.

  Raises:
    ValueError: a bad member (parse_members, member_config; names `flag`).
  """
  return tuple(_name(spec.method, member_config(spec), spec.backbone or backbone)
               for spec in parse_members(members, flag))


def _method_of(detector: Any) -> str:
  for cls, name in ((Spade, "spade"), (PatchCore, "patchcore"), (Padim, "padim")):
    if isinstance(detector, cls):
      return name
  raise ValueError(f"an ensemble member must be a Spade, PatchCore or Padim, got "
                   f"{type(detector).__name__}")


def statistics(values: np.ndarray, kind: str) -> tuple[float, float]:
  """(centre, scale) of held-out normal outputs (any shape; all values pooled).

  "mean_std": (mean, standard deviation); "median_mad": (median, 1.4826 x median
  absolute deviation). The scale is floored at SCALE_FLOOR x max(1, |centre|).
  """
  values = np.asarray(values, np.float64).ravel()
  if kind == "mean_std":
    center, scale = float(values.mean()), float(values.std())
  elif kind == "median_mad":
    center = float(np.median(values))
    scale = MAD_TO_STD * float(np.median(np.abs(values - center)))
  else:
    raise ValueError(f"statistics must be one of {STATISTICS}, got {kind!r}")
  return center, max(scale, SCALE_FLOOR * max(1.0, abs(center)))


def combine_outputs(scores: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                    index: EnsembleIndex, combine: str, size: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The ensemble's outputs from its members' raw ones.

  Args:
    scores: M arrays [N] of the members' image scores.
    maps: M arrays [N, h_m, w_m] of their anomaly maps.
    index: the statistics (image_center, ... [M]).
    combine: "mean" or "max".
    size: (H, W) output size; maps of another size are resized to it (bilinear).

  Returns:
    (scores [N] float32, maps [N, H, W] float32), NumPy.
  """
  z_maps = []
  for m, amap in enumerate(maps):
    amap = np.asarray(amap, np.float32)
    if amap.shape[-2:] != tuple(size):
      amap = np.asarray(anomaly_map.upsample_bilinear(amap, tuple(size)))
    z_maps.append((amap - np.float32(index.pixel_center[m]))
                  / np.float32(index.pixel_scale[m]))
  reduce = np.mean if combine == "mean" else np.max
  return (combine_scores(scores, index, combine),
          reduce(np.stack(z_maps), axis=0).astype(np.float32))


def combine_scores(scores: Sequence[np.ndarray], index: EnsembleIndex, combine: str
                   ) -> np.ndarray:
  """The ensemble's image scores [N] float32 from its M members' raw ones (M arrays
  [N]): the mean or max over members of (score_m - image_center[m]) / image_scale[m]."""
  z_scores = [(np.asarray(score, np.float64) - float(index.image_center[m]))
              / float(index.image_scale[m]) for m, score in enumerate(scores)]
  reduce = np.mean if combine == "mean" else np.max
  return reduce(np.stack(z_scores), axis=0).astype(np.float32)


def _take(features: Any, rows: np.ndarray) -> Any:
  """Rows of a member's extract() output (Spade's (pool, {level: ...}) or an array)."""
  return jax.tree.map(lambda x: np.asarray(x)[rows], features)


def _args(features: Any) -> tuple:
  return features if isinstance(features, tuple) else (features,)


def _fold_detector(detector: Any, num_train: int) -> Any:
  """SPADE with k_images / k_image_score at most a fold's images; others as they are."""
  if isinstance(detector, Spade):
    cfg = detector.config
    if max(cfg.k_images, cfg.k_image_score) > num_train:
      cfg = dataclasses.replace(cfg, k_images=min(cfg.k_images, num_train),
                                k_image_score=min(cfg.k_image_score, num_train))
      return Spade(detector.backbone, cfg)
  return detector


def held_out_outputs(detector: Any, features: Any, folds: int, *, mesh: Mesh | None = None,
                     axis: str = "data") -> tuple[np.ndarray, np.ndarray]:
  """Every training image's outputs from the detector refitted without its fold.

  Args:
    detector: a Spade, PatchCore or Padim.
    features: its extract() output for the N training images, in file order.
    folds: contiguous folds of whole images (calibration.fold_splits).
    mesh, axis: as the detector's fit_features / score_features.

  Returns:
    (scores [N] float64, maps [N, H, W] float32) of the held-out images.
  """
  num = int(np.shape(jax.tree.leaves(features)[0])[0])
  scores = np.full(num, np.nan, np.float64)
  maps = None
  kwargs = {} if mesh is None else {"mesh": mesh, "axis": axis}
  for train, held in calibration.fold_splits(num, folds):
    fold = _fold_detector(detector, len(train))
    with progress.quiet():
      index = fold.fit_features(*_args(_take(features, train)), **kwargs)
      s, m = fold.score_features(index, *_args(_take(features, held)), **kwargs)
    if maps is None:
      maps = np.zeros((num, *np.shape(m)[1:]), np.float32)
    scores[held], maps[held] = np.asarray(s, np.float64), np.asarray(m, np.float32)
  return scores, maps


class Ensemble:
  """Several detectors, standardised and combined. Holds no fitted state."""

  def __init__(self, members: Sequence[Any], config: EnsembleConfig | None = None):
    """members: Spade, PatchCore or Padim detectors (at least one), each with its own
    backbone and config."""
    self.members = tuple(members)
    self.config = EnsembleConfig() if config is None else config
    if not isinstance(self.config, EnsembleConfig):
      raise ValueError(f"config must be an EnsembleConfig, got {type(self.config).__name__}")
    if not self.members:
      raise ValueError("an Ensemble needs at least one member")
    self.names = tuple(member_name(d) for d in self.members)
    if len(set(self.names)) != len(self.names):
      raise ValueError(f"ensemble members repeat: {list(self.names)}")

  @classmethod
  def from_specs(cls, members: str | Sequence[str | MemberSpec] = DEFAULT_MEMBERS,
                 config: EnsembleConfig | None = None, *,
                 backbone: str = "efficientnet_lite0", weights: str | None = "imagenet",
                 load_backbone: Callable[..., Any] | None = None, **detector_settings
                 ) -> Ensemble:
    """An ensemble from member texts (module docstring; parse_members).

    Args:
      members: "m1,m2" or a sequence of texts / MemberSpec.
      config: EnsembleConfig.
      backbone: the backbone of members that name none.
      weights: every member backbone's weights (spade_jax.load_backbone).
      load_backbone: (name, weights=...) -> backbone; default spade_jax.load_backbone.
        Each backbone is loaded once, shared by the members that use it.
      **detector_settings: settings every member config has (resize, crop, sigma,
        image_size, batch_size).

    Raises:
      ValueError: a bad member (names --ensemble_members and the member).
    """
    if load_backbone is None:
      from spade_jax.features.backbones import load_backbone  # pylint: disable=import-outside-toplevel
    specs = (members if not isinstance(members, str) and members
             and all(isinstance(m, MemberSpec) for m in members) else parse_members(members))
    configs = [member_config(s, **detector_settings) for s in specs]  # Before any load.
    backbones: dict[str, Any] = {}
    detectors = []
    for spec, member_cfg in zip(specs, configs):
      name = spec.backbone or backbone
      if name not in backbones:
        backbones[name] = load_backbone(name, weights=weights)
      detector = {"spade": Spade, "patchcore": PatchCore, "padim": Padim}[spec.method]
      try:
        detectors.append(detector(backbones[name], member_cfg))
      except ValueError as e:
        raise ValueError(f"{FLAG}: member {spec.text()!r}: {e}") from None
    return cls(detectors, config)

  @property
  def output_size(self) -> tuple[int, int]:
    """(H, W) of the ensemble's maps: the first member's input_size."""
    return tuple(self.members[0].config.input_size)

  def with_whole_image_size(self, height: int, width: int) -> Ensemble:
    """Every member through common.with_whole_image_size (crop=None, no image_size)."""
    return Ensemble([common.with_whole_image_size(d, height, width) for d in self.members],
                    self.config)

  def _member_error(self, m: int, e: Exception) -> ValueError:
    return ValueError(f"ensemble member {m} ({self.names[m]}) failed: "
                      f"{type(e).__name__}: {e}")

  def check_folds(self, num_images: int, quantile: float = 0.5) -> int:
    """The folds fit runs on num_images training images (config.folds, at most one per
    image), checked before any work.

    Raises:
      ValueError: fewer than 2 images, or a quantile (of threshold) outside [0, 1].
    """
    return calibration.check_calibration_args(num_images, quantile, self.config.folds, 1,
                                              what="one training image")

  def extract(self, images: np.ndarray | Sequence[np.ndarray]) -> tuple[Any, ...]:
    """Each member's extract() output for `images` (a tuple, in member order)."""
    features = []
    for m, detector in enumerate(self.members):
      try:
        features.append(detector.extract(images))
      except Exception as e:  # pylint: disable=broad-exception-caught
        raise self._member_error(m, e) from e
    return tuple(features)

  def fit(self, train_images: np.ndarray | Sequence[np.ndarray], *, mesh: Mesh | None = None,
          axis: str = "data") -> EnsembleIndex:
    """Fits every member with its held-out statistics (module docstring).

    Args:
      train_images: [N, H, W, 3] uint8 normal images (or a list of [H, W, 3]), N >= 2.
      mesh, axis: as the members' fit (their galleries / positions sharded over it).

    Returns:
      EnsembleIndex.

    Raises:
      ValueError: too few images for the folds, or a member that fails (names it).
    """
    self.check_folds(len(train_images))
    return self.fit_features(self.extract(train_images), mesh=mesh, axis=axis)

  def fit_features(self, features: Sequence[Any], *, mesh: Mesh | None = None,
                   axis: str = "data") -> EnsembleIndex:
    """fit from extract()'s output (each member's features of the N training images)."""
    return self.fit_held_out(features, mesh=mesh, axis=axis)[0]

  def fit_held_out(self, features: Sequence[Any], *, mesh: Mesh | None = None,
                   axis: str = "data", log: Callable[[str], None] | None = None
                   ) -> tuple[EnsembleIndex, np.ndarray]:
    """fit_features, also returning the members' held-out image scores (threshold's input).

    Args:
      features: extract()'s output for the N training images, in file order.
      mesh, axis: as in fit.
      log: a line per member as its fits start (None: quiet).

    Returns:
      (EnsembleIndex, [M, N] float64: member m's score of training image n from the
      member refitted without n's fold).
    """
    kwargs = {} if mesh is None else {"mesh": mesh, "axis": axis}
    indices, stats, held_out = [], [], []
    for m, (detector, member_features) in enumerate(zip(self.members, features,
                                                        strict=True)):
      try:
        num = int(np.shape(jax.tree.leaves(member_features)[0])[0])
        folds = self.check_folds(num)
        if log is not None:
          log(f"ensemble member {m + 1}/{len(self.members)} ({self.names[m]}): {folds} "
              "held-out fits, then the fit on all images")
        scores, maps = held_out_outputs(detector, member_features, folds, **kwargs)
        stats.append(statistics(scores, self.config.statistics)
                     + statistics(maps, self.config.statistics))
        held_out.append(scores)
        indices.append(detector.fit_features(*_args(member_features), **kwargs))
      except Exception as e:  # pylint: disable=broad-exception-caught
        raise self._member_error(m, e) from e
    stats = np.asarray(stats, np.float32)
    index = EnsembleIndex(indices=tuple(indices), image_center=stats[:, 0],
                          image_scale=stats[:, 1], pixel_center=stats[:, 2],
                          pixel_scale=stats[:, 3], members=self.names,
                          statistics=self.config.statistics)
    return index, np.stack(held_out)

  def threshold(self, index: EnsembleIndex, held_out: np.ndarray, quantile: float = 0.99
                ) -> tuple[calibration.Threshold, np.ndarray]:
    """A decision threshold on the ensemble's image scores, from normal images alone.

    Each training image's combined score (combine_scores, with the index's statistics)
    of its members' held-out scores (fit_held_out: the members refitted without its
    fold, the folds of the standardisation); the threshold is their `quantile`
    (numpy.quantile, as calibration's), recorded with config.score_settings() and the
    folds used.

    Args:
      index: fit_held_out's index.
      held_out: fit_held_out's [M, N] held-out member scores.
      quantile: in [0, 1].

    Returns:
      (calibration.Threshold, the N combined held-out scores [N] float32).
    """
    self.check_index(index)
    held_out = np.asarray(held_out, np.float64)
    if held_out.ndim != 2 or held_out.shape[0] != len(self.members):
      raise ValueError(f"held_out must be [{len(self.members)}, N] (fit_held_out's), got "
                       f"shape {held_out.shape}")
    folds = self.check_folds(held_out.shape[1], quantile)
    combined = combine_scores(held_out, index, self.config.combine)
    return calibration.quantile_threshold(combined, quantile, folds,
                                          self.config.score_settings()), combined

  def check_index(self, index: EnsembleIndex) -> None:
    """Raises a ValueError unless `index` is an EnsembleIndex fitted for these members."""
    if not isinstance(index, EnsembleIndex):
      raise ValueError(f"index must be an EnsembleIndex, got {type(index).__name__}")
    if tuple(index.members) != self.names:
      raise ValueError(f"Ensemble.score: the index was fitted for members "
                       f"{list(index.members)}, this ensemble has {list(self.names)}; refit")

  def member_outputs(self, index: EnsembleIndex, images: np.ndarray | Sequence[np.ndarray], *,
                     mesh: Mesh | None = None, axis: str = "data"
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each member's raw (scores [N], maps [N, H_m, W_m]) of test images."""
    self.check_index(index)
    kwargs = {} if mesh is None else {"mesh": mesh, "axis": axis}
    scores, maps = [], []
    for m, (detector, member_index) in enumerate(zip(self.members, index.indices)):
      try:
        s, a = detector.score(member_index, images, **kwargs)
      except Exception as e:  # pylint: disable=broad-exception-caught
        raise self._member_error(m, e) from e
      scores.append(np.asarray(s))
      maps.append(np.asarray(a))
    return scores, maps

  def score(self, index: EnsembleIndex, images: np.ndarray | Sequence[np.ndarray], *,
            mesh: Mesh | None = None, axis: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Image scores and anomaly maps of test images: the members' standardised outputs,
    combined.

    Args:
      index: from fit.
      images: [N, H, W, 3] uint8 (or a list of [H, W, 3]).
      mesh, axis: as the members' score.

    Returns:
      (scores [N] float32, maps [N, H, W] float32) NumPy, (H, W) = output_size.
    """
    scores, maps = self.member_outputs(index, images, mesh=mesh, axis=axis)
    return combine_outputs(scores, maps, index, self.config.combine, self.output_size)


def member_config(spec: MemberSpec, **settings) -> SpadeConfig | PatchCoreConfig | PadimConfig:
  """The detector config of one member: its method's defaults, its metric and layers,
  and the shared `settings` (resize, crop, sigma, image_size, batch_size).

  Raises:
    ValueError: naming --ensemble_members and the member.
  """
  config_cls = {"spade": SpadeConfig, "patchcore": PatchCoreConfig,
                "padim": PadimConfig}[spec.method]
  fields = dict(settings)
  if spec.metric is not None:
    fields["metric"] = spec.metric
  if spec.layers is not None:
    fields["layers"] = spec.layers
  try:
    return config_cls(**fields)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{FLAG}: member {spec.text()!r}: {e}") from None

