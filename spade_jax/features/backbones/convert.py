"""torch state dict <-> Flax variables, by a naming rule plus shape checks.

Flax module names mirror the torch keys with '.' -> '_' before an index
(torch 'layer1.0.downsample.1.weight' is Flax ('layer1_0', 'downsample_1')).
lukemelas' EfficientNet prefixes every module with '_' ('_blocks.0._bn1'), which
Flax names drop; `underscore=True` puts it back. Leaves map as

  conv weight [O, I/g, kh, kw] -> params/.../kernel [kh, kw, I/g, O]
  linear weight [O, I]         -> params/.../kernel [I, O]
  bn weight / bias             -> params/.../scale / bias
  bn running_mean / var        -> batch_stats/.../mean / var
  num_batches_tracked          -> ignored (training-only counter)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import re
from typing import Any

import numpy as np

from spade_jax.features.checkpoint import CheckpointError

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_TORCH_SUFFIXES = ("num_batches_tracked",)
_MAX_LISTED = 20


class WeightsMismatchError(CheckpointError):
  """A checkpoint's keys or shapes do not match the architecture."""


def flatten(variables: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'params': {'conv1': {'kernel': x}}} -> {'params/conv1/kernel': x}."""
  flat = {}
  for key, value in variables.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def torch_key(flax_name: str, underscore: bool = False) -> str:
  """'params/layer1_0/downsample_1/scale' -> 'layer1.0.downsample.1.weight'."""
  collection, *modules, leaf = flax_name.split("/")
  prefix = "_" if underscore else ""
  tokens = []
  for m in modules:
    indexed = re.fullmatch(r"(.+)_(\d+)", m)
    tokens += [prefix + indexed[1], indexed[2]] if indexed else [prefix + m]
  return ".".join(tokens + [_LEAF_TO_TORCH[(collection, leaf)]])


def _to_flax_layout(array: np.ndarray, flax_name: str) -> np.ndarray:
  array = np.asarray(array, np.float32)
  if flax_name.endswith("/kernel"):
    if array.ndim == 4:
      return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
      return array.T
  return array


def _torch_shape(flax_shape: tuple[int, ...], flax_name: str) -> tuple[int, ...]:
  shape = tuple(flax_shape)
  if flax_name.endswith("/kernel") and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if flax_name.endswith("/kernel") and len(shape) == 2:
    return shape[::-1]
  return shape


def _listing(names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return shown + (f", ... and {more} more" if more > 0 else "")


def check_and_unflatten(flat: Mapping[str, np.ndarray],
                        expected: Mapping[str, tuple[int, ...]], source: str,
                        display: Callable[[str], str] = lambda n: n,
                        extra: list[str] | None = None,
                        misshaped: list[str] | None = None) -> dict[str, Any]:
  """Checks names and shapes of `flat` against `expected`, then nests them.

  Args:
    flat: {flax_name: array} in Flax layout.
    expected: {flax_name: shape} of the architecture.
    source: what to name in errors (the file).
    display: flax_name -> the name shown to the user (e.g. the torch key).
    extra: names already known to be unexpected (shown as given).
    misshaped: shape problems already found (shown as given; not missing).

  Raises:
    WeightsMismatchError: listing missing, unexpected and mis-shaped entries.
  """
  misshaped = list(misshaped or [])
  known_bad = {m.split(" ")[0] for m in misshaped}
  missing = [display(n) for n in expected if n not in flat and display(n) not in known_bad]
  unexpected = list(extra or []) + [display(n) for n in flat if n not in expected]
  misshaped += [
      f"{display(n)} (has {tuple(np.shape(a))}, needs {tuple(expected[n])})"
      for n, a in flat.items() if n in expected and tuple(np.shape(a)) != tuple(expected[n])]
  problems = []
  if missing:
    problems.append(f"missing keys: {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listing(unexpected)}")
  if misshaped:
    problems.append(f"mis-shaped keys: {_listing(misshaped)}")
  if problems:
    raise WeightsMismatchError(f"{source} does not match the architecture; " + "; ".join(problems))
  return unflatten({n: np.asarray(flat[n], np.float32) for n in expected})


def variables_from_torch(state_dict: Mapping[str, np.ndarray],
                         expected: Mapping[str, tuple[int, ...]], source: str,
                         underscore: bool = False) -> dict[str, Any]:
  """Converts a torch state dict to a Flax variables dict, strictly.

  Args:
    state_dict: {torch_key: array} in torch layout.
    expected: {flax_name: shape} of the target module's variables.
    source: the file, for error messages.
    underscore: torch keys prefix every module with '_' (lukemelas).

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 NumPy arrays.
  """
  to_flax = {torch_key(n, underscore): n for n in expected}
  flat, extra, misshaped = {}, [], []
  for key, array in state_dict.items():
    if key.endswith(_IGNORED_TORCH_SUFFIXES):
      continue
    if key not in to_flax:
      extra.append(key)
      continue
    name = to_flax[key]
    needed = _torch_shape(expected[name], name)
    if tuple(np.shape(array)) != needed:
      misshaped.append(f"{key} (has {tuple(np.shape(array))}, needs {needed})")
    else:
      flat[name] = _to_flax_layout(array, name)
  return check_and_unflatten(flat, expected, source,
                             lambda n: torch_key(n, underscore), extra, misshaped)
