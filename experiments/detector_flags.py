"""The flags the scripts share: the detector's (evaluate.py, fit.py, predict.py) and the
compilation cache's (every script).

  _DETECTOR = detector_flags.define_detector_flags()   # at module level, once
  _CACHE = detector_flags.define_compilation_cache_flag()
  flags.adopt_module_key_flags(detector_flags)        # listed by the script's --help
  ...
  detector_flags.enable_compilation_cache(_CACHE, "fit.py")   # before any JAX work
  spade = detector_flags.make_detector(_DETECTOR.method.value, _DETECTOR.settings(),
                                       _DETECTOR.batch_size.value)

predict.py's and export.py's settings from an index are index_settings.py's
(settings_from_index, ensemble_settings_from_index; also reachable from here).

Adding a method: its name to METHODS, its own flags to define_detector_flags (with
their holders in DetectorFlags and their values in settings()), and a branch in
make_detector (and in spade_config's counterpart for its config).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import flags

from spade_jax.detector import KERNEL_METRICS, PadimConfig, PatchCoreConfig, SpadeConfig, tiling
from spade_jax.detector.ensemble import DEFAULT_MEMBERS as ENSEMBLE_DEFAULT
from spade_jax.detector.patchcore import IMAGE_SCORES
from spade_jax.evaluation.config import (
  METHODS,
  EvalConfig,
  check_padim_scoring,
  check_patchcore_scoring,
)
from spade_jax.features import geometry
from spade_jax.features.backbones import BACKBONES
from spade_jax.features.patches import REDUCTIONS
from spade_jax.scoring.aggregate import AGGREGATES
from spade_jax.search.distances import METRICS

_DEFAULT = SpadeConfig()
_PATCHCORE = PatchCoreConfig()
_PADIM = PadimConfig()


@dataclasses.dataclass(frozen=True)
class DetectorFlags:
  """The detector's flag holders (see define_detector_flags)."""
  method: flags.FlagHolder[str]
  backbone: flags.FlagHolder[str]
  weights: flags.FlagHolder[str]
  k_images: flags.FlagHolder[int]
  k_image_score: flags.FlagHolder[int]
  kappa: flags.FlagHolder[int]
  layers: flags.FlagHolder[list[str]]
  combine: flags.FlagHolder[str]
  metric: flags.FlagHolder[str]
  aggregate: flags.FlagHolder[str]
  bandwidth: flags.FlagHolder[float]
  sigma: flags.FlagHolder[float]
  resize: flags.FlagHolder[int]
  crop: flags.FlagHolder[str]
  image_size: flags.FlagHolder[str | None]
  batch_size: flags.FlagHolder[int]
  coreset_ratio: flags.FlagHolder[float]
  patch_size: flags.FlagHolder[int]
  reweight: flags.FlagHolder[bool]
  image_score: flags.FlagHolder[str | None]
  topk: flags.FlagHolder[int | None]
  reduction: flags.FlagHolder[str]
  num_features: flags.FlagHolder[int]
  feature_seed: flags.FlagHolder[int]
  regularization: flags.FlagHolder[str]
  epsilon: flags.FlagHolder[float]
  tile_size: flags.FlagHolder[int | None]
  tile_overlap: flags.FlagHolder[int]
  tile_merge: flags.FlagHolder[str]
  tile_position_weight: flags.FlagHolder[float]
  # Set by define_detector_flags (defaulted here only to keep the constructor short).
  ensemble_members: flags.FlagHolder[list[str] | None] = None
  ensemble_combine: flags.FlagHolder[str] = None
  ensemble_statistics: flags.FlagHolder[str] = None
  ensemble_folds: flags.FlagHolder[int] = None

  def settings(self) -> dict[str, Any]:
    """The detector settings as keyword arguments of evaluation.EvalConfig (weights
    'none' -> None; layers not given -> the method's default)."""
    weights = self.weights.value
    method = self.method.value
    layers = self.layers.value
    if layers is None:
      layers = {"spade": _DEFAULT, "padim": _PADIM}.get(method, _PATCHCORE).layers
    return {
        "method": method, "backbone": self.backbone.value,
        "weights": None if weights.lower() == "none" else weights,
        "k_images": self.k_images.value, "k_image_score": self.k_image_score.value,
        "kappa": self.kappa.value, "layers": tuple(layers),
        "combine": self.combine.value, "sigma": self.sigma.value, "metric": self.metric.value,
        "aggregate": self.aggregate.value, "bandwidth": self.bandwidth.value,
        "resize": self.resize.value, "crop": geometry.parse_crop(self.crop.value),
        "image_size": geometry.parse_image_size(self.image_size.value or ""),
        "coreset_ratio": self.coreset_ratio.value, "patch_size": self.patch_size.value,
        "reweight": self.reweight.value, "image_score": self.image_score.value,
        "topk": self.topk.value, "reduction": self.reduction.value,
        "num_features": self.num_features.value, "feature_seed": self.feature_seed.value,
        "regularization": self.regularization.value, "epsilon": self.epsilon.value,
        "ensemble_members": (None if self.ensemble_members.value is None
                             else tuple(self.ensemble_members.value)),
        "ensemble_combine": self.ensemble_combine.value,
        "ensemble_statistics": self.ensemble_statistics.value,
        "ensemble_folds": self.ensemble_folds.value}

  def given(self) -> set[str]:
    """Names of the detector flags set on the command line (not left at their default)."""
    return {f.name for f in dataclasses.fields(self) if getattr(self, f.name).present
            and f.name not in TILE_FLAGS}

  def check_no_tiles(self, what: str) -> None:
    """Raises a ValueError naming the first tile flag given: `what` (e.g. an ensemble)
    is not tiled."""
    present = [n for n in TILE_FLAGS if getattr(self, n).present]
    if present:
      raise ValueError(f"--{present[0]}: tiles are not supported with {what} yet; drop "
                       "the --tile_* flags")

  def tiles(self, contents=None, where: str = "") -> tiling.TileConfig | None:
    """The tiling the flags ask for (None: no --tile_size), or with `contents` (an index
    file, predict.py) the one its fit recorded: --tile_size and --tile_position_weight
    are the index's (a given one that differs is an error), --tile_overlap and
    --tile_merge the flags' when given (--tile_overlap the index's when it holds a
    threshold: the tiles set the image scores it was calibrated on).

    Raises:
      ValueError: a bad tile flag, --tile_size with --crop or --image_size, or one that
        contradicts the index; names the flag.
    """
    present = {n for n in TILE_FLAGS if getattr(self, n).present}
    recorded = {} if contents is None else (contents.settings or {})
    size = self.tile_size.value
    if contents is not None:
      fitted = recorded.get("tile_size")
      if "tile_size" in present and size != fitted:
        raise ValueError(
            f"--tile_size={size} does not match the index {where}, which was fitted "
            f"{'without tiles' if fitted is None else f'on tiles of {fitted}'}; drop "
            f"--tile_size (predict.py and export.py take it from the index) or refit "
            f"with fit.py --tile_size={size}")
      size = fitted
    if size is None:
      extra = sorted(present - {"tile_size"})
      if extra:
        raise ValueError(f"--{extra[0]} needs --tile_size (tiling is off)")
      return None
    cropped = self.crop.present and geometry.parse_crop(self.crop.value) is not None
    if contents is None and (cropped or self.image_size.present):
      raise ValueError("--tile_size cuts the images into tiles at their native resolution; "
                       "it excludes --crop and --image_size (drop them)")
    overlap = (self.tile_overlap.value if "tile_overlap" in present or contents is None
               else recorded.get("tile_overlap", 0))
    merge = (self.tile_merge.value if "tile_merge" in present or contents is None
             else recorded.get("tile_merge", "mean"))
    fitted_overlap = recorded.get("tile_overlap", 0)
    if (contents is not None and getattr(contents, "threshold", None) is not None
        and overlap != fitted_overlap):
      raise ValueError(
          f"--tile_overlap={overlap}: the index {where} holds a threshold calibrated on "
          f"tiles with --tile_overlap={fitted_overlap} (the tiles set the image scores); "
          "drop --tile_overlap or refit with fit.py --calibrate")
    position = self.tile_position_weight.value
    if contents is not None:  # The index's features hold the positions (or not).
      fitted = recorded.get("tile_position_weight", 0.0)
      if "tile_position_weight" in present and position != fitted:
        raise ValueError(
            f"--tile_position_weight={position} does not match the index {where}, whose "
            f"tile features were fitted with {fitted}; drop --tile_position_weight "
            "(predict.py takes it from the index) or refit")
      position = fitted
    if position and contents is None and self.method.value == "padim":
      raise ValueError("--tile_position_weight is for --method=spade and patchcore: "
                       "PaDiM's Gaussians already model each position of a tile")
    try:
      return tiling.TileConfig(size, overlap, merge, position)
    except ValueError as e:
      raise ValueError(f"--{e}") from None


def _valid(parse, flag: str):
  """An absl flag validator from a parser that raises ValueError (its message shown)."""
  def check(value) -> bool:
    try:
      parse(value, flag)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
    return True
  return check


def define_detector_flags(crop_default: str = str(_DEFAULT.crop)) -> DetectorFlags:
  """Defines the detector's flags (once per script); returns their holders.

  crop_default: --crop's default: "224" (evaluate.py: the MVTec protocol) or "none"
  (fit.py, predict.py: the whole image).
  """
  holders = DetectorFlags(
      method=flags.DEFINE_enum(
          "method", "spade", list(METHODS),
          "Detector: spade (SPADE, Cohen & Hoshen 2020), patchcore (PatchCore, Roth et "
          "al. 2022: a coreset memory bank of locally aware patch features), padim "
          "(PaDiM, Defard et al. 2020: a Gaussian per position of random-subset "
          "embeddings, Mahalanobis distances) or ensemble (several of them, standardised "
          "and combined, see --ensemble_members; fit.py writes an ensemble index folder)."),
      backbone=flags.DEFINE_enum(
          "backbone", "efficientnet_lite0", list(BACKBONES),
          "Feature extractor; wide_resnet50_2 reproduces the paper."),
      weights=flags.DEFINE_string(
          "weights", "imagenet", "'imagenet' (cached standard file), a .pth / converted "
          "file path, or 'none' for random weights."),
      k_images=flags.DEFINE_integer(
          "k_images", _DEFAULT.k_images, "K: nearest normal images forming the pixel "
          "gallery."),
      k_image_score=flags.DEFINE_integer(
          "k_image_score", _DEFAULT.k_image_score, "k of the image-level kNN score."),
      kappa=flags.DEFINE_integer("kappa", _DEFAULT.kappa,
                                 "kappa: nearest gallery features per pixel."),
      layers=flags.DEFINE_list(
          "layers", None, "Pyramid levels. Default: the method's, "
          f"{','.join(_DEFAULT.layers)} for spade and padim, {','.join(_PATCHCORE.layers)} "
          "for patchcore."),
      combine=flags.DEFINE_enum("combine", _DEFAULT.combine, ["ensemble", "cat"],
                                "How levels combine."),
      metric=flags.DEFINE_string(
          "metric", _DEFAULT.metric, f"Distance: a fixed metric ({', '.join(sorted(METRICS))})"
          f" or a kernel fitted on the training features ({', '.join(KERNEL_METRICS)}; "
          "spade_jax.kernels): spade fits one per layer (combine=ensemble), patchcore one "
          "on the training patches, whose coreset it then selects in the kernel's space."),
      aggregate=flags.DEFINE_enum(
          "aggregate", _DEFAULT.aggregate, list(AGGREGATES), "spade: how the k (kappa) "
          "nearest distances become a score: mean (SPADE), softmin or kde (soft scores with "
          "a bandwidth, --bandwidth)."),
      bandwidth=flags.DEFINE_float(
          "bandwidth", _DEFAULT.bandwidth, "spade, --aggregate=softmin|kde: the bandwidth h "
          "(> 0, in the metric's distance units). Default: the median heuristic of the "
          "training images, fitted with the index."),
      sigma=flags.DEFINE_float("sigma", _DEFAULT.sigma,
                               "Gaussian smoothing of the anomaly maps."),
      resize=flags.DEFINE_integer(
          "resize", _DEFAULT.resize, "Shorter side is resized to this (aspect kept; with "
          "--crop=none and no --image_size, the first training image's aspect sets the "
          "longer side, and every image is resized to that one size)."),
      crop=flags.DEFINE_string(
          "crop", crop_default, "Centre crop size (the MVTec protocol: 224 after --resize=256"
          "), or 'none': the whole image is inspected, resized without cropping."),
      image_size=flags.DEFINE_string(
          "image_size", None, "With --crop=none: H,W, the size every image is resized to "
          "(instead of --resize and the first training image's aspect)."),
      batch_size=flags.DEFINE_integer("batch_size", 8, "Images per backbone call."),
      coreset_ratio=flags.DEFINE_float(
          "coreset_ratio", _PATCHCORE.coreset_ratio, "patchcore: fraction of the training "
          "patches kept in the memory bank by the greedy coreset (1: all)."),
      patch_size=flags.DEFINE_integer(
          "patch_size", _PATCHCORE.patch_size, "patchcore: p, the p x p neighbourhood "
          "averaged into each patch feature."),
      reweight=flags.DEFINE_bool(
          "reweight", _PATCHCORE.reweight, "patchcore: reweight the image score by the "
          "density of its nearest bank entry's neighbourhood (PatchCore, eq. 7); the same "
          "as --image_score=reweight."),
      image_score=flags.DEFINE_enum(
          "image_score", None, list(IMAGE_SCORES), "patchcore: the image score from its "
          "patch scores: max (the paper's: the largest), reweight (the paper's eq. 7, as "
          "--reweight) or topk (the mean of the --topk largest). Default: reweight with "
          "--reweight, topk with --topk, else max."),
      topk=flags.DEFINE_integer(
          "topk", None, "patchcore, --image_score=topk: how many of an image's largest "
          "patch scores are averaged (1 to its patches, e.g. 28 x 28 = 784 with layer2 at "
          "crop 224); giving it chooses topk."),
      reduction=flags.DEFINE_enum(
          "reduction", _PATCHCORE.reduction, list(REDUCTIONS), "patchcore: how the levels' "
          f"channels are reduced to {_PATCHCORE.embed_dim} when they have more "
          "(wide_resnet50_2: 512 + 1024): per_level (the paper's code, "
          "patchcore-inspection: each level pooled to 1024, then together), adaptive_avg "
          "(one pooling over the concatenated levels; the default before per_level) or "
          "random_projection. Fewer channels are kept whatever it is."),
      num_features=flags.DEFINE_integer(
          "num_features", _PADIM.num_features, "padim: d, the random subset of the "
          "layers' concatenated channels (paper: 100 for resnet18, 550 for "
          "wide_resnet50_2). Default: min(100, the channels)."),
      feature_seed=flags.DEFINE_integer(
          "feature_seed", _PADIM.feature_seed, "padim: seed of the random channel "
          "subset."),
      regularization=flags.DEFINE_enum(
          "regularization", _PADIM.regularization, ["paper", "ledoit_wolf"], "padim: "
          "each position's covariance: paper (sample covariance + epsilon I) or "
          "ledoit_wolf (Ledoit-Wolf shrinkage, no epsilon)."),
      epsilon=flags.DEFINE_float(
          "epsilon", _PADIM.epsilon, "padim, --regularization=paper: the epsilon added "
          "to each covariance's diagonal (> 0)."),
      tile_size=flags.DEFINE_integer(
          "tile_size", None, "fit.py, predict.py: cut every image into T x T tiles at its "
          "native resolution (no resize), fit / score each tile, stitch the maps; the "
          "image score is the max over its tiles. For large images with small defects."),
      tile_overlap=flags.DEFINE_integer(
          "tile_overlap", 0, "With --tile_size: pixels neighbouring tiles share "
          "(0 <= O < T)."),
      tile_merge=flags.DEFINE_enum(
          "tile_merge", "mean", list(tiling.MERGES), "With --tile_size: how overlapping "
          "tile maps combine: mean (feathered across the overlap) or max."),
      tile_position_weight=flags.DEFINE_float(
          "tile_position_weight", 0.0, "With --tile_size (research option; spade, "
          "patchcore): append each tile's normalised centre (y, x) in [0, 1], times this "
          "weight, to its features, so tiles are compared preferably with training tiles "
          "at the same place. 0: off."),
  )
  holders = dataclasses.replace(
      holders,
      ensemble_members=flags.DEFINE_list(
          "ensemble_members", None, "ensemble: its members, comma-separated, each "
          "METHOD:METRIC:BACKBONE[:LAYERS] (METHOD spade|patchcore|padim; METRIC empty: "
          "the method's default, padim none; BACKBONE empty: --backbone; LAYERS joined by "
          "'+', absent: the method's default), e.g. patchcore:l2:efficientnet_lite0,"
          "padim::efficientnet_lite1:layer1+layer2. Default: "
          f"{','.join(ENSEMBLE_DEFAULT)} (the README's choice for faint defects)."),
      ensemble_combine=flags.DEFINE_enum(
          "ensemble_combine", "mean", ["mean", "max"], "ensemble: how the members' "
          "standardised scores and maps are combined."),
      ensemble_statistics=flags.DEFINE_enum(
          "ensemble_statistics", "mean_std", ["mean_std", "median_mad"], "ensemble: "
          "the statistics of each member's held-out normal scores and map pixels that "
          "standardise it: mean and standard deviation, or median and 1.4826 MAD."),
      ensemble_folds=flags.DEFINE_integer(
          "ensemble_folds", 5, "ensemble: folds of whole training images; each member is "
          "refitted without a fold to score it (its held-out normal statistics)."))
  flags.register_validator("crop", _valid(geometry.parse_crop, "--crop"))
  flags.register_validator("image_size",
                           _valid(lambda v, f: geometry.parse_image_size(v or "", f),
                                  "--image_size"))
  return holders


# Tiling's flags: not detector settings (DetectorFlags.tiles; recorded by fit.py).
TILE_FLAGS = ("tile_size", "tile_overlap", "tile_merge", "tile_position_weight")

# Flags that not every method reads, by the methods that read them (the flags listed
# nowhere are every method's): giving one with a method that does not list it is an
# error (check_method_flags), never silently ignored.
METHOD_FLAGS = {
    "spade": ("k_images", "k_image_score", "kappa", "combine", "aggregate", "bandwidth",
              "metric"),
    "patchcore": ("coreset_ratio", "patch_size", "reweight", "metric", "image_score", "topk",
                  "reduction"),
    "padim": ("num_features", "feature_seed", "regularization", "epsilon"),
    "ensemble": ("ensemble_members", "ensemble_combine", "ensemble_statistics",
                 "ensemble_folds"),
}
# Every-method flags that an ensemble does not read (its members have their own).
ENSEMBLE_UNUSED = ("layers",)


def _foreign_flags(method: str) -> set[str]:
  """The flags of METHOD_FLAGS that `method` does not read."""
  return {n for other, names in METHOD_FLAGS.items() if other != method
          for n in names} - set(METHOD_FLAGS.get(method, ()))


def check_method_flags(method: str, given: set[str]) -> None:
  """Raises a ValueError naming the flags in `given` (DetectorFlags.given()) that
  `method` does not read (other methods' only: METHOD_FLAGS)."""
  foreign = sorted(_foreign_flags(method) & set(given))
  if method == "ensemble":
    unused = sorted(set(ENSEMBLE_UNUSED) & set(given))
    if unused:
      raise ValueError(f"--{unused[0]} is not used by --method=ensemble: each member names "
                       "its own (--ensemble_members=METHOD:METRIC:BACKBONE:LAYERS, layers "
                       "joined by '+'); drop it")
  if foreign:
    listed = ", ".join(f"--{name}" for name in foreign)
    owners = sorted({other for other, names in METHOD_FLAGS.items()
                     if set(names) & set(foreign)})
    raise ValueError(f"{listed} {'is' if len(foreign) == 1 else 'are'} not used by "
                     f"--method={method} (only by --method={'/'.join(owners)}); drop "
                     f"{'it' if len(foreign) == 1 else 'them'} or choose that method")


def own_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
  """`settings` without the other methods' (METHOD_FLAGS), e.g. what fit.py records."""
  foreign = _foreign_flags(method)
  return {k: v for k, v in settings.items() if k not in foreign}


def spade_config(settings: dict[str, Any], batch_size: int) -> SpadeConfig:
  """SpadeConfig of settings() (checked: ValueError naming a bad setting)."""
  _checked_batch(batch_size)
  keys = ("k_images", "k_image_score", "kappa", "layers", "combine", "sigma", "metric",
          "aggregate", "bandwidth", "resize", "crop", "image_size")
  return SpadeConfig(**{k: settings[k] for k in keys}, batch_size=batch_size)


def patchcore_config(settings: dict[str, Any], batch_size: int) -> PatchCoreConfig:
  """PatchCoreConfig of settings() (checked: ValueError naming a bad setting)."""
  _checked_batch(batch_size)
  check_patchcore_scoring(settings["metric"], settings.get("aggregate", "mean"),
                          settings.get("bandwidth"))
  keys = ("layers", "patch_size", "coreset_ratio", "reweight", "metric", "sigma", "resize",
          "crop", "image_size")
  # An index's own feature settings and a threshold's scoring settings (predict.py:
  # settings_from_index) that no flag sets, and flags that settings from before them lack.
  fixed = {k: settings[k] for k in ("embed_dim", "reduction", "reduction_seed", "k_nearest",
                                    "num_neighbors", "projection_dim", "coreset_seed",
                                    "image_score", "topk") if k in settings}
  return PatchCoreConfig(**{k: settings[k] for k in keys}, **fixed, batch_size=batch_size)


def padim_config(settings: dict[str, Any], batch_size: int) -> PadimConfig:
  """PadimConfig of settings() (checked: ValueError naming a bad setting)."""
  _checked_batch(batch_size)
  check_padim_scoring(settings.get("metric", _DEFAULT.metric),
                      settings.get("aggregate", "mean"), settings.get("bandwidth"))
  keys = ("layers", "num_features", "feature_seed", "regularization", "epsilon", "sigma",
          "resize", "crop", "image_size")
  return PadimConfig(**{k: settings[k] for k in keys}, batch_size=batch_size)


def detector_config(method: str, settings: dict[str, Any], batch_size: int):
  """The config of detector `method` from settings() (ValueError naming a bad one)."""
  if method == "spade":
    return spade_config(settings, batch_size)
  if method == "patchcore":
    return patchcore_config(settings, batch_size)
  if method == "padim":
    return padim_config(settings, batch_size)
  if method == "ensemble":  # The members' configs are checked (naming the member).
    folds = settings["ensemble_folds"]
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
      raise ValueError(f"--ensemble_folds must be >= 2 (held-out folds of the training "
                       f"images), got {folds}")
    return _ensemble_eval_config(settings).ensemble_config(_checked_batch(batch_size))
  raise ValueError(f"--method must be one of {METHODS}, got {method!r}")


def _checked_batch(batch_size: int) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
  return batch_size


def _ensemble_eval_config(settings: dict[str, Any]) -> EvalConfig:
  """evaluate.py's config of an ensemble with `settings` (it builds the ensemble)."""
  keys = {f.name for f in dataclasses.fields(EvalConfig)} - {"data_dir"}
  return EvalConfig(data_dir="", **{k: v for k, v in settings.items() if k in keys})


def make_detector(method: str, settings: dict[str, Any], batch_size: int):
  """Loads the backbone and builds the detector `method` with `settings`.

  Raises:
    ValueError: a bad setting or weights file (FileNotFoundError: missing weights).
  """
  import spade_jax  # pylint: disable=import-outside-toplevel
  config = detector_config(method, settings, batch_size)  # Before the backbone load.
  if method == "ensemble":  # Each member's backbone, loaded once (spade_jax.Ensemble).
    return _ensemble_eval_config(settings).make_detector(batch_size)
  backbone = spade_jax.load_backbone(settings["backbone"], weights=settings["weights"])
  detector = {"spade": spade_jax.Spade, "patchcore": spade_jax.PatchCore,
              "padim": spade_jax.Padim}[method]
  return detector(backbone, config)


def __getattr__(name: str) -> Any:
  """settings_from_index and ensemble_settings_from_index: index_settings.py's (which
  imports this module), also reachable here."""
  if name in ("settings_from_index", "ensemble_settings_from_index"):
    import index_settings  # pylint: disable=import-outside-toplevel
    return getattr(index_settings, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def recorded_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
  """What fit.py records in the index (JSON values): the method and its own settings()
  (own_settings: not the other methods')."""
  settings = own_settings(method, settings)
  out = {"method": method, **settings, "layers": list(settings["layers"]),
         "weights": "none" if settings["weights"] is None else settings["weights"]}
  if method == "ensemble":  # No layers (each member has its own); canonical members.
    del out["layers"]
    out["ensemble_members"] = list(_ensemble_eval_config(settings).ensemble_members)
  return out


def define_compilation_cache_flag() -> flags.FlagHolder[str]:
  """Defines --compilation_cache_dir (once per script)."""
  return flags.DEFINE_string(
      "compilation_cache_dir", None,
      "JAX's persistent compilation cache: a rerun with the same shapes loads the "
      "compiled programs instead of compiling them again. Default: "
      "$SPADE_JAX_COMPILATION_CACHE if set, else $SPADE_JAX_CACHE/jax_compilation_cache "
      "(~/.cache/spade_jax/jax_compilation_cache). '' or 'none' turns it off.")


def enable_compilation_cache(holder: flags.FlagHolder[str], script: str) -> None:
  """Sets up the cache the flag names (spade_jax.host.compilation_cache.enable), or exits
  with '<script>: error: ...' when the folder cannot be used."""
  from spade_jax.host import compilation_cache  # pylint: disable=import-outside-toplevel
  try:
    compilation_cache.enable(holder.value)
  except ValueError as e:
    sys.exit(f"{script}: error: {e}")


def compilation_cache_note() -> str:
  """'off', or '<folder> (<n> programs stored before this run)' (for reports)."""
  import jax  # pylint: disable=import-outside-toplevel

  from spade_jax.host import compilation_cache  # pylint: disable=import-outside-toplevel
  folder = jax.config.jax_compilation_cache_dir
  if not jax.config.jax_enable_compilation_cache or not folder:
    return "off"
  return f"{folder} ({len(compilation_cache.cache_entries(folder))} programs stored before "\
         "this run)"
