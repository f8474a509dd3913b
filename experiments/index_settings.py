"""predict.py's (and export.py's) detector settings from an index: the flags given,
completed and checked against what the index fixes (settings_from_index for an index
file, ensemble_settings_from_index for an ensemble index folder).

  contents, settings, tiles = index_settings.read_index(_DETECTOR, path)

detector_flags.settings_from_index (and ensemble_settings_from_index) are these.
"""

from __future__ import annotations

import json
from typing import Any

import detector_flags

from spade_jax.detector import KERNEL_METRICS, PadimIndex, PatchCoreIndex, SpadeIndex
from spade_jax.detector import ensemble as ensemble_lib


def settings_from_index(settings: dict[str, Any], given: set[str], contents,
                        where: str) -> dict[str, Any]:
  """`settings` completed from an index file (predict.py).

  A flag given on the command line wins; otherwise the setting fit.py recorded in the
  index (its "settings"; for a SPADE or PatchCore index saved from Python without
  them, --metric is the metric its kernels were fitted for), else the flag's default (PatchCore's
  --reweight, --image_score and --topk go together: one given, the others are their
  flags' too, not the recorded ones). Two kinds of
  setting are fixed by the index: the method (the index's type), the backbone and the
  feature settings (layers, resize, crop; PatchCore's patch features; PaDiM's
  num_features, feature_seed and its fit settings regularization and epsilon) are the
  index's, and a calibrated threshold fixes the settings it holds for (its
  detector config's score_settings(); SPADE: k_image_score, metric, aggregate,
  bandwidth, a threshold without the last two being "mean"'s; PatchCore: metric,
  k_nearest, reweight, num_neighbors, topk (and image_score with it), the coreset
  settings, patch_size; PaDiM: regularization, epsilon, sigma), as does a PatchCore
  index's kernel (its metric; an index without one refuses a kernel --metric). A flag
  given that contradicts them is an error, as is a flag of another method
  (check_method_flags).

  Args:
    settings: DetectorFlags.settings().
    given: DetectorFlags.given().
    contents: spade_jax.detector.IndexFile (index, threshold, settings).
    where: the index file, for messages.

  Raises:
    ValueError: a given flag contradicts the index (names both values and the fix),
      or is not read by the index's method.
  """
  out = dict(settings)
  recorded = contents.settings or {}
  # PatchCore's image score is chosen by these together: one given, none is recorded's.
  image_score = {"reweight", "image_score", "topk"}
  _recorded(out, recorded, given, image_score if image_score & set(given) else set())
  is_spade = isinstance(contents.index, SpadeIndex)
  # An index saved from Python without settings: the metric its kernel was fitted for.
  fitted_metric = getattr(contents.index, "fitted_metric", None)
  if "metric" not in given and "metric" not in recorded and fitted_metric is not None:
    out["metric"] = fitted_metric
  fixed = dict(json.loads(contents.index.feature_config))
  fixed["layers"] = tuple(fixed["layers"])
  # A whole-image index fixes its input size, a cropped one has none.
  fixed["image_size"] = _tuple_if_list(fixed.get("image_size"))
  fixed["method"] = "spade" if is_spade else "patchcore"
  if isinstance(contents.index, PadimIndex):  # Its statistics' fit settings too.
    fixed.update(method="padim", **contents.index.fit_settings())
  if isinstance(contents.index, PatchCoreIndex):  # Its kernel selected the bank.
    if fitted_metric is not None:
      fixed["metric"] = fitted_metric
    elif "metric" in given and settings["metric"] in KERNEL_METRICS:
      raise ValueError(
          f"--metric={settings['metric']} is a kernel, but the index {where} holds none "
          f"(its memory bank was selected for a fixed metric); drop --metric or refit the "
          f"index with fit.py --metric={settings['metric']}")
  _take_fixed(out, fixed, settings, given, where)
  detector_flags.check_method_flags(fixed["method"], given)
  if contents.threshold is not None:
    calibrated = dict(contents.threshold.settings)
    if is_spade:  # Thresholds without them were calibrated on "mean" scores.
      calibrated = {"aggregate": "mean", "bandwidth": None, **calibrated}
    elif fixed["method"] == "patchcore":  # Those without topk: on no top-k mean.
      calibrated = {"topk": None, **calibrated}
    _take_calibrated(out, calibrated, settings, given, where)
  return out


def _take_fixed(out: dict[str, Any], fixed: dict[str, Any], settings: dict[str, Any],
                given: set[str], where: str) -> None:
  """out[key] = value for the settings the index fixes; a flag given that differs is
  an error naming it."""
  for key, value in fixed.items():
    if key in given and _tuple_if_list(settings[key]) != value:
      raise ValueError(
          f"--{key}={_flag_text(settings[key])} does not match the index {where}, which was "
          f"fitted with {key}={_flag_text(value)}; drop --{key} (predict.py takes it from "
          f"the index) or refit the index with fit.py --{key}={_flag_text(settings[key])}")
    out[key] = value


def _take_calibrated(out: dict[str, Any], calibrated: dict[str, Any],
                     settings: dict[str, Any], given: set[str], where: str) -> None:
  """out[key] = value for the settings (flag names) a threshold holds for; a flag given
  that differs is an error naming it."""
  for key, value in calibrated.items():
    if key in given and settings.get(key) != value:
      raise ValueError(
          f"--{key}={_flag_text(settings[key])} differs from the {key}={_flag_text(value)} "
          f"the threshold in {where} was calibrated with, so the threshold would not hold; "
          f"drop --{key} or refit with fit.py --calibrate --{key}={_flag_text(settings[key])}")
    out[key] = value


def _recorded(out: dict[str, Any], recorded: dict[str, Any], given: set[str],
              skip: set[str] = frozenset()) -> None:
  """out[key] = the value fit.py recorded, for the settings not given (nor in skip)."""
  for key in out:
    if key not in given and key in recorded and key not in skip:
      value = recorded[key]
      out[key] = None if key == "weights" and value == "none" else _tuple_if_list(value)


def ensemble_settings_from_index(settings: dict[str, Any], given: set[str], contents,
                                 where: str) -> dict[str, Any]:
  """settings_from_index for an ensemble index folder (predict.py).

  A flag not given is the value fit.py recorded (--weights, --ensemble_combine, ...),
  else its default. Fixed by the index (a flag given that differs is an error naming
  it): the method, the members (--ensemble_members, compared after their defaults are
  filled in), --ensemble_statistics and --ensemble_folds (the statistics), --sigma (the
  held-out maps and scores they were computed from were blurred with it), --backbone,
  and the feature settings --resize, --crop and --image_size (the members' index
  files'). A stored threshold also fixes --ensemble_combine. Other methods' flags and
  --layers are errors (check_method_flags).

  Args:
    settings: DetectorFlags.settings().
    given: DetectorFlags.given().
    contents: index_ensemble.EnsembleIndexFile (index, threshold, settings).
    where: the index folder, for messages.

  Raises:
    ValueError: as described, naming the flag, both values and the fix.
  """
  out = dict(settings)
  recorded = contents.settings or {}
  _recorded(out, recorded, given)
  index = contents.index
  feature = json.loads(index.indices[0].feature_config)
  fixed = {"method": "ensemble", "ensemble_statistics": index.statistics,
           "resize": feature["resize"], "crop": feature["crop"],
           "image_size": _tuple_if_list(feature.get("image_size")),
           **{k: _tuple_if_list(recorded[k]) for k in ("backbone", "sigma", "ensemble_folds")
              if k in recorded}}
  _take_fixed(out, fixed, settings, given, where)
  detector_flags.check_method_flags("ensemble", given)
  if "ensemble_members" in given:
    names = ensemble_lib.resolved_names(settings["ensemble_members"], out["backbone"])
    if names != tuple(index.members):
      raise ValueError(
          f"--ensemble_members={_flag_text(settings['ensemble_members'])} does not match "
          f"the index {where}, whose members are {_flag_text(index.members)}; drop "
          "--ensemble_members (predict.py takes them from the index) or refit")
  out["ensemble_members"] = tuple(index.members)
  if contents.threshold is not None:  # EnsembleConfig.score_settings, as flag names.
    _take_calibrated(out, {f"ensemble_{k}": _tuple_if_list(v)
                           for k, v in contents.threshold.settings.items()},
                     settings, given, where)
  return out



def _tuple_if_list(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def _flag_text(value: Any) -> str:
  """A setting as it is written on the command line (lists comma-separated)."""
  return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def read_index(holder: detector_flags.DetectorFlags, path: str) -> tuple[Any, dict[str, Any], Any]:
  """(contents, settings, tiles) of the index at `path`, as predict.py and export.py read it.

  An ensemble index folder (fit.py --method=ensemble) gives load_ensemble_index_file's
  contents and no tiles (a --tile_* flag is an error); an index file gives
  load_index_file's contents and the index's tiles (TileConfig or None). The settings
  are the flags given, completed and checked against the index (ValueError naming the
  flag that contradicts it).
  """
  from spade_jax.detector import index_ensemble, load_index_file  # pylint: disable=import-outside-toplevel
  if index_ensemble.is_ensemble_index(path):
    contents = index_ensemble.load_ensemble_index_file(path)
    settings = ensemble_settings_from_index(holder.settings(), holder.given(), contents, path)
    holder.check_no_tiles("an ensemble index")
    return contents, settings, None
  contents = load_index_file(path)
  settings = settings_from_index(holder.settings(), holder.given(), contents, path)
  return contents, settings, holder.tiles(contents, path)
