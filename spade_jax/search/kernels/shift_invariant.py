"""RBF and Laplacian kernel-induced distances, monotone in L2: searched as L2.

For a kernel of r = |x - y| with k(x, x) = 1, the kernel-induced distance is

    d_k(x, y)^2 = k(x, x) + k(y, y) - 2 k(x, y) = 2 - 2 k(r),

increasing in r, so the neighbours are L2's: the search runs in L2 on the raw rows
(the CPU kernel reads memory banks in place) and only the selected distances are
transformed. k(r) = exp(-r^2 / (2 h^2)) (RBF) or exp(-r / h) (Laplacian), h the
bandwidth (a trainable log h). 2 - 2 exp(-u) is computed as -2 expm1(-u), exact for
small u. Far beyond h the distances saturate at sqrt(2), where float32 no longer
separates them (ties broken by index, as everywhere).

As densities (likelihood objectives) the kernels are normalised in R^D:
(2 pi h^2)^{-D/2} for the RBF, h^{-D} Gamma(D/2) / (2 pi^{D/2} Gamma(D)) for the
Laplacian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln
import numpy as np

from spade_jax.search.kernels import base

Array = jax.Array


def median_distance(features, *, max_rows: int = 1000, seed: int = 0) -> float:
  """Median L2 distance between distinct rows of a sample of features [N, ..., D] (the
  median heuristic for a bandwidth). Host NumPy.

  Raises:
    ValueError: fewer than 2 rows, or all sampled rows equal.
  """
  x = np.asarray(features, np.float64)
  x = x.reshape(-1, x.shape[-1])
  if x.shape[0] < 2:
    raise ValueError(f"need at least 2 rows for a median distance, got {x.shape[0]}")
  if x.shape[0] > max_rows:
    x = x[np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False)]
  sq = np.sum(x * x, axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
  median = float(np.sqrt(np.median(d2[np.triu_indices(x.shape[0], 1)])))
  if not median > 0:
    raise ValueError("the sampled rows are all equal: no bandwidth from the median distance")
  return median


class _ShiftInvariant(base.L2Kernel):
  """k(x, y) = k(|x - y|) with k(0) = 1 and one bandwidth h = exp(log_bandwidth)."""
  prepare_is_identity = True
  trainable = ("log_bandwidth",)

  @property
  def bandwidth(self) -> Array:
    return jnp.exp(self.log_bandwidth)

  def log_k(self, sq: Array) -> Array:
    """log k of the squared L2 distance."""
    raise NotImplementedError

  def prepare(self, x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)

  def from_squared(self, sq: Array) -> Array:
    # 2 - 2 k = -2 expm1(log k): exact near 0.
    return base.safe_sqrt(-2.0 * jnp.expm1(self.log_k(sq)))

  @classmethod
  def from_features(cls, features, *, bandwidth: float | None = None, **_):
    h = median_distance(features) if bandwidth is None else bandwidth
    return cls(log_bandwidth=jnp.log(base.as_param(h, "bandwidth", positive=True)))


@base.register_kernel
class RBF(_ShiftInvariant):
  """Gaussian kernel exp(-|x - y|^2 / (2 h^2)); field log_bandwidth (trainable)."""
  log_bandwidth: Array
  name = "rbf"

  def log_k(self, sq: Array) -> Array:
    return -0.5 * sq * jnp.exp(-2.0 * self.log_bandwidth)

  def log_kernel(self, x: Array, y: Array) -> Array:
    dim = x.shape[-1]
    return (self.log_k(self.squared(x, y)) - dim * self.log_bandwidth
            - 0.5 * dim * base._LOG_2PI)  # pylint: disable=protected-access


@base.register_kernel
class Laplacian(_ShiftInvariant):
  """Laplacian kernel exp(-|x - y| / h); field log_bandwidth (trainable)."""
  log_bandwidth: Array
  name = "laplacian"

  def log_k(self, sq: Array) -> Array:
    return -base.safe_sqrt(sq) * jnp.exp(-self.log_bandwidth)

  def log_kernel(self, x: Array, y: Array) -> Array:
    dim = x.shape[-1]
    log_z = (dim * self.log_bandwidth + np.log(2.0) + 0.5 * dim * np.log(np.pi)
             + gammaln(float(dim)) - gammaln(0.5 * dim))
    return self.log_k(self.squared(x, y)) - log_z


def rbf(bandwidth: float) -> RBF:
  """RBF kernel-induced distance with bandwidth h > 0."""
  return RBF(log_bandwidth=jnp.log(base.as_param(bandwidth, "bandwidth", positive=True)))


def laplacian(bandwidth: float) -> Laplacian:
  """Laplacian kernel-induced distance with bandwidth h > 0."""
  return Laplacian(log_bandwidth=jnp.log(base.as_param(bandwidth, "bandwidth", positive=True)))
