"""Fit on a folder of normal images, score a folder of new ones: fit.py and predict.py.

  report = fit_folder(spade, "good/", "part.spade", calibrate=True)
  contents = spade_jax.detector.load_index_file("part.spade")
  report = predict_folder(spade, contents.index, "new/", "out/",
                          threshold=contents.threshold)

Both read every image under their folder (spade_jax.data.folder: any depth, the usual
formats), in sorted order of their relative paths, a chunk at a time (memory holds
one chunk of decoded images, not the folder). A file that is not a readable image is
logged (a warning naming it and why), left out and listed in the report, never fatal.
Chunks hold whole batches of readable images, so the detector sees the batches it
would see for the same images passed at once: the numbers equal Spade.fit / score's.

An Ensemble (detector/ensemble.py) goes through the same two functions: fit_folder
extracts every member's features chunk by chunk, fits the ensemble (its held-out
statistics) and writes an ensemble index folder (save_ensemble_index); with calibrate
the threshold is the quantile of its combined held-out scores (Ensemble.threshold).
predict_folder scores with Ensemble.score; the maps are at its first member's input
size. Tiles are not supported with an ensemble.

Whole images (a detector config with crop=None, fit.py's and predict.py's default):
fit_folder takes the one input size from the first image unless the config's
image_size gives it, and the index records it (spade_jax.features.geometry).

predict_folder writes scores.csv, heatmaps/, maps/ (save_maps) and summary.png
(predictions.py), every map at its image's own size. The heatmaps share one colour
scale, the min and max over all the maps of the run, which is only known once every
image is scored: the maps at the input size wait in a memory-mapped file in the run's
staging folder meanwhile, and each image is read again for its heatmap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import datetime
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import PIL.Image

from spade_jax.data import folder
from spade_jax.detector import calibration, common, index_ensemble, index_file, tiling
from spade_jax.detector import padim as padim_lib
from spade_jax.detector import patchcore as patchcore_lib
from spade_jax.detector import spade as spade_lib
from spade_jax.detector.ensemble import Ensemble
from spade_jax.detector.padim import Padim
from spade_jax.detector.spade import Spade
from spade_jax.evaluation import heatmaps, predictions
from spade_jax.features import geometry
from spade_jax.host import progress

_CHUNK_BATCHES = 8  # Images read at once = this many detector batches.
_SUMMARY_SIDE = 320  # Summary rows show large photos shrunk to this shorter side.


@dataclasses.dataclass(frozen=True)
class FitReport:
  """What fit_folder did.

  Attributes:
    index_path: the index file written.
    num_images: training images in the index (tiles, with tiling).
    skipped: files left out (not readable images).
    threshold: the calibrated threshold stored with the index, or None.
    held_out_scores: [num_images] the calibration's held-out scores, or None.
    seconds: wall time.
    input_size: (H, W) every image was resized (and cropped) to: the maps' size.
  """
  index_path: pathlib.Path
  num_images: int
  skipped: list[folder.Skipped]
  threshold: calibration.Threshold | None
  held_out_scores: np.ndarray | None
  seconds: float
  input_size: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class PredictReport:
  """What predict_folder did.

  Attributes:
    paths: the scored images, relative to the image folder, sorted.
    scores: [len(paths)] float32 image scores.
    skipped: files left out (not readable images).
    scores_csv: <output_dir>/scores.csv.
    summary_png: <output_dir>/summary.png, or None (num_summary=0).
    vmin, vmax: the heatmaps' colour scale.
    seconds: wall time.
  """
  paths: list[str]
  scores: np.ndarray
  skipped: list[folder.Skipped]
  scores_csv: pathlib.Path
  summary_png: pathlib.Path | None
  vmin: float
  vmax: float
  seconds: float


def _warn_skip(skipped: list[folder.Skipped]) -> Callable[[folder.Skipped], None]:
  def on_skip(item: folder.Skipped) -> None:
    logging.warning("skipped %s: not a readable image (%s)", item.relative, item.reason)
    skipped.append(item)
  return on_skip


def _image_files(images_dir, what: str, exclude=()) -> list[folder.ImageFile]:
  try:
    files = folder.list_images(images_dir, exclude=exclude)
  except (FileNotFoundError, NotADirectoryError) as e:
    raise ValueError(f"{what}: {e}") from e
  if not files:
    raise ValueError(f"{what}: no image file under {str(images_dir)!r} (looked for "
                     f"{', '.join(folder.IMAGE_EXTENSIONS)} at any depth, any case)")
  return files


def _check_k(spade, count: int, where: str) -> None:
  """SPADE's k_images / k_image_score need that many training images, PaDiM two
  (PatchCore's memory bank is checked when it is fitted)."""
  for name in ("k_images", "k_image_score"):
    value = getattr(spade.config, name, None)
    if value is not None and value > count:
      raise ValueError(f"{where} holds {count} training images, fewer than "
                       f"{name}={value}; lower --{name} or add training images")
  if isinstance(spade, Padim) and count < calibration.PADIM_MIN_IMAGES:
    raise ValueError(f"{where} holds {count} training image(s); PaDiM needs at least "
                     f"{calibration.PADIM_MIN_IMAGES} (a covariance per position): add "
                     "training images")


def _check_learned(spade, count: int, where: str) -> None:
  """A learned kernel (metric "learned") is fitted on held-out images: it needs at least
  calibration.LEARNED_MIN_IMAGES training images."""
  if getattr(spade.config, "metric", None) in calibration.LEARNED_METRICS \
      and count < calibration.LEARNED_MIN_IMAGES:
    raise ValueError(f"{where} holds {count} training image(s); metric='learned' learns its "
                     f"kernel on held-out images and needs at least "
                     f"{calibration.LEARNED_MIN_IMAGES}: add training images or use another "
                     "--metric")


def _shape_config(detector) -> Any:
  """The config holding the input geometry and batch size: the detector's, or an
  Ensemble's first member's (the members share them; its maps are at that size)."""
  return detector.members[0].config if isinstance(detector, Ensemble) else detector.config


def _members(detector) -> tuple[Any, ...]:
  """An Ensemble's member detectors, or (detector,)."""
  return detector.members if isinstance(detector, Ensemble) else (detector,)


def _check_members(detector, count: int, where: str) -> None:
  """_check_k and _check_learned for the detector or each ensemble member (named)."""
  for member, name in zip(_members(detector), getattr(detector, "names", [None])):
    member_where = where if name is None else f"{where} (ensemble member {name!r})"
    _check_k(member, count, member_where)
    _check_learned(member, count, member_where)


def check_index_path(path: str | os.PathLike[str], folder: bool = False) -> pathlib.Path:
  """Checks that an index can be written at `path` (before any work).

  Args:
    path: the index file, or with folder=True an ensemble index folder (new, or an
      ensemble index to replace).
    folder: an ensemble index (save_ensemble_index).

  Raises:
    ValueError: `path` is a folder (folder=True: something other than an ensemble
      index), or its folder does not exist or is not writable.
  """
  path = pathlib.Path(path)
  fix = "choose another index path (--index)"
  if folder:
    if path.exists() and not index_ensemble.is_ensemble_index(path):
      raise ValueError(f"index path {str(path)!r} exists and is not an ensemble index "
                       f"folder (one it would replace); {fix}, e.g. a new folder name")
  elif path.is_dir():
    raise ValueError(f"index path {str(path)!r} is a folder; name a file in it, e.g. "
                     f"{str(path / 'index.spade')!r}")
  if not path.parent.is_dir():
    raise ValueError(f"cannot write index {str(path)!r}: folder {str(path.parent)!r} does "
                     f"not exist; create it or {fix}")
  try:
    fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".write_test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise ValueError(f"cannot write index {str(path)!r}: folder {str(path.parent)!r} is not "
                     f"writable ({e.strerror or e}); {fix}") from e
  return path


def fit_folder(spade, train_dir: str | os.PathLike[str], index_path: str | os.PathLike[str],
               *, calibrate: bool = False, quantile: float = 0.99, folds: int | None = None,
               settings: dict[str, Any] | None = None,
               tiles: tiling.TileConfig | None = None,
               log: Callable[[str], None] = logging.info) -> FitReport:
  """Fits `spade` on every image under `train_dir` and writes the index (save_index).

  A detector whose config has crop=None (the whole image) and no image_size gets the
  first readable image's size with its shorter side at config.resize (aspect kept);
  every image is resized to that one size (a warning counts those stretched to it),
  and the index records it: predict_folder uses it.

  Args:
    spade: a spade_jax.Spade, PatchCore or Padim (its config's batch_size sets the
      chunking), or an Ensemble of them (an ensemble index folder is written).
    train_dir: the folder of normal images.
    index_path: the index file to write (atomically; its folder must exist); an
      Ensemble's: the index folder (save_ensemble_index).
    calibrate: also store a decision threshold (calibration.spade_threshold,
      patchcore_threshold or padim_threshold; an Ensemble's: Ensemble.threshold, on
      its combined held-out scores).
    quantile, folds: of the calibration (folds None: SPADE leave-one-out, PatchCore
      calibration.PATCHCORE_FOLDS folds, PaDiM calibration.PADIM_FOLDS; an Ensemble:
      its config's folds, the standardisation's, and another folds is an error).
    settings: recorded in the index (save_index's `settings`), e.g. fit.py's flags.
    tiles: fit on the images' tiles at their native resolution (detector.tiling; every
      tile counts as a training image); recorded in the index's settings. With
      calibrate, the folds are folds of whole images and an image's held-out score is
      the max over its tiles (calibration's groups).
    log: progress lines.

  Raises:
    ValueError: no (readable) image, too few for k_images / the calibration, or an
      unwritable index path; the message names the folder or file and the fix.
  """
  start = time.perf_counter()
  ensemble = isinstance(spade, Ensemble)
  if ensemble and tiles is not None:
    raise ValueError("tiles (--tile_size) are not supported with an ensemble yet")
  if ensemble and folds is not None and folds != spade.config.folds:
    raise ValueError(f"an ensemble's threshold is calibrated on the held-out scores of "
                     f"its own {spade.config.folds} folds (EnsembleConfig.folds, "
                     f"--ensemble_folds), not {folds}")
  index_path = check_index_path(index_path, folder=ensemble)
  files = _image_files(train_dir, "training images")
  if tiles is not None:
    tiled = tiling.Tiled(spade, tiles)  # Every tile one input of T x T.
    spade = tiled.detector
    settings = {**(settings or {}), **tiles.settings()}
  else:  # (Tiles are more than the images: counted after reading.)
    _check_members(spade, len(files), f"training folder {str(train_dir)!r}")
  is_spade = isinstance(spade, Spade)
  if tiles is not None:
    _check_learned(spade, len(files), f"training folder {str(train_dir)!r}")
  if ensemble:  # Its held-out statistics need the folds, calibrated or not.
    spade.check_folds(len(files), quantile if calibrate else 0.5)
  elif calibrate:  # Checked before any work; again below if files are skipped.
    if tiles is None:
      calibration.calibration_folds(spade, len(files), quantile, folds)
    else:  # Folds of whole images; the tiles each fold fits on are checked once cut.
      calibration.check_calibration_args(len(files), quantile, folds, 0)
  log(f"fit: {len(files)} image files under {train_dir}")
  skipped: list[folder.Skipped] = []
  # extract() outputs: Spade's (pool, {level: ...}), PatchCore's patches, PaDiM's embeddings.
  chunks = []
  report = progress.Progress("fit: features of", len(files), log=log)
  chunk = _CHUNK_BATCHES * _shape_config(spade).batch_size
  count = stretched = 0
  tile_counts: list[int] = []  # Tiles: the tiles of each image read.
  for images, _ in folder.read_chunks(files, chunk, _warn_skip(skipped)):
    if not count:  # Whole images: one input size, the first image's unless given.
      spade = common.with_whole_image_size(spade, *images[0].shape[:2])
      h, w = _shape_config(spade).input_size
      if tiles is not None:
        log(f"fit: tiles of {h}x{w} at the images' native resolution")
      elif _shape_config(spade).crop is None:
        log(f"fit: whole images, resized to {h}x{w} (image_size)")
    if tiles is None:
      with progress.quiet():
        chunks.append(spade.extract(images))
      count += len(images)
      stretched += _count_stretched(images, _shape_config(spade))
    else:  # The tiles of these images (their positions appended if asked).
      with progress.quiet():
        features, counts = tiled.extract(images)
      chunks.append(features)
      tile_counts += counts
      count += sum(counts)
    report.update(count + len(skipped))
  if count == 0:
    raise ValueError(f"training images: none of the {len(files)} image files under "
                     f"{str(train_dir)!r} is readable (see the warnings above)")
  _warn_stretched(stretched, count, _shape_config(spade), "fit")
  _check_members(spade, count, f"training folder {str(train_dir)!r} (readable images)")
  groups = None if tiles is None else calibration.image_groups(tile_counts)
  if ensemble:
    how = calibration.describe_folds(spade.check_folds(count), count)
    log(f"fit: {len(spade.members)} ensemble members, each refitted per fold ({how}) for "
        "its held-out statistics"
        + (f"; threshold: quantile {quantile} of the combined held-out scores"
           if calibrate else ""))
  elif calibrate:  # The plan, checked and logged before the index is fitted.
    num_images = count if tiles is None else len(tile_counts)
    how = calibration.describe_folds(
        calibration.calibration_folds(spade, count, quantile, folds, groups), num_images)
    what = "" if tiles is None else f" (the max over their {count} tiles)"
    log(f"calibrate (after the fit): {how} image scores of the {num_images} training "
        f"images{what}, quantile {quantile}")
  features = jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)
  if ensemble:
    index, held_out = spade.fit_held_out(features, log=log)
    threshold, held_out = (spade.threshold(index, held_out, quantile) if calibrate
                           else (None, None))
    index_ensemble.save_ensemble_index(index_path, index, threshold=threshold,
                                       settings=settings)
    return FitReport(index_path, count, skipped, threshold, held_out,
                     time.perf_counter() - start, _shape_config(spade).input_size)
  index = spade.fit_features(*(features if is_spade else (features,)))
  threshold = held_out = None
  if calibrate:
    if is_spade:
      threshold, held_out = calibration.spade_threshold(
          spade, features[0], quantile=quantile, folds=folds, groups=groups)
    elif isinstance(spade, Padim):
      threshold, held_out = calibration.padim_threshold(
          spade, features, quantile=quantile, folds=folds, groups=groups)
    else:
      threshold, held_out = calibration.patchcore_threshold(
          spade, features, quantile=quantile, folds=folds, groups=groups)
  index_file.save_index(index_path, index, threshold=threshold, settings=settings)
  return FitReport(index_path, count, skipped, threshold, held_out,
                   time.perf_counter() - start, spade.config.input_size)


def _count_stretched(images: Sequence[np.ndarray], config: Any) -> int:
  """How many of `images` a whole-image config resizes to another aspect ratio (more
  than 1% off its input size's); 0 with a crop (aspect kept)."""
  if config.crop is not None:
    return 0
  h, w = config.input_size
  return sum(int(abs((x.shape[0] / x.shape[1]) / (h / w) - 1) > 0.01) for x in images)


def _warn_stretched(count: int, total: int, config: Any, what: str) -> None:
  if count:
    h, w = config.input_size
    logging.warning("%s: %d of %d images have another aspect ratio than the input size "
                    "%dx%d (image_size) and were resized to it, stretched", what, count,
                    total, h, w)


def _summary_panel(path: pathlib.Path, full_map: np.ndarray, fill: float
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(image, map) of one summary row: the image and its map (at the image's size, NaN
  outside a crop: `fill`), their shorter side at most _SUMMARY_SIDE pixels (large
  photos shrunk)."""
  image = folder.read_image(path)
  full_map = np.nan_to_num(full_map, nan=fill)
  h, w = image.shape[:2]
  scale = min(1.0, _SUMMARY_SIDE / min(h, w))
  if scale < 1:
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(PIL.Image.fromarray(image).resize(size, PIL.Image.BILINEAR))
    full_map = np.asarray(PIL.Image.fromarray(full_map.astype(np.float32), "F").resize(
        size, PIL.Image.BILINEAR))
  return image, full_map


def predict_folder(spade, index, images_dir: str | os.PathLike[str],
                   output_dir: str | os.PathLike[str], *,
                   threshold: calibration.Threshold | None = None, write_heatmaps: bool = True,
                   num_summary: int = 8, save_maps: bool = False,
                   tiles: tiling.TileConfig | None = None,
                   log: Callable[[str], None] = logging.info) -> PredictReport:
  """Scores every image under `images_dir` with `index`; writes predictions.py's files.

  Args:
    spade: a spade_jax.Spade, PatchCore or Padim whose backbone and feature config
      match the index (PaDiM: and its fit settings), or an Ensemble of them whose
      members match the index's.
    index: its SpadeIndex, PatchCoreIndex, PadimIndex or EnsembleIndex (e.g.
      load_index_file(...).index, load_ensemble_index(...)). A
      SpadeIndex without the kernels / bandwidths spade's config needs (fitted for
      another metric) gets them first, from its own training features (fit_kernels).
    images_dir: the folder of images to score (an output_dir inside it is left out).
    output_dir: where the files go (created).
    threshold: adds the anomalous column and marks the summary (None: no decisions).
    write_heatmaps: one heatmap PNG per image.
    num_summary: images in summary.png (0: no summary).
    save_maps: also write maps/<path>.npy per image: float32 [H, W] at the image's own
      size (predictions.write_map; NaN outside a crop's region).
    tiles: score each image tile by tile at its native resolution (detector.tiling;
      an index fitted with the same tile_size); image score = max over its tiles.
    log: progress lines.

  The maps of the heatmaps, of maps/ and of the summary are at each image's own size
  (geometry.to_original); the heatmaps show the image as it is, with its map.

  Raises:
    ValueError: no (readable) image, an unusable output_dir, an index for another
      backbone or feature config.
  """
  start = time.perf_counter()
  if isinstance(num_summary, bool) or not isinstance(num_summary, int) or num_summary < 0:
    raise ValueError(f"num_summary must be an int >= 0, got {num_summary!r}")
  if tiles is not None:
    if isinstance(spade, Ensemble):
      raise ValueError("tiles (--tile_size) are not supported with an ensemble yet")
    spade = tiling.tiled_detector(spade, tiles)  # Every tile one input of T x T.
  if threshold is not None:  # Before any work: a threshold applied under other settings.
    threshold.check(spade.config, "predict")
  if isinstance(spade, Ensemble):
    spade.check_index(index)
    index = index.replace(indices=tuple(
        _checked_index(member, member_index, log)
        for member, member_index in zip(spade.members, index.indices)))
  else:
    index = _checked_index(spade, index, log)
  cfg = _shape_config(spade)
  # The images first: a run with nothing to score creates no output folder.
  files = _image_files(images_dir, "images", exclude=[output_dir])
  predictions.check_output_dir(output_dir)
  skipped: list[folder.Skipped] = []
  for item in folder.list_unsupported(images_dir, exclude=[output_dir]):
    _warn_skip(skipped)(item)  # GIF, HEIC, ...: listed in skipped.csv, not read.
  unsupported = len(skipped)
  log(f"predict: {len(files)} image files under {images_dir}")
  paths, scores = [], []
  report = progress.Progress("predict: processed", len(files), log=log)
  # Every output is built in the run's staging folder and put in place at the end
  # (predictions.start_run): the folder holds the previous complete run until then.
  with predictions.start_run(output_dir) as run:
    # Maps at the input size wait in a memory-mapped file; each image's own size is
    # restored when its outputs are written (the images are read again then).
    # With tiles, each image's stitched map (at its own size) waits in a .npy file.
    maps = None if tiles is not None else np.memmap(
        run.stage / ".input-maps", np.float32, "w+", shape=(len(files), *cfg.input_size))
    tiled = None if tiles is None else tiling.Tiled(spade, tiles)
    tile_maps = run.stage / ".tile-maps"
    sizes, stretched, low, high = [], 0, np.inf, -np.inf
    for images, read in folder.read_chunks(files, _CHUNK_BATCHES * cfg.batch_size,
                                           _warn_skip(skipped)):
      if tiled is None:
        with progress.quiet():
          chunk_scores, chunk_maps = spade.score(index, images)
        maps[len(paths):len(paths) + len(read)] = chunk_maps
        low, high = min(low, chunk_maps.min()), max(high, chunk_maps.max())
        stretched += _count_stretched(images, cfg)
      else:
        chunk_scores = []
        for i, image in enumerate(images):
          with progress.quiet():
            score, full = tiled.score_image(index, image)
          tile_maps.mkdir(exist_ok=True)
          np.save(tile_maps / f"{len(paths) + i}.npy", full)
          chunk_scores.append(score)
          low, high = min(low, full.min()), max(high, full.max())
        chunk_scores = np.asarray(chunk_scores, np.float32)
      sizes += [image.shape[:2] for image in images]
      paths += [f.relative for f in read]
      scores.append(chunk_scores)
      report.update(len(paths) + len(skipped) - unsupported)
    if not paths:
      raise ValueError(f"images: none of the {len(files)} image files under "
                       f"{str(images_dir)!r} is readable (see the warnings above)")
    _warn_stretched(stretched, len(paths), cfg, "predict")
    scores = np.concatenate(scores).astype(np.float32)
    skipped.sort(key=lambda s: s.relative)
    cut = None if threshold is None else threshold.value
    predictions.write_scores(run.stage, paths, scores, cut)
    predictions.write_skipped(run.stage, [(s.relative, s.reason) for s in skipped])
    n = len(paths)
    vmin, vmax = float(low), float(high)
    by_path = {f.relative: f.path for f in files}

    def full_map(i: int) -> np.ndarray:  # Image i's map at its own size.
      if tiled is not None:
        return np.load(tile_maps / f"{i}.npy")
      return geometry.to_original(maps[i], *sizes[i], resize=cfg.resize, crop=cfg.crop)

    if write_heatmaps or save_maps:
      for i, path in enumerate(paths):
        image = folder.read_image(by_path[path]) if write_heatmaps else None
        full = full_map(i)
        if save_maps:
          predictions.write_map(run.stage, path, full)
        if write_heatmaps:
          figure = heatmaps.render_prediction(image, np.nan_to_num(full, nan=vmin),
                                              vmin=vmin, vmax=vmax)
          heatmaps.save_png(predictions.heatmap_path(run.stage, path), figure)
    if num_summary:
      top = np.argsort(-scores, kind="stable")[:num_summary]
      captions = predictions.summary_captions([paths[i] for i in top], scores[top], cut)
      panels = [_summary_panel(by_path[paths[i]], full_map(i), vmin) for i in top]
      figure = predictions.render_summary([v for v, _ in panels], [m for _, m in panels],
                                          captions, vmin=vmin, vmax=vmax)
      heatmaps.save_png(run.stage / predictions.SUMMARY_FILE, figure)
    maps = None  # Close the memory map before its folder goes.
    shutil.rmtree(tile_maps, ignore_errors=True)
    run.commit(_run_record(spade, images_dir, n, len(skipped), cut))
  return PredictReport(paths, scores, skipped, run.out / predictions.SCORES_FILE,
                       run.out / predictions.SUMMARY_FILE if num_summary else None, vmin,
                       vmax, time.perf_counter() - start)


def _checked_index(spade, index, log: Callable[[str], None]):
  """`index`, checked against the detector's backbone, weights and config (a SPADE
  index without the kernels its metric needs gets them first, fit_kernels)."""
  cfg = spade.config
  if isinstance(spade, Spade):
    spade_lib.check_compatible(index, spade.backbone.name, cfg, "predict",
                               weights=common.weights_id(spade.backbone))
    _check_k(spade, index.num_images, "the index")
    if index.missing_fits(cfg):  # Once here, not per chunk of images.
      log(f"predict: fitting what metric={cfg.metric!r}, aggregate={cfg.aggregate!r} need "
          f"on the index's {index.num_images} training images")
      index = spade.fit_kernels(index)
  elif isinstance(spade, Padim):
    padim_lib.check_index(index, spade.backbone.name, cfg, "predict",
                          weights=common.weights_id(spade.backbone),
                          num_channels=spade.num_channels)
  else:
    patchcore_lib.check_compatible(index, spade.backbone.name, cfg, "predict",
                                   weights=common.weights_id(spade.backbone))
    patchcore_lib.check_metric(index, cfg, "predict")
  return index


def _run_record(spade, images_dir, num_images: int, num_skipped: int,
                threshold: float | None) -> dict[str, Any]:
  """What <output_dir>/.predict-complete says about a predict run."""
  return {"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "images_dir": os.path.abspath(images_dir), "images": num_images,
          "skipped": num_skipped, "method": type(spade).__name__,
          "backbone": ",".join(dict.fromkeys(m.backbone.name for m in _members(spade))),
          "threshold": None if threshold is None else float(threshold)}
