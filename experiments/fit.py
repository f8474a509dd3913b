r"""Fits the detector on a folder of normal images and writes its index.

  python experiments/fit.py --train_dir=images/good --index=part.spade
  python experiments/fit.py --train_dir=images/good --index=part.spade --calibrate \
      --backbone=wide_resnet50_2 --k_images=20

The whole image is inspected by default (--crop=none): every image is resized, not
cropped, to one input size: --image_size=H,W, or the first image's size with its
shorter side at --resize (aspect kept). Images of another aspect ratio are stretched to
it (a warning says how many). --crop=224 gives the MVTec protocol's centre crop.

--tile_size=T (--tile_overlap=O, --tile_merge) fits on T x T tiles of every image at
its native resolution instead (large images, small defects; the last tiles flush with
the image's edges); the index records it and predict.py tiles the same way. With
--calibrate the folds are folds of whole images (an image's tiles never split) and an
image's held-out score is the max over its tiles. --tile_position_weight=W (research
option, off by default) appends each tile's normalised centre, times W, to its features.

Every image under --train_dir is read, at any depth (png, jpg/jpeg, bmp, tif/tiff,
webp, any case; names starting with '.' are skipped). A file that is not a readable
image is reported (a warning naming it and why) and left out. The index
(spade_jax.save_index: atomic, checksummed) records the backbone, the feature
settings (--layers, --resize, --crop and the input size) and the other detector flags given here
(--weights, --k_images, ...): predict.py takes them from it.

--calibrate also stores a decision threshold, from the normal images alone: each
training image is scored against an index fitted without it (leave-one-out for SPADE;
5 folds for --method=patchcore, --method=padim and --metric=learned, which refit per
fold; or
--calibration_folds=F folds; the folds are checked, and logged, before any image is
read), and the threshold is the --calibration_quantile (default 0.99) quantile of
those held-out image scores: about 1% of new normal images are expected above it.
predict.py then adds an "anomalous" column. The threshold holds for the scoring
settings it was calibrated with (recorded with it: SPADE's --k_image_score, --metric,
--aggregate and --bandwidth; PatchCore's --metric, --reweight (--image_score, --topk)
and its other scoring settings; PaDiM's --regularization, --epsilon and --sigma); each
held-out image is scored as predict.py will score it, with a kernel metric's pooled
kernel (and a soft aggregate's median bandwidth; PatchCore: its patch kernel and
coreset) fitted without it.

--metric=<kernel> (e.g. mahalanobis; see evaluate.py) fits one kernel per layer on the
training images and --aggregate=softmin|kde without --bandwidth the median-heuristic
bandwidths: the index stores them (checksummed with the features). With
--method=patchcore it fits one kernel on all training patches and selects the memory
bank in the kernel's space; the index stores the kernel with the bank.

--method=ensemble (--ensemble_members, --ensemble_combine, --ensemble_statistics,
--ensemble_folds; README "Ensembles") fits every member, standardised by its held-out
scores over --ensemble_folds folds of whole images, and writes --index as an ensemble
index folder (save_ensemble_index: atomic, checksummed); an existing ensemble index
there is replaced, anything else is refused. With --calibrate the threshold is the
--calibration_quantile quantile of the ensemble's combined held-out scores, from those
same folds (--calibration_folds, if given, must equal --ensemble_folds); it records
the combine, statistics and folds it holds for. Tiles are not supported with it.

  python experiments/fit.py --method=ensemble --train_dir=images/good \
      --index=part.ensemble --calibrate

The detector's flags are evaluate.py's (detector_flags.py); a flag that --method does
not read (e.g. --kappa with --method=patchcore) is an error. The index also records the
identity (SHA-256) of the backbone's weights: predict.py refuses other weights.

Compiled programs are kept in JAX's persistent compilation cache (--compilation_cache_dir, default
$SPADE_JAX_CACHE/jax_compilation_cache; 'none' turns it off), so a second fit with
the same image size skips compiling. Progress (images done / total, rate, time
left) goes to the log.
"""

from collections.abc import Sequence
import sys

from absl import app, flags, logging
import detector_flags
import numpy as np

_TRAIN_DIR = flags.DEFINE_string("train_dir", None, "Folder of normal images (any depth).",
                                 required=True)
_INDEX = flags.DEFINE_string("index", None, "Index file to write (its folder must exist); "
                             "--method=ensemble: the index folder to write.", required=True)
_CALIBRATE = flags.DEFINE_bool("calibrate", False,
                               "Also store a decision threshold on the image score, "
                               "calibrated on the training images by cross-validation.")
_QUANTILE = flags.DEFINE_float("calibration_quantile", 0.99,
                               "The threshold is this quantile of the held-out scores of "
                               "the normal training images.")
_FOLDS = flags.DEFINE_integer("calibration_folds", None,
                              "Cross-validation folds of the calibration (>= 2). Default: "
                              "leave-one-out (as many folds as images); 5 for "
                              "--method=patchcore, --method=padim and --metric=learned, "
                              "which fit per fold.")
_DETECTOR = detector_flags.define_detector_flags(crop_default="none")
_CACHE_DIR = detector_flags.define_compilation_cache_flag()
flags.adopt_module_key_flags(detector_flags)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from spade_jax.detector import calibration  # pylint: disable=import-outside-toplevel
  from spade_jax.evaluation import folders  # pylint: disable=import-outside-toplevel
  settings = _DETECTOR.settings()
  ensemble = _DETECTOR.method.value == "ensemble"
  try:  # Everything checkable before the backbone loads.
    detector_flags.check_method_flags(_DETECTOR.method.value, _DETECTOR.given())
    detector_flags.detector_config(_DETECTOR.method.value, settings,
                                   _DETECTOR.batch_size.value)
    if ensemble:
      _DETECTOR.check_no_tiles("--method=ensemble")
      if _FOLDS.present and _FOLDS.value != settings["ensemble_folds"]:
        raise ValueError(
            f"--calibration_folds={_FOLDS.value}: an ensemble's threshold is calibrated on "
            f"the held-out scores of its --ensemble_folds={settings['ensemble_folds']} "
            "folds (those of its standardisation); drop --calibration_folds or set "
            "--ensemble_folds")
    tiles = None if ensemble else _DETECTOR.tiles()
    if _CALIBRATE.value:
      calibration.check_calibration_args(2, _QUANTILE.value, _FOLDS.value, 0)
    folders.check_index_path(_INDEX.value, folder=ensemble)
  except ValueError as e:
    sys.exit(f"fit.py: error: {e}")
  detector_flags.enable_compilation_cache(_CACHE_DIR, "fit.py")
  try:
    spade = detector_flags.make_detector(_DETECTOR.method.value, settings,
                                         _DETECTOR.batch_size.value)
    report = folders.fit_folder(
        spade, _TRAIN_DIR.value, _INDEX.value, calibrate=_CALIBRATE.value,
        quantile=_QUANTILE.value, folds=_FOLDS.value, log=logging.info, tiles=tiles,
        settings=detector_flags.recorded_settings(_DETECTOR.method.value, settings))
  except (ValueError, OSError) as e:  # Bad input: a message, not a traceback.
    sys.exit(f"fit.py: error: {e}")
  h, w = report.input_size
  if ensemble:
    print(f"ensemble index: {report.index_path} ({report.num_images} images at {h}x{w}, "
          f"members {', '.join(spade.names)}, {report.seconds:.1f} s)")
  else:
    print(f"index: {report.index_path} ({report.num_images} images at {h}x{w}, backbone "
          f"{settings['backbone']}, {report.seconds:.1f} s)")
  if report.skipped:
    print(f"skipped {len(report.skipped)} files that are not readable images: "
          f"{', '.join(s.relative for s in report.skipped)}")
  if report.threshold is not None:
    t, scores = report.threshold, report.held_out_scores
    folds = "leave-one-out" if t.folds == t.num_images else f"{t.folds}-fold"
    if ensemble:
      folds = f"ensemble's combined {folds}"
    print(f"threshold: {t.value:.6g} (quantile {t.quantile} of the {folds} held-out scores "
          f"of {t.num_images} normal images: min {scores.min():.6g}, median "
          f"{np.median(scores):.6g}, max {scores.max():.6g})")


if __name__ == "__main__":
  app.run(main)
