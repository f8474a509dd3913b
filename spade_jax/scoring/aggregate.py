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


def check_aggregate(mode: str, bandwidth) -> None:
  """Validates (aggregate, bandwidth) in Python: "mean" takes no bandwidth, "softmin"
  and "kde" need one > 0 (checked when concrete; a traced one is not).

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
  values = bandwidth.values() if isinstance(bandwidth, dict) else [bandwidth]
  for value in values:
    if isinstance(value, jax.core.Tracer):
      continue
    host = np.asarray(value, np.float64)
    if host.ndim != 0 or not np.isfinite(host) or host <= 0:
      raise ValueError(f"bandwidth must be a finite scalar > 0, got {value!r}")
