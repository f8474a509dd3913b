"""export_detector: a fitted detector as a folder that runs with jax, numpy, pillow and
safetensors alone.

  spade_jax.export_detector(detector, index, "part_export", platforms=("cpu", "cuda"),
                            threshold=contents.threshold)
  python part_export/run.py --images=incoming --output_dir=out

The folder (artifact.py writes it):
  program.jaxexport    jax.export of images [B, H, W, 3] uint8 -> scores [B], maps
                       [B, H, W] (+ anomalous [B] with a threshold), (H, W) the detector's
                       input size (config.input_size): normalisation,
                       backbone, the streamed search (XLA alone: no custom call, so it runs
                       on any jax install), scoring, upsampling and blur, the decision
  arrays.safetensors   what the program reads, as arguments (not constants): backbone
                       variables, gallery / memory bank / Gaussians, kernels, threshold
  manifest.json        versions, settings, the geometry (input size, resize, crop or
                       image_size) and layout, platforms, the SHA-256 of every file
  run.py               the standalone runner (runner.py)

run.py brings each image to the input size as the library does (features/geometry.py:
with a crop, shorter side to resize and centre crop; with crop=None, a resize to
image_size) and maps each anomaly map back to the image's own size (geometry.to_original),
as predict.py's --save_maps. An Ensemble exports one program: its members' programs on
the same input, standardised and combined as Ensemble.score (programs.ensemble_program);
its members must share resize / crop / image_size, and it cannot be tiled. A tiled
detector (fit.py / predict.py --tile_size; detector.tiling.Tiled) exports a program of
T x T tiles: run.py cuts every image into tiles at its native resolution as tiling.py
does, stitches their maps at the image's size (mean or max) and takes the largest tile
score.

The program is traced from the detector's own scoring functions (programs.py), at the
batch size given (static: the search's blocking is chosen from the query count, so a
symbolic batch cannot be traced): run.py pads the last batch. The search keeps the
library's memory bound (streamed blocks, never the full distance matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import pathlib
import time
from typing import Any

import jax
from jax import export
import jax.numpy as jnp
import numpy as np

from spade_jax.deploy import artifact, programs
from spade_jax.detector import calibration, tiling
from spade_jax.detector.ensemble import Ensemble, EnsembleIndex
from spade_jax.search import cpu_kernel

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_platforms(platforms: Any) -> tuple[str, ...]:
  """A non-empty tuple of distinct names from PLATFORMS (a comma-separated string too).

  Raises:
    ValueError: naming the bad platform.
  """
  if isinstance(platforms, str):
    platforms = [p.strip() for p in platforms.split(",") if p.strip()]
  platforms = tuple(platforms)
  if not platforms:
    raise ValueError(f"platforms must name at least one of {PLATFORMS}")
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown:
    raise ValueError(f"platforms must be among {PLATFORMS}, got {unknown}")
  if len(set(platforms)) != len(platforms):
    raise ValueError(f"platforms has duplicates: {list(platforms)}")
  return platforms


def check_image_size(image_size: Any, name: str = "fixed_image_size"
                     ) -> tuple[int, int] | None:
  """None (any size, resized as the detector does), an int (square) or (height, width).

  Raises:
    ValueError: not positive ints.
  """
  if image_size is None:
    return None
  size = (image_size, image_size) if _is_int(image_size) else tuple(image_size) \
      if isinstance(image_size, (tuple, list)) else None
  if size is None or len(size) != 2 or not all(_is_int(s) and s >= 1 for s in size):
    raise ValueError(f"{name} must be None, a positive int or (height, width), got "
                     f"{image_size!r}")
  return int(size[0]), int(size[1])


def split_tiles(detector: Any) -> tuple[Any, tiling.TileConfig | None]:
  """(the detector a program is built from, its TileConfig or None): a tiled detector
  (detector.tiling.Tiled) gives its inner detector, whose input is one tile (crop=None,
  image_size=(T, T)), and its tiling."""
  if isinstance(detector, tiling.Tiled):
    return detector.detector, detector.tiles
  return detector, None


def input_size_of(detector: Any) -> tuple[int, int]:
  """The (H, W) a detector's program takes: config.input_size, or an Ensemble's
  output_size (its first member's input size, which every member must share)."""
  if isinstance(detector, Ensemble):
    return tuple(detector.output_size)
  return tuple(detector.config.input_size)


def default_batch_size(detector: Any) -> int:
  """config.batch_size, or an Ensemble's first member's (the members share it when fit.py
  builds them)."""
  if isinstance(detector, Ensemble):
    return detector.members[0].config.batch_size
  return detector.config.batch_size


def threshold_below(value: float) -> np.float32:
  """The largest float32 t <= value: a float32 score s has s > value exactly when s > t
  (predict.py compares the float32 score with the threshold in float64)."""
  t = np.float32(value)
  if float(t) > value:
    t = np.nextafter(t, np.float32(-np.inf))
  return t


def export_detector(detector: Any, index: Any, output_dir: str | os.PathLike[str], *,
                    platforms: Sequence[str] | str = ("cpu",), batch_size: int | None = None,
                    image_size: int | tuple[int, int] | None = None,
                    fixed_image_size: int | tuple[int, int] | None = None,
                    threshold: calibration.Threshold | None = None) -> pathlib.Path:
  """Writes a fitted detector as a deployable folder (see the module docstring).

  Args:
    detector: a Spade, PatchCore or Padim with a spade_jax Backbone (or any detector with
      a builder in programs.py), an Ensemble of them (one program: each member's on the
      same input, standardised and combined as Ensemble.score; the members must share
      resize, crop and image_size; not tiled), or one of them tiled
      (detector.tiling.Tiled, as fit.py / predict.py --tile_size use it): the program
      then scores batches of T x T tiles, and run.py cuts each image into tiles at its
      native resolution as tiling.py does (same positions), stitches the tile maps (the
      TileConfig's merge) and takes the largest tile score as the image's.
    index: its fitted index (from fit / load_index; an Ensemble's EnsembleIndex, from
      fit / load_ensemble_index), checked as score checks it.
    output_dir: the folder to write; it must not exist, or be empty.
    platforms: where the program may run: any of PLATFORMS (one multi-platform export).
    batch_size: images (tiles, when tiled) per program call; default
      detector.config.batch_size (an Ensemble: its first member's). The batch dimension
      is static: run.py pads the last batch (the search's blocking is chosen from the
      static query count, search.blocking.default_blocks, so the program cannot be traced
      with a symbolic batch).
    image_size: the program's input (height, width) or an int (square): the detector's
      input size (config.input_size: its crop, or its image_size without one; (T, T)
      when tiled; an Ensemble's output_size), which is also the default (None). Another
      size is refused: the index's features were extracted at that size.
    fixed_image_size: None: images of any size are brought to the detector's input size
      as it does (its resize, crop or image_size); (height, width) or an int: run.py
      refuses images of another size (e.g. a fixed camera whose frames must all be
      alike).
    threshold: the index's calibrated threshold (load_index_file(...).threshold; an
      ensemble's: load_ensemble_index_file(...).threshold, on its combined scores); adds
      the decision "anomalous" (score > threshold). Checked against the detector's
      scoring settings (an Ensemble's: EnsembleConfig.score_settings()).

  Returns:
    The folder written.

  Raises:
    ValueError: a bad argument, a detector that cannot be exported, an index that does
      not fit it, a threshold calibrated under other settings, a fixed image size smaller
      than the tiles, a tiled Ensemble or one whose members' inputs differ, or an output
      folder that is not empty.
  """
  start = time.perf_counter()
  platforms = check_platforms(platforms)
  detector, tiles = split_tiles(detector)
  if tiles is not None and isinstance(detector, Ensemble):
    raise ValueError("an ensemble cannot be exported with tiles (tiles are not supported "
                     "with an ensemble); export it untiled")
  batch_size = default_batch_size(detector) if batch_size is None else batch_size
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  input_size = check_image_size(image_size, "image_size")
  if input_size is not None and input_size != input_size_of(detector):
    raise ValueError(f"image_size={image_size!r} is not the detector's input size "
                     f"{input_size_of(detector)} (its index was fitted at that size; "
                     f"fit again at the other size to export it)")
  fixed_image_size = check_image_size(fixed_image_size)
  if tiles is not None and fixed_image_size is not None \
      and min(fixed_image_size) < tiles.tile_size:
    raise ValueError(f"fixed_image_size={fixed_image_size} is smaller than the tiles "
                     f"(tile_size={tiles.tile_size})")
  if threshold is not None:
    if not isinstance(threshold, calibration.Threshold):
      raise ValueError(f"threshold must be a calibration.Threshold (load_index_file(...)"
                       f".threshold) or None, got {type(threshold).__name__}")
    threshold.check(detector.config, "export_detector")
  out = artifact.check_output_dir(output_dir)
  program = programs.build(detector, index)
  tree = {"program": programs.as_numpy_tree(program.arrays)}
  if threshold is not None:
    tree["threshold"] = threshold_below(threshold.value)
  arrays, rebuild = artifact.flatten_arrays(tree)

  def run(named_arrays, images):
    values = rebuild(named_arrays)
    scores, maps = program.score(values["program"], programs.normalise(images))
    outputs = {"scores": scores.astype(jnp.float32), "maps": maps.astype(jnp.float32)}
    if threshold is not None:
      outputs["anomalous"] = outputs["scores"] > values["threshold"]
    return outputs

  specs = {name: jax.ShapeDtypeStruct(a.shape, a.dtype) for name, a in arrays.items()}
  images = jax.ShapeDtypeStruct((batch_size, *program.input_size, 3), jnp.uint8)
  with cpu_kernel.xla_only():
    exported = export.export(jax.jit(run), platforms=platforms)(specs, images)
  text = exported.mlir_module()
  if cpu_kernel.TARGET in text:  # xla_only() failed: a program that needs spade_jax.
    raise RuntimeError(f"the exported program calls spade_jax's CPU kernel "
                       f"{cpu_kernel.TARGET}; please report this")
  manifest = artifact.manifest(
      method=program.method, settings=program.settings, platforms=platforms,
      batch_size=batch_size, input_size=program.input_size, resize=program.resize,
      crop=program.crop, fixed_image_size=fixed_image_size, tiles=tiles, arrays=arrays,
      threshold=threshold,
      index_info=_index_info(index), custom_calls=artifact.custom_call_targets(text))
  artifact.write(out, exported.serialize(), arrays, manifest,
                 export_seconds=time.perf_counter() - start)
  return out


def _index_info(index: Any) -> dict[str, Any]:
  """The manifest's "index": the backbone, feature settings and fingerprint it was
  fitted with (an ensemble's: its members' names, statistics kind and each member's)."""
  if isinstance(index, EnsembleIndex):
    return {"ensemble_members": list(index.members), "statistics": index.statistics,
            "members": [_index_info(member) for member in index.indices]}
  return {"backbone": index.backbone_name, "feature_config": index.feature_config,
          "weights_id": getattr(index, "weights_id", None), "fingerprint": index.fingerprint}
