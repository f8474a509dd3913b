"""spade_jax: SPADE sub-image anomaly detection (Cohen & Hoshen, 2020) in JAX.

Public API (see README.md):

  backbone = spade_jax.load_backbone("wide_resnet50_2", weights="imagenet")
  spade = spade_jax.Spade(backbone, spade_jax.SpadeConfig())
  index = spade.fit(train_images_uint8)              # a pytree value
  scores, maps = spade.score(index, test_images_uint8)
  patchcore = spade_jax.PatchCore(backbone, spade_jax.PatchCoreConfig())  # the same calls
  padim = spade_jax.Padim(backbone, spade_jax.PadimConfig())              # the same calls
  ensemble = spade_jax.Ensemble([patchcore, padim], spade_jax.EnsembleConfig())  # the same

The package is the pipeline, one folder per stage (docs/ARCHITECTURE.md):
features/ (images -> pyramid and patch features), search/ (distance kernels, exact kNN,
sharded galleries, coreset), scoring/ (image scores, pixel correspondence, memory-bank
scores, PaDiM's Gaussians, anomaly maps), detector/ (Spade, PatchCore and PaDiM:
fit / score, index files), evaluation/ (benchmark loop, metrics, results.json), data/
(data sets), host/ (atomic files, cache paths, multi-process setup).

Names are resolved lazily (PEP 562) so that `import spade_jax` stays cheap and
submodules are only imported when used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it.
_EXPORTS = {
    # Stage 1, features: backbones and preprocessing.
    "BACKBONES": "spade_jax.features.backbones",
    "Backbone": "spade_jax.features.backbones",
    "load_backbone": "spade_jax.features.backbones",
    "preprocess": "spade_jax.features.preprocessing",
    "preprocess_masks": "spade_jax.features.preprocessing",
    "patch_features": "spade_jax.features.patches",
    "padim_embedding": "spade_jax.features.embedding",
    # Stage 2, search: distance kernels, nearest neighbours, sharded galleries.
    "Metric": "spade_jax.search.distances",
    "METRICS": "spade_jax.search.distances",
    "register_metric": "spade_jax.search.distances",
    "knn": "spade_jax.search.api",
    "ShardedGallery": "spade_jax.search.sharding",
    "shard_gallery": "spade_jax.search.sharding",
    "coreset": "spade_jax.search.coreset",
    # Stage 3, scoring.
    "image_scores": "spade_jax.scoring.api",
    "pixel_scores": "spade_jax.scoring.api",
    "upsample_bilinear": "spade_jax.scoring.anomaly_map",
    "gaussian_blur": "spade_jax.scoring.anomaly_map",
    "anomaly_maps": "spade_jax.scoring.anomaly_map",
    "patchcore_scores": "spade_jax.scoring.memory_bank",
    "fit_gaussians": "spade_jax.scoring.gaussian",
    "mahalanobis_distances": "spade_jax.scoring.gaussian",
    # Stage 4, the detector.
    "SpadeConfig": "spade_jax.detector.spade",
    "Spade": "spade_jax.detector.spade",
    "SpadeIndex": "spade_jax.detector.spade",
    "PatchCore": "spade_jax.detector.patchcore",
    "PatchCoreConfig": "spade_jax.detector.patchcore",
    "PatchCoreIndex": "spade_jax.detector.patchcore",
    "Padim": "spade_jax.detector.padim",
    "PadimConfig": "spade_jax.detector.padim",
    "PadimIndex": "spade_jax.detector.padim",
    "Ensemble": "spade_jax.detector.ensemble",
    "EnsembleConfig": "spade_jax.detector.ensemble",
    "EnsembleIndex": "spade_jax.detector.ensemble",
    "save_ensemble_index": "spade_jax.detector.index_ensemble",
    "load_ensemble_index": "spade_jax.detector.index_ensemble",
    "load_ensemble_index_file": "spade_jax.detector.index_ensemble",
    "save_index": "spade_jax.detector.index_file",
    "load_index": "spade_jax.detector.index_file",
    # Deployment: a fitted detector as a standalone folder.
    "export_detector": "spade_jax.deploy.export",
}
# Public submodules by their documented names -> where they live. `spade_jax.metrics`,
# `spade_jax.backbones`, `spade_jax.checkpoint` and `spade_jax.cpu_kernel` keep working
# as attributes and in import statements (`from spade_jax.backbones import BACKBONES`).
_SUBMODULES = {
    "metrics": "spade_jax.evaluation.metrics",
    "data": "spade_jax.data",
    "backbones": "spade_jax.features.backbones",
    "checkpoint": "spade_jax.features.checkpoint",
    "cpu_kernel": "spade_jax.search.cpu_kernel",
    "kernels": "spade_jax.search.kernels",
}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  if name in _SUBMODULES:
    return importlib.import_module(_SUBMODULES[name])
  raise AttributeError(f"module 'spade_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__


class _SubmoduleAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Imports `spade_jax.<name>[.x]` of a public submodule as the module it names in
  _SUBMODULES: the same module object, never a second copy."""

  def __init__(self):
    self._specs = {}  # alias -> the real module's own spec (restored after import).

  @staticmethod
  def _target(fullname: str) -> str | None:
    for name, target in _SUBMODULES.items():
      alias = f"spade_jax.{name}"
      if target != alias and (fullname == alias or fullname.startswith(alias + ".")):
        return target + fullname[len(alias):]
    return None

  def find_spec(self, fullname, path=None, target=None):  # pylint: disable=unused-argument
    real = self._target(fullname)
    return None if real is None else importlib.util.spec_from_loader(fullname, self)

  def create_module(self, spec):
    module = importlib.import_module(self._target(spec.name))
    self._specs[spec.name] = module.__spec__
    return module

  def exec_module(self, module):
    # The import system has just set module.__spec__ to the alias's; restore its own.
    module.__spec__ = self._specs.pop(module.__spec__.name)


# First in line: the path finder would otherwise load a second copy of a submodule of
# an aliased package (spade_jax.backbones.resnet) from the real package's folder.
sys.meta_path.insert(0, _SubmoduleAliases())


# (export_detector is left out: spade_jax.deploy is a top stage, which the stages below,
# importing this package, must not reach; see pyproject.toml's layers.)
if TYPE_CHECKING:  # Static type checkers see the real imports.
  from spade_jax.detector.ensemble import Ensemble, EnsembleConfig, EnsembleIndex
  from spade_jax.detector.index_ensemble import (
    load_ensemble_index,
    load_ensemble_index_file,
    save_ensemble_index,
  )
  from spade_jax.detector.index_file import load_index, save_index
  from spade_jax.detector.padim import Padim, PadimConfig, PadimIndex
  from spade_jax.detector.patchcore import PatchCore, PatchCoreConfig, PatchCoreIndex
  from spade_jax.detector.spade import Spade, SpadeConfig, SpadeIndex
  from spade_jax.features.backbones import BACKBONES, Backbone, load_backbone
  from spade_jax.features.embedding import padim_embedding
  from spade_jax.features.patches import patch_features
  from spade_jax.features.preprocessing import preprocess, preprocess_masks
  from spade_jax.scoring.anomaly_map import anomaly_maps, gaussian_blur, upsample_bilinear
  from spade_jax.scoring.api import image_scores, pixel_scores
  from spade_jax.scoring.gaussian import fit_gaussians, mahalanobis_distances
  from spade_jax.scoring.memory_bank import patchcore_scores
  from spade_jax.search.api import knn
  from spade_jax.search.coreset import coreset
  from spade_jax.search.distances import METRICS, Metric, register_metric
  from spade_jax.search.sharding import ShardedGallery, shard_gallery
