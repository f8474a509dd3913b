r"""Scores a folder of images with an index written by fit.py.

  python experiments/predict.py --index=part.spade --images=incoming/ --output_dir=out/

Every image under --images is scored (any depth; the formats fit.py reads), with the
index alone: no training image is needed. Writes

  out/scores.csv      "path,score" (path relative to --images, one row per image,
                      sorted), plus "anomalous" (1 / 0: score above the threshold) when
                      the index holds one (fit.py --calibrate)
  out/heatmaps/<path>.png   per image: the image at its own size | its anomaly map
                      over it (at the same size), one colour scale for all
  out/maps/<path>.npy with --save_maps, per image: its anomaly map, float32 [H, W] at
                      the image's own size (NaN outside the crop of a --crop index)
  out/summary.png     the --num_summary most anomalous images with their maps
  out/skipped.csv     "path,reason" of files that are not readable images, and of
                      image formats not read (GIF, HEIC, ...): reported as warnings
                      and left out; never fatal
  out/.predict-complete   written last: the outputs beside it are one complete run's

A run replaces the previous run's outputs as a whole once it has finished (one that
fails or is killed leaves the previous run as it was), and locks the folder: a second
run on the same --output_dir is refused. Other files in it are left alone. See
spade_jax/evaluation/predictions.py for file names that are not UTF-8 or look like
spreadsheet formulas.

Every pixel is inspected: the images are resized to the index's input size without
cropping (fit.py's default --crop=none; an index fitted with --crop=224 crops), and the
maps are brought back to each image's own size.

An index fitted on tiles (fit.py --tile_size) scores every image tile by tile, at its
native resolution, with the index's --tile_size (and --tile_overlap, --tile_merge
unless given); the maps are stitched and the image score is the max over its tiles.

Settings come from the index: the backbone and the feature settings (--layers,
--resize, --crop, --image_size; a PaDiM index's --num_features, --feature_seed, --regularization and
--epsilon) always (a flag given that disagrees is an error), and a calibrated
index fixes --k_image_score, --metric, --aggregate and --bandwidth (its threshold holds
for those). Every other detector flag not given is the value fit.py recorded in the
index (--weights, --k_images, --kappa, --metric, --aggregate, ...; an index saved from
Python without them: the defaults, and the metric its kernels were fitted for); a flag
given overrides it. The kernels of a kernel --metric (and the median bandwidths of
--aggregate=softmin|kde) come from the index; a --metric the index holds no kernels
for gets them fitted from the index's own training features first (a PatchCore
index's kernel is fixed: its memory bank was selected in that kernel's space, so
another --metric is an error; refit). --weights is
recorded as given to fit.py: a weights file must be at the same path here, or be
passed again as --weights=PATH. The index records the identity (SHA-256) of the
weights its features came from: other weights are refused, as are flags that the
index's method does not read (e.g. --kappa with a PatchCore index), and a threshold
is only applied with the scoring settings it was calibrated with.

An ensemble index (a folder, fit.py --method=ensemble) is recognised by its
manifest.json and scored with spade_jax.Ensemble.score; the outputs are the same. Its
members, --ensemble_statistics, --ensemble_folds, --sigma (the statistics were
computed with it), --backbone and the geometry are the index's (a flag given that
differs is an error naming it), as is --ensemble_combine when it holds a threshold;
other methods' flags, --layers and the --tile_* flags are errors.

Compiled programs are kept in JAX's persistent compilation cache
(--compilation_cache_dir, default $SPADE_JAX_CACHE/jax_compilation_cache; 'none' turns
it off): a second run with the same index and image size skips compiling. Progress
(images done / total, rate, time left) goes to the log.
"""

from collections.abc import Sequence
import sys

from absl import app, flags, logging
import detector_flags
import index_settings

_INDEX = flags.DEFINE_string("index", None, "Index file (or ensemble index folder) written "
                             "by fit.py.", required=True)
_IMAGES = flags.DEFINE_string("images", None, "Folder of images to score (any depth).",
                              required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where scores.csv, heatmaps/ and "
                                  "summary.png go (created).", required=True)
_NUM_SUMMARY = flags.DEFINE_integer("num_summary", 8, "Most anomalous images shown in "
                                    "summary.png (0: no summary).")
_HEATMAPS = flags.DEFINE_bool("heatmaps", True, "Write a heatmap PNG per image.")
_SAVE_MAPS = flags.DEFINE_bool("save_maps", False, "Also write maps/<path>.npy per image: "
                               "its anomaly map, float32 [H, W] at the image's own size.")
_DETECTOR = detector_flags.define_detector_flags(crop_default="none")
_CACHE_DIR = detector_flags.define_compilation_cache_flag()
flags.adopt_module_key_flags(detector_flags)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from spade_jax.evaluation import folders, predictions  # pylint: disable=import-outside-toplevel
  detector_flags.enable_compilation_cache(_CACHE_DIR, "predict.py")
  try:  # Everything checkable before the backbone loads.
    if _NUM_SUMMARY.value < 0:
      raise ValueError(f"--num_summary must be >= 0, got {_NUM_SUMMARY.value}")
    contents, settings, tiles = index_settings.read_index(_DETECTOR, _INDEX.value)
    index, threshold = contents.index, contents.threshold
    detector_flags.detector_config(settings["method"], settings, _DETECTOR.batch_size.value)
    predictions.check_output_dir(_OUTPUT_DIR.value)
    spade = detector_flags.make_detector(settings["method"], settings,
                                         _DETECTOR.batch_size.value)
    report = folders.predict_folder(
        spade, index, _IMAGES.value, _OUTPUT_DIR.value, threshold=threshold,
        write_heatmaps=_HEATMAPS.value, num_summary=_NUM_SUMMARY.value,
        save_maps=_SAVE_MAPS.value, tiles=tiles, log=logging.info)
  except (ValueError, OSError) as e:  # Bad input: a message, not a traceback.
    sys.exit(f"predict.py: error: {e}")
  show = predictions.display_name  # Names escaped: one line each, any bytes.
  print(f"scored {len(report.paths)} images in {report.seconds:.1f} s: "
        f"{show(str(report.scores_csv))}")
  if threshold is not None:
    flagged = int((report.scores > threshold.value).sum())
    print(f"anomalous: {flagged} of {len(report.paths)} (score > threshold "
          f"{threshold.value:.6g})")
  if report.skipped:
    print(f"skipped {len(report.skipped)} files that are not readable images (listed in "
          f"{predictions.SKIPPED_FILE}): {', '.join(show(s.relative) for s in report.skipped)}")
  if report.summary_png is not None:
    print(f"summary: {show(str(report.summary_png))}")


if __name__ == "__main__":
  app.run(main)
