"""What the detectors (spade.py, patchcore.py, padim.py) share: an index's fingerprint,
the check that an index fits a detector, the mesh a call runs on, the backbone's
levels, the loop over batches of input images (validation and progress lines), and
the loops that score test images or their features a batch at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import functools
import hashlib
from typing import Any

import jax
import numpy as np

from spade_jax.host import progress
from spade_jax.scoring import anomaly_map
from spade_jax.search import sharding

Mesh = jax.sharding.Mesh


def fingerprint(feature_config: str, weights_id: str | None = None) -> str:
  """Short hash (16 hex digits) of a canonical feature-configuration JSON and, when
  known, the backbone's weights identity (Backbone.weights_id)."""
  text = feature_config if weights_id is None else f"{feature_config}\0{weights_id}"
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_id(backbone: Any) -> str | None:
  """The identity of `backbone`'s weights (Backbone.weights_id: "sha256:<hex>"), or None
  for a backbone that declares none (test doubles)."""
  return getattr(backbone, "weights_id", None)


def short_weights(weights: str | None) -> str:
  """A weights identity as shown in messages ("sha256:<first 16 hex digits>")."""
  return "unknown" if weights is None else weights[:len("sha256:") + 16]


def check_compatible(index: Any, backbone_name: str, config: Any, where: str, *,
                     weights: str | None = None) -> None:
  """Raises a ValueError unless `index` was built by this backbone, with these weights
  and config's feature settings (config.feature_config(backbone_name)).

  Args:
    index: a SpadeIndex, PatchCoreIndex or PadimIndex (backbone_name, feature_config,
      weights_id).
    backbone_name: the detector's backbone.
    config: the detector's config.
    where: the caller, for messages.
    weights: the detector's Backbone.weights_id; compared with the index's when both
      are known (an index saved before weights were recorded has none).
  """
  expected = config.feature_config(backbone_name)
  if index.backbone_name != backbone_name or index.feature_config != expected:
    raise ValueError(
        f"{where}: the index was built for {index.feature_config} (fingerprint "
        f"{fingerprint(index.feature_config)}) but this detector needs {expected} "
        f"(fingerprint {fingerprint(expected)}); refit with this backbone and config")
  fitted = getattr(index, "weights_id", None)
  if weights is not None and fitted is not None and weights != fitted:
    raise ValueError(
        f"{where}: the index was fitted with other {backbone_name} weights "
        f"({short_weights(fitted)}) than this detector's ({short_weights(weights)}): its "
        "features would be compared with features of another network; load the weights "
        "the index was fitted with (fit.py's --weights) or refit the index with these")


def mesh_or_none(mesh: Mesh | None, axis: str) -> Mesh | None:
  """`mesh`, else the one set with jax.set_mesh, else None (one device); checks `axis`."""
  if mesh is None and jax.sharding.get_mesh().empty:
    return None
  return sharding.resolve_mesh(mesh, axis)


def check_backbone_levels(backbone: Any, levels: Sequence[str]) -> None:
  """Raises a ValueError if `backbone` declares its features and lacks one of `levels`."""
  known = getattr(backbone, "features", None)
  if known is not None:
    missing = [l for l in levels if l not in known]
    if missing:
      raise ValueError(f"backbone {backbone.name!r} has no features {missing}; it has "
                       f"{list(known)}")


def check_returned_levels(backbone: Any, out: dict[str, Any], levels: Sequence[str]) -> None:
  """Raises a ValueError if the backbone's output `out` lacks one of `levels`."""
  missing = [l for l in levels if l not in out]
  if missing:
    raise ValueError(f"backbone {backbone.name!r} returned no {missing}")


def image_batches(images: np.ndarray | Sequence[np.ndarray], what: str, done: str,
                  batch_size: int) -> Iterator[np.ndarray | Sequence[np.ndarray]]:
  """Consecutive batches of at most batch_size images ([B, H, W, 3] uint8, or a list).

  Logs "<what>: <done> i / N images, ..." (host/progress.py) as each batch is consumed.

  Raises:
    ValueError: an array that is not [N, H, W, 3], or no images.
  """
  if isinstance(images, (list, tuple)):
    count = len(images)
  else:
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"{what} must be [N, H, W, 3] uint8 (or a list of [H, W, 3]), "
                       f"got shape {images.shape}")
    count = images.shape[0]
  if count == 0:
    raise ValueError(f"{what} is empty (0 images)")
  # Progress on long loops (e.g. thousands of STC frames), at most every 10 s.
  report = progress.Progress(f"{what}: {done}", count)
  for start in range(0, count, batch_size):
    yield images[start:start + batch_size]
    report.update(min(start + batch_size, count))


def pad_batch(batch: np.ndarray, batch_size: int, total: int) -> tuple[np.ndarray, int]:
  """(batch padded to batch_size rows by repeating its last row, its real row count).

  The last, shorter batch of images that fill several batches is padded, so the backbone
  (and what follows it per batch) runs one compiled program for every batch instead of
  compiling a second shape for the remainder: a first run saves that compilation (seconds
  for each backbone) for a few images' work. A run of a single batch (total <=
  batch_size) keeps its own shape. Every image is computed on its own, so the real rows'
  outputs do not depend on the padding; `unpad` drops it.

  Args:
    batch: [B, ...] preprocessed images, B <= batch_size.
    batch_size: the detector's batch size.
    total: how many images the run holds in all.
  """
  count = int(batch.shape[0])
  if total <= batch_size or count >= batch_size:
    return batch, count
  return np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)]), count


@functools.partial(jax.jit, static_argnums=1)
def _first_rows(outputs: Any, count: int) -> Any:
  return jax.tree.map(lambda v: v[:count], outputs)


def unpad(outputs: Any, count: int) -> Any:
  """outputs (a pytree of [B, ...] arrays) without the rows pad_batch added (one compiled
  slice for the whole tree, not one per array)."""
  if all(v.shape[0] == count for v in jax.tree.leaves(outputs)):
    return outputs
  return _first_rows(outputs, count)


def preprocess(images: np.ndarray | Sequence[np.ndarray], config: Any) -> np.ndarray:
  """[B, H, W, 3] float32 backbone input of uint8 images, with a detector config's
  resize / crop / image_size (config.input_size = (H, W); ValueError with crop=None
  and no image_size)."""
  from spade_jax.features.preprocessing import preprocess as run  # pylint: disable=import-outside-toplevel
  if config.crop is None:
    return run(images, resize=None, crop=None, image_size=config.input_size)
  return run(images, resize=config.resize, crop=config.crop)


def with_whole_image_size(detector: Any, height: int, width: int) -> Any:
  """`detector` itself, or with crop=None and no image_size a copy (same backbone) whose
  image_size is that of a height x width image with its shorter side resized to
  config.resize, its aspect kept (geometry.aspect_size): how fit_folder and evaluate
  choose the one input size from the first training image."""
  from spade_jax.features import geometry  # pylint: disable=import-outside-toplevel
  if hasattr(detector, "with_whole_image_size"):  # An Ensemble: each member's.
    return detector.with_whole_image_size(height, width)
  config = detector.config
  if config.crop is not None or config.image_size is not None:
    return detector
  size = geometry.aspect_size(config.resize, height, width)
  return type(detector)(detector.backbone, dataclasses.replace(config, image_size=size))


def scores_and_maps(scores: Any, score_maps: Any, size: tuple[int, int], sigma: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(scores [N], score maps [N, h, w]) of a scoring call -> host (scores [N], anomaly maps
  [N, H, W], size = (H, W), the input's): upsampled and blurred (scoring.anomaly_map), in
  the "maps" stage.

  Sharded scoring returns replicated maps: one local copy is blurred, not one per device
  (under jax.set_mesh, jit wants mesh arrays or host ones: a host copy, it is small).
  """
  with progress.stage("maps"):
    if jax.sharding.get_mesh().empty:
      score_maps = sharding.to_local(score_maps)
    else:
      score_maps = np.asarray(sharding.to_local(score_maps))
    maps = anomaly_map.anomaly_maps(score_maps, tuple(size), sigma=sigma)
    return np.asarray(sharding.to_local(scores)), np.asarray(maps)


ScoredBatch = tuple[np.ndarray, np.ndarray]  # (scores [B], anomaly maps [B, crop, crop]).


def concatenate_scored(results: Iterable[ScoredBatch]) -> ScoredBatch:
  """The (scores [N], maps [N, crop, crop]) of scored batches, in order."""
  results = list(results)
  return (np.concatenate([s for s, _ in results]),
          np.concatenate([m for _, m in results]))


def score_in_batches(score_batch: Callable[[slice], ScoredBatch], count: int,
                     batch_size: int) -> ScoredBatch:
  """score_features' loop: score_batch(rows) for consecutive slices of at most
  batch_size of the `count` test images, with "images: scored" progress lines.

  Returns:
    (scores [count], anomaly maps [count, crop, crop]), NumPy.
  """
  results = []
  report = progress.Progress("images: scored", count)
  for start in range(0, count, batch_size):
    results.append(score_batch(slice(start, start + batch_size)))
    report.update(min(start + batch_size, count))
  return concatenate_scored(results)
