"""How the distances to the nearest neighbours become one score.

SPADE averages the distances d_1 <= ... <= d_k to the k nearest training features
(the image score) or kappa nearest gallery features (a pixel score). Two soft scores
with a bandwidth h replace the mean by a kernel density over the same neighbours:

* "softmin":  s = -h log mean_j exp(-d_j / h), the log of a truncated exponential
  (Laplacian) kernel density. h -> 0 gives d_1, the nearest-neighbour distance;
  h -> inf gives mean_j d_j, SPADE's mean.
* "kde":      s = sqrt(-2 h^2 log mean_j exp(-d_j^2 / (2 h^2))), a decreasing function
  of the truncated Gaussian kernel density (1/k) sum_j exp(-d_j^2 / (2 h^2)) of the
  neighbours, in distance units. h -> 0 gives d_1; h -> inf the root mean square of
  the d_j.

Both are computed with the smallest distance factored out and log1p / expm1, so a
small h neither underflows nor loses d_1 and a large one does not cancel; both are
differentiable in the distances and in h (a learnable bandwidth: pass a traced value).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
AGGREGATES = ("mean", "softmin", "kde")


def _soft_minimum(x: Array, t: Array) -> Array:
  """-t log mean_j exp(-x_j / t) over the last axis, as x_1 - t log1p(mean_j
  expm1(-(x_j - x_1) / t)), x_1 = min_j x_j: no underflow for small t, and no
  cancellation of log(k) - mean(x) / t for large t."""
  x1 = jnp.min(x, axis=-1)
  spread = jnp.mean(jnp.expm1(-(x - x1[..., None]) / t[..., None]), axis=-1)
  return x1 - t * jnp.log1p(spread)


def softmin(distances: Array, bandwidth: Array | float) -> Array:
  """-h log mean_j exp(-d_j / h) over the last axis.

  Args:
    distances: [..., k] float (finite, >= 0).
    bandwidth: h > 0, a scalar (or broadcastable to [...]).

  Returns:
    [...] float32 scores, in [d_1, mean_j d_j].
  """
  d = jnp.asarray(distances, jnp.float32)
  return _soft_minimum(d, jnp.asarray(bandwidth, jnp.float32))


def truncated_kde(distances: Array, bandwidth: Array | float) -> Array:
  """sqrt(-2 h^2 log mean_j exp(-d_j^2 / (2 h^2))) over the last axis.

  Args:
    distances: [..., k] float (finite, >= 0).
    bandwidth: h > 0, a scalar (or broadcastable to [...]).

  Returns:
    [...] float32 scores, in [d_1, rms_j d_j].
  """
  d = jnp.asarray(distances, jnp.float32)
  h = jnp.asarray(bandwidth, jnp.float32)
  sq = jnp.maximum(_soft_minimum(d * d, 2.0 * h * h), 0.0)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def aggregate(distances: Array, mode: str, bandwidth: Array | float | None = None) -> Array:
  """[..., k] distances -> [...] scores by `mode` (AGGREGATES); h unused by "mean"."""
  if mode == "mean":
    return jnp.mean(distances, axis=-1)
  if mode == "softmin":
    return softmin(distances, bandwidth)
  if mode == "kde":
    return truncated_kde(distances, bandwidth)
  raise ValueError(f"aggregate must be one of {AGGREGATES}, got {mode!r}")


def check_bandwidth(value, name: str = "bandwidth") -> None:
  """Validates one bandwidth h in Python: a real number > 0 and finite (a Python or
  NumPy number, a 0-d array), or a traced real scalar (its value is not checked).

  Raises:
    ValueError: naming `name`, for anything else (a dict, a string, a bool, an array
      of several values, a complex number, NaN, Inf, h <= 0).
  """
  what = (f"{name} must be a finite number > 0 (a Python or NumPy number, a 0-d array, "
          "or a traced scalar under jit)")
  if isinstance(value, (bool, np.bool_, str, bytes)):
    raise ValueError(f"{what}, got {value!r:.100}")
  if isinstance(value, jax.core.Tracer):
    if value.shape != () or not _real(value.dtype):
      raise ValueError(f"{what}, got a traced {value.dtype} of shape {value.shape}")
    return
  try:
    host = np.asarray(value)
  except Exception:  # pylint: disable=broad-except  (whatever NumPy cannot read)
    raise ValueError(f"{what}, got {value!r:.100}") from None
  if host.ndim != 0 or not _real(host.dtype):
    raise ValueError(f"{what}, got {value!r:.100}")
  host = host.astype(np.float64)
  if not np.isfinite(host) or host <= 0:
    raise ValueError(f"{what}, got {value!r:.100}")


def _real(dtype) -> bool:
  """A real number type: floats (bfloat16 included) and ints, not bools or complex."""
  return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))


def check_aggregate(mode: str, bandwidth, *, levels: tuple[str, ...] | None = None) -> None:
  """Validates (aggregate, bandwidth) in Python: "mean" takes no bandwidth, "softmin"
  and "kde" need one > 0 (checked when concrete; a traced one is not).

  Args:
    mode: the aggregate (AGGREGATES).
    bandwidth: None, or one h (check_bandwidth); with `levels`, also a dict level -> h
      (pixel_scores' "ensemble": its keys are checked against the levels there).
    levels: the levels that may each have their own h (None: one h only, as for
      image_scores).

  Raises:
    ValueError: naming the bad argument.
  """
  if mode not in AGGREGATES:
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {mode!r}")
  if mode == "mean":
    if bandwidth is not None:
      raise ValueError('bandwidth is only used by aggregate="softmin" or "kde"; pass None '
                       'with aggregate="mean"')
    return
  if bandwidth is None:
    raise ValueError(f'aggregate="{mode}" needs a bandwidth h > 0 (distance units)')
  if isinstance(bandwidth, Mapping):
    if levels is None:
      raise ValueError(f"bandwidth must be None or a finite number > 0 (one h for the image "
                       f"scores), got a dict {bandwidth!r:.100}")
    if not bandwidth:
      raise ValueError(f"bandwidth must be None, a finite number > 0 or a dict level -> h "
                       f"of the levels {list(levels)}, got an empty dict")
    for level, value in bandwidth.items():
      check_bandwidth(value, f"bandwidth[{level!r}]")
    return
  check_bandwidth(bandwidth)
