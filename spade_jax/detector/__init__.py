"""Stage 4, the detector: SpadeConfig, the fitted SpadeIndex (a pytree value), Spade's
fit / score over the stages below (spade.py), PatchCore's config, memory-bank index and
fit / score (patchcore.py), PaDiM's config, per-position Gaussian index and fit / score
(padim.py), fused ensembles of them (ensemble.py; index folders: index_ensemble.py),
what the detectors share (common.py), a config's kernels and bandwidths (metric_fit.py),
index files of all three (index_file.py, index_kernels.py, index_padim.py), and a
decision threshold calibrated on normal images alone (calibration.py)."""

from spade_jax.detector.calibration import Threshold, spade_threshold
from spade_jax.detector.index_file import (
  INDEX_FORMAT,
  INDEX_VERSION,
  PADIM_INDEX_FORMAT,
  PATCHCORE_INDEX_FORMAT,
  IndexFile,
  load_index,
  load_index_file,
  save_index,
)
from spade_jax.detector.padim import Padim, PadimConfig, PadimIndex, shard_padim_index
from spade_jax.detector.patchcore import (
  PatchCore,
  PatchCoreConfig,
  PatchCoreIndex,
  shard_patchcore_index,
)
from spade_jax.detector.spade import (
  KERNEL_METRICS,
  Spade,
  SpadeConfig,
  SpadeIndex,
  shard_index,
)

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "KERNEL_METRICS", "PADIM_INDEX_FORMAT",
           "PATCHCORE_INDEX_FORMAT",
           "IndexFile", "Padim", "PadimConfig", "PadimIndex", "PatchCore", "PatchCoreConfig",
           "PatchCoreIndex", "Spade", "SpadeConfig", "SpadeIndex", "Threshold", "load_index",
           "load_index_file", "save_index", "shard_index", "shard_padim_index",
           "shard_patchcore_index", "spade_threshold"]
