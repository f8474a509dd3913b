"""The fitted kernels of a SpadeIndex or PatchCoreIndex in an index file (index_file.py).

A SpadeIndex fitted for a kernel metric or a soft aggregate (SpadeIndex.kernels,
fitted_metric, bandwidths) is stored as tensors "kernels/<part>/<parameter>"
(spade_jax.kernels.kernel_to_arrays of {part: kernel}) and the metadata field
"kernels", JSON {"metric": fitted_metric, "spec": the kernels' spec (null for a fixed
metric), "bandwidths": {part: h}}; its parts are "pool" and the levels. A
PatchCoreIndex fitted for a kernel metric (PatchCoreIndex.kernel, fitted_metric) is
stored the same way with the one part "bank" (tensors "kernels/bank/<parameter>",
bandwidths {}); a PatchCore index of a fixed metric has no field (older files neither).
Reading checks the field strictly before anything is built (kernels.io.check_spec):
registered kernel names only, looked up in the registry; no code from a file ever runs.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
from typing import Any

import jax
import numpy as np

from spade_jax.detector import metric_fit
from spade_jax.detector.patchcore import PatchCoreIndex
from spade_jax.detector.spade import SpadeIndex
from spade_jax.search import distances, sharding
from spade_jax.search.kernels import io as kernel_io

PREFIX = "kernels/"  # Of the kernels' tensor names.
_PATCHCORE_FORMAT = "spade_jax.PatchCoreIndex"
BANK = "bank"  # A PatchCore index's one part.


def _parts(metadata: dict[str, str], levels: Sequence[str]
           ) -> tuple[list[str], set[str], str]:
  """(the parts with a kernel, the parts a bandwidth may have, the detector)."""
  if metadata.get("format") == _PATCHCORE_FORMAT:
    return [BANK], set(), "PatchCore"
  return ["pool", *levels], {"pool", *levels, "cat"}, "SPADE"


def _parse_json(where: str, text: str) -> Any:
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as e:  # Deep nesting: RecursionError.
    raise ValueError(f"{where}: metadata field 'kernels' is not valid JSON ({e})") from None


def check_field(where: str, metadata: dict[str, str], levels: Sequence[str]
                ) -> tuple[str, Any, dict[str, float], list[str]] | None:
  """The optional "kernels" field: (fitted_metric, spec or None, bandwidths, tensor
  names), or None without one. Checked strictly (no code from the file ever runs)."""
  if "kernels" not in metadata:
    return None
  kernel_parts, bandwidth_parts, detector = _parts(metadata, levels)
  field = _parse_json(where, metadata["kernels"])
  if not isinstance(field, dict) or sorted(field) != ["bandwidths", "metric", "spec"]:
    got = sorted(field) if isinstance(field, dict) else type(field).__name__
    raise ValueError(f"{where}: metadata field 'kernels' must be an object with the fields "
                     f"['bandwidths', 'metric', 'spec'], got {got!r:.200}")
  metric, spec, bandwidths = field["metric"], field["spec"], field["bandwidths"]
  known = sorted(distances.METRICS) + sorted(metric_fit.KERNEL_METRICS)
  if not isinstance(metric, str) or metric not in known:
    raise ValueError(f"{where}: metadata field 'kernels' has metric={metric!r:.100}, "
                     f"expected one of {known}")
  if detector == "PatchCore" and metric not in metric_fit.KERNEL_METRICS:
    raise ValueError(f"{where}: metadata field 'kernels' of a PatchCore index must name a "
                     f"kernel {list(metric_fit.KERNEL_METRICS)}, got {metric!r:.100}")
  names = []
  if metric in metric_fit.KERNEL_METRICS:
    try:
      names = kernel_io.check_spec(spec)
    except ValueError as e:
      raise ValueError(f"{where}: metadata field 'kernels': {e}") from None
    parts = sorted(spec["levels"]) if "levels" in spec else None
    if parts != sorted(kernel_parts) or any(
        "kernel" not in item for item in spec["levels"].values()):
      raise ValueError(f"{where}: metadata field 'kernels' must hold one kernel per part "
                       f"{kernel_parts}, got {parts!r:.200}")
  elif spec is not None:
    raise ValueError(f"{where}: metadata field 'kernels' has a kernel spec for the fixed "
                     f"metric {metric!r} (expected null)")
  if not isinstance(bandwidths, dict) or not all(
      k in bandwidth_parts and _positive_real(v) for k, v in bandwidths.items()):
    raise ValueError(f"{where}: metadata field 'kernels' has bandwidths={bandwidths!r:.200}, "
                     f"expected an object of parts {sorted(bandwidth_parts)} -> numbers > 0")
  return metric, spec, bandwidths, [PREFIX + n for n in names]


def _positive_real(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


def _host_tree(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: np.asarray(sharding.to_local(x) if isinstance(x, jax.Array) else x), tree)


def _patchcore_to_file(where: str, index: PatchCoreIndex,
                       tensors: dict[str, np.ndarray]) -> str | None:
  if index.fitted_metric is None:
    if index.kernel is not None:
      raise ValueError(f"{where}: the index holds a kernel but no fitted_metric")
    return None
  if index.fitted_metric not in metric_fit.KERNEL_METRICS or index.kernel is None:
    raise ValueError(f"{where}: fitted_metric={index.fitted_metric!r} needs the kernel of "
                     f"one of {list(metric_fit.KERNEL_METRICS)}")
  kernels = {BANK: _host_tree(index.kernel)}
  _check_kernel_dims(where, kernels, {BANK: int(np.shape(index.bank)[-1])})
  try:
    arrays, spec = kernel_io.kernel_to_arrays(kernels)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: cannot store the index's kernel: {e}") from None
  tensors.update({PREFIX + name: value for name, value in arrays.items()})
  return json.dumps({"metric": index.fitted_metric, "spec": spec, "bandwidths": {}},
                    sort_keys=True)


def to_file(where: str, index: SpadeIndex | PatchCoreIndex,
            tensors: dict[str, np.ndarray]) -> str | None:
  """The "kernels" metadata field of `index` (None: nothing fitted); adds the kernels'
  tensors to `tensors`."""
  if isinstance(index, PatchCoreIndex):
    return _patchcore_to_file(where, index, tensors)
  if index.fitted_metric is None:
    if index.kernels or index.bandwidths:
      raise ValueError(f"{where}: the index holds kernels or bandwidths but no "
                       "fitted_metric")
    return None
  spec = None
  if index.kernels:
    local = _host_tree(dict(index.kernels))
    _check_kernel_dims(where, local, _spade_dims(index.train_pool, index.train_features))
    try:
      arrays, spec = kernel_io.kernel_to_arrays(local)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: cannot store the index's kernels: {e}") from None
    tensors.update({PREFIX + name: value for name, value in arrays.items()})
  try:
    return json.dumps({"metric": index.fitted_metric, "spec": spec,
                       "bandwidths": dict(index.bandwidths)}, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: the index's bandwidths must be numbers ({e})") from None


def _spade_dims(pool: Any, features: dict[str, Any]) -> dict[str, int]:
  """part -> the feature size of a SpadeIndex's part."""
  return {"pool": int(np.shape(pool)[-1]),
          **{l: int(np.shape(v)[-1]) for l, v in features.items()}}


def _check_kernel_dims(where: str, kernels: dict[str, Any], dims: dict[str, int]) -> None:
  """Each part's kernel takes the part's feature size (kernel.input_dim)."""
  for part, kernel in kernels.items():
    try:
      want = kernel.input_dim
    except Exception:  # pylint: disable=broad-except  (malformed parameter shapes)
      want = -1
    if part not in dims or (want is not None and want != dims[part]):
      raise ValueError(f"{where}: the kernel of part {part!r} takes {want}-d features, but "
                       f"the index's are {dims.get(part)}-d")


def from_file(where: str, index: SpadeIndex | PatchCoreIndex, field: tuple,
              tensors: dict[str, np.ndarray]) -> SpadeIndex | PatchCoreIndex:
  """`index` with the kernels, fitted_metric and bandwidths of a checked "kernels"
  field (check_field) and its tensors (a PatchCoreIndex: its kernel and
  fitted_metric)."""
  metric, spec, bandwidths, names = field
  kernels = {}
  if spec is not None:
    arrays = {n[len(PREFIX):]: tensors[n] for n in names}
    try:
      kernels = kernel_io.kernel_from_arrays(arrays, spec)
    except Exception as e:  # pylint: disable=broad-except  (a kernel's own checks)
      raise ValueError(f"{where}: the kernels of metadata field 'kernels' cannot be "
                       f"built: {e}") from None
    if isinstance(index, PatchCoreIndex):
      _check_kernel_dims(where, kernels, {BANK: int(np.shape(index.bank)[-1])})
      return index.replace(kernel=kernels[BANK], fitted_metric=metric)
    _check_kernel_dims(where, kernels, _spade_dims(index.train_pool, index.train_features))
  return index.replace(kernels=kernels, fitted_metric=metric,
                       bandwidths=tuple(sorted((k, float(v)) for k, v in bandwidths.items())))
