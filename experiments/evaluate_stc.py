r"""Evaluates SPADE on ShanghaiTech Campus (STC) with the paper's settings.

  python experiments/evaluate_stc.py --data_dir=/data/shanghaitech \
      --backbone=wide_resnet50_2 --output_dir=results/stc_wrn50

Paper settings (spade_jax.data.stc.STC_SETTINGS): K = 1 nearest training frame,
kappa = 1, frames resized to 256 (whole frame scored), training videos subsampled
1:5. Writes <output_dir>/results.json in the same layout as evaluate.py, with one
category "stc", and prints the table.

Compiled programs are kept in JAX's persistent compilation cache (a rerun with the
same shapes skips compiling): --compilation_cache_dir, default
$SPADE_JAX_CACHE/jax_compilation_cache; 'none' turns it off.
"""

from collections.abc import Sequence
import pathlib
import sys

from absl import app, flags, logging
import detector_flags

from spade_jax import evaluation
from spade_jax.data import stc
from spade_jax.features.backbones import BACKBONES

_DATA_DIR = flags.DEFINE_string("data_dir", None, "STC root (see spade_jax/data/stc.py).",
                                required=True)
_BACKBONE = flags.DEFINE_enum("backbone", "wide_resnet50_2", list(BACKBONES),
                              "Feature extractor (the paper: wide_resnet50_2).")
_WEIGHTS = flags.DEFINE_string("weights", "imagenet", "'imagenet', a weights file, or 'none'.")
_FRAME_STEP = flags.DEFINE_integer("frame_step", stc.STC_SETTINGS["frame_step"],
                                   "Keep every n-th training frame (paper: 5).")
_TEST_FRAME_STEP = flags.DEFINE_integer("test_frame_step", 1, "Keep every n-th test frame.")
_K_IMAGES = flags.DEFINE_integer("k_images", stc.STC_SETTINGS["k_images"], "K (paper: 1).")
_K_IMAGE_SCORE = flags.DEFINE_integer("k_image_score", 1, "k of the image-level kNN score.")
_KAPPA = flags.DEFINE_integer("kappa", stc.STC_SETTINGS["kappa"], "kappa (paper: 1).")
_LAYERS = flags.DEFINE_list("layers", ["layer1", "layer2", "layer3"], "Pyramid levels.")
_COMBINE = flags.DEFINE_enum("combine", "ensemble", ["ensemble", "cat"], "How levels combine.")
_SIGMA = flags.DEFINE_float("sigma", 4.0, "Gaussian smoothing of the anomaly maps.")
_SIZE = flags.DEFINE_integer("size", stc.STC_SETTINGS["image_size"],
                             "Frames and masks are resized to size x size (paper: 256).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per backbone call.")
_NUM_HEATMAPS = flags.DEFINE_integer("num_heatmaps", 4, "Heatmap PNGs.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/stc", "Where results go.")
_CACHE_DIR = detector_flags.define_compilation_cache_flag()
flags.adopt_module_key_flags(detector_flags)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  weights = None if _WEIGHTS.value.lower() == "none" else _WEIGHTS.value
  extra_config = {"dataset": "stc", "frame_step": _FRAME_STEP.value,
                  "test_frame_step": _TEST_FRAME_STEP.value}
  try:
    # Everything checkable is checked before reading the (large) data set.
    config = evaluation.EvalConfig(
        data_dir=_DATA_DIR.value, backbone=_BACKBONE.value, weights=weights,
        k_images=_K_IMAGES.value, k_image_score=_K_IMAGE_SCORE.value, kappa=_KAPPA.value,
        layers=tuple(_LAYERS.value), combine=_COMBINE.value, sigma=_SIGMA.value,
        resize=_SIZE.value, crop=_SIZE.value)
    for flag in (_FRAME_STEP, _TEST_FRAME_STEP, _BATCH_SIZE):
      if flag.value < 1:
        raise ValueError(f"--{flag.name} must be >= 1, got {flag.value}")
    evaluation.check_output_dir(_OUTPUT_DIR.value)
    results = evaluation.load_results(_OUTPUT_DIR.value, config, extra_config)
    detector_flags.enable_compilation_cache(_CACHE_DIR, "evaluate_stc.py")
    if "stc" not in results["categories"]:
      data = stc.load_stc(_DATA_DIR.value, frame_step=_FRAME_STEP.value,
                          test_frame_step=_TEST_FRAME_STEP.value, size=_SIZE.value)
      results = evaluation.evaluate_loaded(
          config, {"stc": data}, output_dir=_OUTPUT_DIR.value, batch_size=_BATCH_SIZE.value,
          num_heatmaps=_NUM_HEATMAPS.value, log=logging.info, extra_config=extra_config)
    else:
      logging.info("stc: already in %s, skipped",
                   pathlib.Path(_OUTPUT_DIR.value) / evaluation.RESULTS_FILE)
  except (ValueError, OSError) as e:  # Bad input: a message, not a traceback.
    sys.exit(f"evaluate_stc.py: error: {e}")
  print(evaluation.format_table(results))
  print(f"\nresults: {pathlib.Path(_OUTPUT_DIR.value) / evaluation.RESULTS_FILE}")


if __name__ == "__main__":
  app.run(main)
