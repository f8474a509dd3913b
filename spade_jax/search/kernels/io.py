"""Kernels as files: a flat {name: array} dict plus a JSON-able description.

    arrays, spec = kernel_to_arrays({"pool": k_pool, "layer1": k1, "layer2": "l2"})
    # arrays: {"pool/eigvecs": ndarray, ...}; spec: {"pool": {"kernel": "mahalanobis",
    #   "static": {"complete": false}, "arrays": ["center", ...]}, "layer2": {"metric": "l2"}}
    kernels = kernel_from_arrays(arrays, spec)

The arrays fit an index file (safetensors: flat names, arrays) and the spec its JSON
metadata. A value may be a kernel, a registered Metric (or its name), or a dict of
those (one level of nesting: a kernel per pyramid level, say). `check_spec` checks a
spec read from an untrusted file before anything is built from it.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from spade_jax.search import distances
from spade_jax.search.kernels import (
  base,
  families,  # noqa: F401  (imported: the registry)
)

SEPARATOR = "/"


def _one_to_arrays(value: Any, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  if isinstance(value, str):
    value = distances.get_metric(value)
  if isinstance(value, distances.Metric):
    if distances.METRICS.get(value.name) is not value:
      raise ValueError(f"metric {value.name!r} is not registered; only registered metrics "
                       "and kernels can be stored")
    return {}, {"metric": value.name}
  if not base.is_kernel(value):
    raise ValueError(f"cannot store {type(value).__name__}: expected a kernel, a Metric "
                     "or a metric name")
  if base.KERNELS.get(value.name) is not type(value):
    raise ValueError(f"kernel class {type(value).__name__} is not registered as "
                     f"{value.name!r} (base.register_kernel)")
  static = value.static()
  json.dumps(static)  # Static fields must be JSON-able (ints, floats, strings).
  params = value.params()
  arrays = {prefix + name: np.asarray(v) for name, v in params.items()}
  return arrays, {"kernel": value.name, "static": static, "arrays": sorted(params)}


def kernel_to_arrays(value: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(arrays, spec) of a kernel / metric, or of a dict name -> kernel / metric.

  Raises:
    ValueError: an unregistered metric or kernel class, a name with SEPARATOR.
  """
  if not isinstance(value, Mapping):
    return _one_to_arrays(value, "")
  arrays, spec = {}, {}
  for name, item in value.items():
    if not isinstance(name, str) or SEPARATOR in name or not name:
      raise ValueError(f"names must be non-empty strings without {SEPARATOR!r}, got {name!r}")
    a, s = _one_to_arrays(item, name + SEPARATOR)
    arrays.update(a)
    spec[name] = s
  return arrays, {"levels": spec}


def _one_from_arrays(arrays: Mapping[str, Any], spec: Mapping[str, Any], prefix: str) -> Any:
  if not isinstance(spec, Mapping):
    raise ValueError(f"kernel spec must be an object, got {spec!r}")
  if "metric" in spec:
    return distances.get_metric(spec["metric"])
  name = spec.get("kernel")
  if name not in base.KERNELS:
    raise ValueError(f"unknown kernel {name!r}; registered: {sorted(base.KERNELS)}")
  names = list(spec.get("arrays", []))
  missing = [prefix + n for n in names if prefix + n not in arrays]
  if missing:
    raise ValueError(f"arrays {missing} of kernel {name!r} are missing")
  fields = {n: jnp.asarray(np.asarray(arrays[prefix + n])) for n in names}
  try:
    kernel = base.KERNELS[name](**fields, **dict(spec.get("static", {})))
  except TypeError as e:
    raise ValueError(f"kernel {name!r} cannot be built from {sorted(fields)}: {e}") from e
  if not base.leaves_finite(kernel):
    raise ValueError(f"kernel {name!r} has NaN or Inf parameters")
  return kernel


def kernel_from_arrays(arrays: Mapping[str, Any], spec: Mapping[str, Any]) -> Any:
  """The kernel / metric (or dict of them) that kernel_to_arrays described.

  Raises:
    ValueError: an unknown kernel or metric, missing arrays, a malformed spec.
  """
  if isinstance(spec, Mapping) and "levels" in spec:
    return {name: _one_from_arrays(arrays, s, name + SEPARATOR)
            for name, s in spec["levels"].items()}
  return _one_from_arrays(arrays, spec, "")


def _check_one_spec(spec: Any, where: str) -> list[str]:
  """The array names of one kernel / metric spec (without prefix), checked strictly."""
  if not isinstance(spec, Mapping):
    raise ValueError(f"{where}: expected an object, got {type(spec).__name__}")
  if "metric" in spec:
    if set(spec) != {"metric"} or spec["metric"] not in distances.METRICS:
      raise ValueError(f"{where}: a metric entry is {{'metric': one of "
                       f"{sorted(distances.METRICS)}}}, got {dict(spec)!r:.200}")
    return []
  if set(spec) != {"kernel", "static", "arrays"}:
    raise ValueError(f"{where}: a kernel entry has the fields ['arrays', 'kernel', "
                     f"'static'], got {sorted(spec)!r:.200}")
  name = spec["kernel"]
  if not isinstance(name, str) or name not in base.KERNELS:
    raise ValueError(f"{where}: unknown kernel {name!r:.100}; registered: "
                     f"{sorted(base.KERNELS)}")
  fields = dataclasses.fields(base.KERNELS[name])
  array_fields = sorted(f.name for f in fields if f.metadata.get("pytree_node", True))
  static_fields = sorted(f.name for f in fields if not f.metadata.get("pytree_node", True))
  arrays, static = spec["arrays"], spec["static"]
  if not isinstance(arrays, list) or not all(isinstance(a, str) for a in arrays) \
      or sorted(arrays) != array_fields:
    raise ValueError(f"{where}: kernel {name!r} has the arrays {array_fields}, the spec "
                     f"lists {arrays!r:.200}")
  if not isinstance(static, Mapping) or sorted(static) != static_fields:
    got = sorted(static) if isinstance(static, Mapping) else type(static).__name__
    raise ValueError(f"{where}: kernel {name!r} has the static fields {static_fields}, the "
                     f"spec gives {got!r:.200}")
  for key, value in static.items():
    if not isinstance(value, (str, int, float)) or (
        isinstance(value, float) and not math.isfinite(value)):
      raise ValueError(f"{where}: static field {key!r} of kernel {name!r} must be a string, "
                       f"a bool or a finite number, got {value!r:.100}")
  try:  # The class's own checks of its static values (e.g. a renamed rff spectrum).
    base.KERNELS[name].check_static(dict(static))
  except ValueError as e:
    raise ValueError(f"{where}: kernel {name!r}: {e}") from None
  return sorted(arrays)


def check_spec(spec: Any) -> list[str]:
  """The names of the arrays that `spec` (from kernel_to_arrays) needs, after checking
  it strictly: the layout kernel_to_arrays writes, registered kernel and metric names
  only, each kernel with exactly its class's array and static fields, and static
  values that are JSON scalars its class accepts (Kernel.check_static: an rff kernel
  stored with the old spectrum name "cauchy" is refused with its new name). For specs
  read from files: nothing in a spec is ever executed, names are only looked up in the
  registries.

  Raises:
    ValueError: naming what is wrong.
  """
  if isinstance(spec, Mapping) and "levels" in spec:
    levels = spec["levels"]
    if set(spec) != {"levels"} or not isinstance(levels, Mapping) or not levels:
      raise ValueError(f"kernel spec: expected {{'levels': {{name: entry, ...}}}}, got "
                       f"{spec!r:.200}")
    names = []
    for name, item in levels.items():
      if not isinstance(name, str) or not name or SEPARATOR in name:
        raise ValueError(f"kernel spec: names must be non-empty strings without "
                         f"{SEPARATOR!r}, got {name!r:.100}")
      names += [name + SEPARATOR + a for a in _check_one_spec(item, f"kernel spec {name!r}")]
    return names
  return _check_one_spec(spec, "kernel spec")
