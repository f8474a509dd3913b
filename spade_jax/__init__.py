"""spade_jax: SPADE sub-image anomaly detection (Cohen & Hoshen, 2020) in JAX.

Public API (see README.md):

  backbone = spade_jax.load_backbone("wide_resnet50_2", weights="imagenet")
  spade = spade_jax.Spade(backbone, spade_jax.SpadeConfig())
  index = spade.fit(train_images_uint8)              # a pytree value
  scores, maps = spade.score(index, test_images_uint8)

Names are resolved lazily (PEP 562) so that `import spade_jax` stays cheap and
submodules are only imported when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it.
_EXPORTS = {
    # Backbones and preprocessing.
    "BACKBONES": "spade_jax.backbones",
    "Backbone": "spade_jax.backbones",
    "load_backbone": "spade_jax.backbones",
    "preprocess": "spade_jax.preprocessing",
    "preprocess_masks": "spade_jax.preprocessing",
    # Distance kernels and nearest-neighbour search.
    "Metric": "spade_jax.distances",
    "METRICS": "spade_jax.distances",
    "register_metric": "spade_jax.distances",
    "knn": "spade_jax.neighbors",
    # SPADE scoring.
    "image_scores": "spade_jax.scoring",
    "pixel_scores": "spade_jax.scoring",
    "upsample_bilinear": "spade_jax.anomaly_map",
    "gaussian_blur": "spade_jax.anomaly_map",
    "anomaly_maps": "spade_jax.anomaly_map",
    # The detector.
    "SpadeConfig": "spade_jax.detector",
    "Spade": "spade_jax.detector",
    "SpadeIndex": "spade_jax.detector",
    "save_index": "spade_jax.detector",
    "load_index": "spade_jax.detector",
    # Sharding.
    "ShardedGallery": "spade_jax.sharding",
    "shard_gallery": "spade_jax.sharding",
}
_SUBMODULES = ("metrics", "data", "backbones", "checkpoint")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  if name in _SUBMODULES:
    return importlib.import_module(f"spade_jax.{name}")
  raise AttributeError(f"module 'spade_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__


if TYPE_CHECKING:  # Static type checkers see the real imports.
  from spade_jax.anomaly_map import anomaly_maps, gaussian_blur, upsample_bilinear
  from spade_jax.backbones import BACKBONES, Backbone, load_backbone
  from spade_jax.detector import Spade, SpadeConfig, SpadeIndex, load_index, save_index
  from spade_jax.distances import METRICS, Metric, register_metric
  from spade_jax.neighbors import knn
  from spade_jax.preprocessing import preprocess, preprocess_masks
  from spade_jax.scoring import image_scores, pixel_scores
  from spade_jax.sharding import ShardedGallery, shard_gallery
