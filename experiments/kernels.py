r"""Kernelized SPADE variants against L2, on data in the MVTec AD layout.

  python experiments/kernels.py                        # built-in benchmark, all variants
  python experiments/kernels.py --variants=l2,mahalanobis,learned --steps=200 \
      --data_dir=/data/mvtec_anomaly_detection --output_dir=results/kernels_mvtec

For each category the backbone runs once (training and test images); then every
variant (spade_jax.scoring.variants) is fitted on the training features alone, scores
the test images (image scores, pixel scores, anomaly maps) and is evaluated with
MVTec's metrics. Writes <output_dir>/<variant>/results.json in evaluate.py's layout
("seconds" of a category: the backbone's time plus the variant's fit and scoring, i.e.
what a run of that variant alone costs; "stage_seconds" as evaluate.py's, the kernel's
fit counted in "search"), <output_dir>/timings.json (the backbone, fit, search, maps
and metrics seconds apart) and <output_dir>/comparison.md. A rerun skips the
categories a variant's results.json already holds.
"""

from collections.abc import Sequence
import json
import pathlib
import sys
import time

from absl import app, flags, logging
import jax
import numpy as np

import spade_jax
from spade_jax import evaluation
from spade_jax.detector import common
from spade_jax.evaluation import metrics
from spade_jax.evaluation import results as results_lib
from spade_jax.features import geometry
from spade_jax.features.backbones import BACKBONES
from spade_jax.host import atomic
from spade_jax.scoring import variants as variants_lib

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder in MVTec AD layout. Default: the built-in benchmark.")
_CATEGORIES = flags.DEFINE_list("categories", None, "Categories (default: all found).")
_VARIANTS = flags.DEFINE_list("variants", list(variants_lib.VARIANTS),
                              f"Variants, from {', '.join(variants_lib.VARIANTS)}.")
_OBJECTIVE = flags.DEFINE_enum("objective", "loo", list(variants_lib.OBJECTIVES),
                               "What `learned` maximises: loo = likelihood cross-validation "
                               "(5 folds of images); synthetic = AUROC of synthetic "
                               "anomalies (cut-paste, blends) of the training images.")
_STEPS = flags.DEFINE_integer("steps", 100, "Adam steps of learned kernels.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.05, "Adam's learning rate.")
_BACKBONE = flags.DEFINE_enum("backbone", "efficientnet_lite0", list(BACKBONES),
                              "Feature extractor.")
_WEIGHTS = flags.DEFINE_string("weights", "imagenet", "'imagenet', a file, or 'none'.")
_DEFAULT = evaluation.EvalConfig(data_dir="")
_K_IMAGES = flags.DEFINE_integer("k_images", _DEFAULT.k_images, "K: images of the pixel gallery.")
_K_IMAGE_SCORE = flags.DEFINE_integer("k_image_score", _DEFAULT.k_image_score,
                                      "k of the image score.")
_KAPPA = flags.DEFINE_integer("kappa", _DEFAULT.kappa, "kappa: nearest features per pixel.")
_RESIZE = flags.DEFINE_integer("resize", _DEFAULT.resize, "Shorter side is resized to this.")
_CROP = flags.DEFINE_string("crop", str(_DEFAULT.crop), "Centre crop size, or 'none': the "
                            "whole image, resized to the first training image's size with "
                            "its shorter side at --resize (as evaluate.py --crop=none).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per backbone call.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of random kernels, folds, synthetic anomalies.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/kernels", "Where results go.")


def _features(spade, images):
  pool, levels = spade.extract(images)
  return pool, levels


def _evaluate_variant(name, fitted_fn, test_pool, test_levels, train_pool, train_levels,
                      data, masks, cfg):
  """(result dict without seconds, {fit, search, maps, metrics} seconds) of a variant."""
  clock = [time.perf_counter()]

  def lap():
    clock.append(time.perf_counter())
    return clock[-1] - clock[-2]

  fitted = fitted_fn()
  fit_s = lap()
  scores, nbrs = spade_jax.image_scores(test_pool, train_pool, cfg.k_image_score,
                                        num_neighbors=cfg.k_images, **fitted.image_kwargs())
  score_maps = spade_jax.pixel_scores(test_levels, train_levels, nbrs, kappa=cfg.kappa,
                                      combine=cfg.combine, **fitted.pixel_kwargs())
  scores, score_maps = np.asarray(scores), jax.block_until_ready(score_maps)
  search_s = lap()
  maps = np.asarray(spade_jax.anomaly_maps(score_maps, cfg.input_size, sigma=cfg.sigma))
  maps_s = lap()
  labels = np.asarray(data.test_labels)
  result = {"image_auroc": float(metrics.image_auroc(labels, scores)),
            "pixel_auroc": float(metrics.pixel_auroc(masks, maps)),
            "au_pro": float(metrics.au_pro(masks, maps)),
            "n_train": int(len(data.train_images)), "n_test": int(len(labels))}
  times = {"fit": fit_s, "search": search_s, "maps": maps_s, "metrics": lap()}
  logging.info("%s: image %.3f pixel %.3f pro %.3f (fit %.1f s, search %.1f s)", name,
               result["image_auroc"], result["pixel_auroc"], result["au_pro"], fit_s, search_s)
  return result, times


def _crop_box(shape: tuple[int, ...], resize: int, crop: int | None
              ) -> tuple[int, int, int, int]:
  """The centre crop the features see, in the images' pixels (the shorter side is
  resized to `resize`, then the centre crop x crop is kept; crop None: all of it)."""
  h, w = shape[:2]
  if crop is None:
    return 0, 0, h, w
  side = min(h, w) * crop / resize
  top, left = int(np.ceil((h - side) / 2)), int(np.ceil((w - side) / 2))
  return top, left, int((h + side) // 2), int((w + side) // 2)


def _read_timings(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def _comparison(output_dir: pathlib.Path, names: Sequence[str], extra: dict) -> str:
  """The Markdown comparison of every variant's results.json (means over categories)."""
  timings = _read_timings(output_dir / "timings.json")
  rows, base = [], None
  for name in names:
    path = output_dir / name / results_lib.RESULTS_FILE
    if not path.exists():
      continue
    res = results_lib.load_results(output_dir / name, extra[name][0], extra[name][1])
    if not res["categories"]:
      continue
    mean = res["mean"]
    seconds = np.mean([c["seconds"] for c in res["categories"].values()])
    own = timings.get(name, {})
    fit = np.mean([sum(v for k, v in own[c].items() if k != "backbone") for c in
                   res["categories"] if c in own] or [np.nan])
    if name == "l2":
      base = mean
    rows.append((name, mean, seconds, fit, len(res["categories"])))
  lines = ["| variant | image AUROC | pixel AUROC | AU-PRO | seconds / category | fit + score s"
           " (no backbone) | categories |", "|---|---|---|---|---|---|---|"]
  for name, mean, seconds, fit, count in rows:
    cells = []
    for m in results_lib.METRIC_NAMES:
      delta = "" if base is None or name == "l2" else f" ({100 * (mean[m] - base[m]):+.1f})"
      cells.append(f"{100 * mean[m]:.1f}{delta}")
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.1f} | {fit:.1f} | {count} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = sorted(set(_VARIANTS.value) - set(variants_lib.VARIANTS))
  if unknown or not _VARIANTS.value:
    sys.exit(f"kernels.py: error: unknown --variants {unknown}; valid: "
             f"{', '.join(variants_lib.VARIANTS)}")
  if _STEPS.value < 1 or not _LEARNING_RATE.value > 0:
    sys.exit("kernels.py: error: --steps must be >= 1 and --learning_rate > 0")
  from spade_jax.data import mvtec, synthetic  # pylint: disable=import-outside-toplevel
  from spade_jax.features.preprocessing import preprocess_masks  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(_OUTPUT_DIR.value)
  try:
    data_dir = _DATA_DIR.value
    if data_dir is None:
      evaluation.check_output_dir(out)
      from spade_jax.data import builtin  # pylint: disable=import-outside-toplevel
      data_dir = str(builtin.builtin_benchmark_dir())
    weights = None if _WEIGHTS.value.lower() == "none" else _WEIGHTS.value
    config = evaluation.EvalConfig(
        data_dir=data_dir, backbone=_BACKBONE.value, weights=weights,
        k_images=_K_IMAGES.value, k_image_score=_K_IMAGE_SCORE.value, kappa=_KAPPA.value,
        resize=_RESIZE.value, crop=geometry.parse_crop(_CROP.value, "--crop"))
    names = list(dict.fromkeys(_VARIANTS.value))
    extra, stores = {}, {}
    for name in names:
      variant = variants_lib.VARIANTS[name]
      recorded = {"variant": name, "metric": variant.kernel or "l2",
                  "aggregate": variant.aggregate}
      if variant.learned:
        recorded.update(objective=_OBJECTIVE.value, steps=_STEPS.value,
                        learning_rate=_LEARNING_RATE.value, seed=_SEED.value)
      elif variant.kernel in ("rff", "nystrom"):
        recorded.update(seed=_SEED.value)
      extra[name] = (config, recorded)
      stores[name] = results_lib.ResultsFile(evaluation.check_output_dir(out / name),
                                             results_lib.recorded_config(config, recorded))
      stores[name].claim()
    found = mvtec.list_categories(data_dir)
    todo = list(dict.fromkeys(_CATEGORIES.value or found))
    missing = sorted(set(todo) - set(found))
    if missing:
      raise ValueError(f"categories {missing} are not in {data_dir}; found {found}")
    for category in todo:  # Labels and counts, before any work (no image decoded).
      files = mvtec.scan_category(data_dir, category)
      evaluation.check_test_labels(category, [t.defect != mvtec.GOOD for t in files.test],
                                   len(files.train), config)
  except (ValueError, OSError) as e:
    sys.exit(f"kernels.py: error: {e}")
  base = spade_jax.Spade(spade_jax.load_backbone(config.backbone, weights=config.weights),
                         config.spade_config(_BATCH_SIZE.value))
  key = jax.random.key(_SEED.value)
  for c, category in enumerate(todo):
    pending = [n for n in names if category not in stores[n].read()["categories"]]
    if not pending:
      logging.info("%s: every variant done, skipped", category)
      continue
    data = mvtec.load_category(data_dir, category)
    # --crop=none: the category's first training image's size (shorter side at --resize).
    spade = common.with_whole_image_size(base, *data.train_images.shape[1:3])
    cfg = spade.config
    masks = preprocess_masks(data.test_masks, resize=cfg.resize, crop=cfg.crop,
                             image_size=cfg.image_size)
    start = time.perf_counter()
    train_pool, train_levels = _features(spade, data.train_images)
    test_pool, test_levels = _features(spade, data.test_images)
    backbone_s = time.perf_counter() - start
    anomalies, anomaly_s = None, 0.0
    if _OBJECTIVE.value == "synthetic" and any(variants_lib.VARIANTS[n].learned
                                               for n in pending):
      start = time.perf_counter()
      images, sources, _ = synthetic.synthetic_anomalies(
          data.train_images, seed=_SEED.value,
          box=_crop_box(data.train_images.shape[1:], cfg.resize, cfg.crop))
      anomalies = (_features(spade, images)[0], sources)
      anomaly_s = time.perf_counter() - start
    for name in pending:
      variant = variants_lib.VARIANTS[name]
      fit = lambda name=name: variants_lib.fit_variant(
          name, train_pool, train_levels, objective=_OBJECTIVE.value, steps=_STEPS.value,
          learning_rate=_LEARNING_RATE.value, key=jax.random.fold_in(key, c),
          anomalies=anomalies)
      result, times = _evaluate_variant(name, fit, test_pool, test_levels, train_pool,
                                        train_levels, data, masks, cfg)
      times["backbone"] = backbone_s + (anomaly_s if variant.learned else 0.0)
      result["seconds"] = float(sum(times.values()))
      # evaluate.py's stages; the kernel's fit is part of the search.
      result["stage_seconds"] = {"backbone": times["backbone"],
                                 "search": times["fit"] + times["search"],
                                 "maps": times["maps"], "metrics": times["metrics"]}
      stores[name].merge(category, result)
      timings = _read_timings(out / "timings.json")
      timings.setdefault(name, {})[category] = times
      with atomic.atomic_path(out / "timings.json") as tmp:
        tmp.write_text(json.dumps(timings, indent=1) + "\n")
    print(f"[{c + 1}/{len(todo)}] {category}: backbone {backbone_s:.1f} s; "
          + ", ".join(f"{n} {stores[n].read()['categories'][category]['image_auroc']:.3f}"
                      for n in names), flush=True)
  table = _comparison(out, names, extra)
  (out / "comparison.md").write_text(table + "\n")
  for name in names:
    print(f"\n## {name}\n\n" + evaluation.format_table(stores[name].read()))
  print("\n## Comparison (means; differences from l2 in points)\n\n" + table)
  print(f"\nresults: {out}/<variant>/{results_lib.RESULTS_FILE}, {out}/comparison.md")


if __name__ == "__main__":
  app.run(main)
