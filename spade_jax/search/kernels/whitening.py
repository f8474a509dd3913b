"""The Mahalanobis distance of a shrunk covariance, searched as L2 on whitened rows.

    d(x, y) = |(x - y) Sigma^{-1/2}| / h,    Sigma = (1 - lambda) S + lambda mu I,

S the (maximum-likelihood) covariance of the training features, mu = tr(S) / D,
lambda in [0, 1] the shrinkage (Ledoit-Wolf's estimate by default, which keeps Sigma
invertible when N < D) and h a bandwidth (1: the plain Mahalanobis distance; it
scales the distance, and is the width of the kernel density exp(-d^2 / 2) that the
likelihood objectives fit).

Sigma is stored by the spectrum of S: S = V diag(s) V^T with V [D, r] (r <= min(D,
N - 1); the rest of R^D is S's null space), so whitening costs 2 D r per row and the
kernel is small for pooled features with N << D:

    z(x) = (x - c) V diag(a - b) V^T + b (x - c),    a = ((1 - lambda) s + lambda mu)^{-1/2},
                                                      b = (lambda mu)^{-1/2},

all divided by h (without the b terms when r = D). The trainable parameters are the
shrinkage (as a logit) and log h; the spectrum is a statistic of the data, re-estimated
by `refit` when an objective cross-fits (held-out features must not shape it).

Degenerate covariances have a defined kernel:

* S = 0 (every training row equal, e.g. the features of identical all-black images;
  a spread below float32's resolution of the rows counts as 0: mu <= (4 eps_32)^2
  |x|^2 / D on average over the rows, or mu below float32's smallest normal number):
  there is no scale to whiten by, so mu is taken as 1 and Ledoit-Wolf's lambda as 1
  (S carries no information). Then Sigma = lambda I, r = 0 and

      d(x, y) = |x - y| / (h sqrt(lambda)),

  L2's distance / h by default (an explicit shrinkage in (0, 1] is kept; 0 is refused).
* S rank deficient (r < D): lambda > 0 makes Sigma invertible. A Ledoit-Wolf estimate
  of 0 (2 rows, whose centred outer products are all equal) is stored as the smallest
  shrinkage logit, lambda = sigmoid(-30) ~ 1e-13, like every estimate below it.

A feature constant over the training rows has exactly 0 variance (it is centred on its
value, not on a rounded mean).
"""

from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import matmul
from spade_jax.search.kernels import base

Array = jax.Array
# Shrinkage logits are kept in [-30, 30]: lambda = 0 or 1 within float32 resolution.
_MAX_LOGIT = 30.0
# Eigenvalues below this fraction of the largest are S's null space (rank deficiency).
_RANK_TOL = 1e-10
# A covariance is 0 (the rows are constant) when mu = tr(S) / D is at most
# _CONSTANT_TOL times the rows' mean square |x|^2 / D (a spread below about 4 float32
# ulps of the rows, which float32 features cannot resolve: e.g. identical images whose
# features differ by rounding), or below float32's smallest normal number.
_CONSTANT_TOL = float(4.0 * np.finfo(np.float32).eps) ** 2
_MIN_MEAN_EIGENVALUE = float(np.finfo(np.float32).tiny)


def _as_rows(features, name: str = "features") -> np.ndarray:
  """[N, ..., D] -> [N', D] float64 rows (all axes but the last are rows).

  Raises:
    ValueError: fewer than 2 dimensions, fewer than 2 rows, or NaN/Inf.
  """
  x = np.asarray(features, np.float64)
  if x.ndim < 2:
    raise ValueError(f"{name} must be [N, D] (or [N, ..., D]), got shape {x.shape}")
  x = x.reshape(-1, x.shape[-1])
  if x.shape[0] < 2:
    raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got "
                     f"{x.shape[0]}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} contains NaN or Inf")
  return x


def _centred(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], x - mean [N, D]) of float64 rows, with the columns that are constant
  over the rows centred exactly (their value, not a rounded mean): all-equal rows then
  have a covariance of exactly 0, not one of rounding errors."""
  mean = x.mean(axis=0)
  constant = np.all(x == x[0], axis=0)
  mean = np.where(constant, x[0], mean)
  return mean, x - mean


def ledoit_wolf_shrinkage(features) -> float:
  """Ledoit & Wolf's (2004) shrinkage of the covariance of features [N, D] toward
  mu I, as scikit-learn's LedoitWolf computes it (data centred, MLE covariance); 0 for
  a covariance of 0 (all rows equal).

  Host NumPy, float64; O(N D min(N, D)).
  """
  _, x = _centred(_as_rows(features))
  n, p = x.shape
  x2 = x * x
  trace = x2.sum(axis=0) / n  # Diagonal of S.
  mu = trace.sum() / p
  beta_ = float(np.sum(x2.sum(axis=1) ** 2))  # sum_ij (X2^T X2)_ij.
  gram = x.T @ x if p <= n else x @ x.T  # ||X^T X||_F = ||X X^T||_F.
  delta_ = float(np.sum(gram * gram)) / n**2
  beta = (beta_ / n - delta_) / (p * n)
  delta = (delta_ - 2.0 * mu * trace.sum() + p * mu**2) / p
  beta = min(beta, delta)
  return 0.0 if beta == 0 or delta == 0 else float(beta / delta)


def _top_eigenvalues(e: np.ndarray) -> np.ndarray:
  """[r] mask of the eigenvalues above _RANK_TOL of the largest (none of a 0 matrix)."""
  if e.size == 0:
    return np.zeros(0, bool)
  return e > _RANK_TOL * max(float(e.max()), 1e-300)


def covariance_spectrum(features) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """(mean [D], V [D, r], s [r], mu) of the MLE covariance S = V diag(s) V^T of [N, D]
  features, with the r eigenvalues above _RANK_TOL of the largest; mu = tr(S) / D.
  All rows equal: r = 0 (V [D, 0], s [0]) and mu = 0. Through the N x N Gram matrix
  when N < D. Host NumPy, float64."""
  mean, xc = _centred(_as_rows(features))
  n, p = xc.shape
  if p <= n:
    s, v = np.linalg.eigh(xc.T @ xc / n)
  else:
    e, u = np.linalg.eigh(xc @ xc.T / n)
    keep = _top_eigenvalues(e)
    s, u = e[keep], u[:, keep]
    v = xc.T @ u / np.sqrt(n * s)
  mu = float(np.sum(xc * xc) / (n * p))
  keep = _top_eigenvalues(s)
  return mean, v[:, keep], s[keep], mu


def _logit(p: float) -> float:
  p = float(np.clip(p, 0.0, 1.0))
  with np.errstate(divide="ignore"):
    return float(np.clip(np.log(p) - np.log1p(-p), -_MAX_LOGIT, _MAX_LOGIT))


@base.register_kernel
class Mahalanobis(base.L2Kernel):
  """Mahalanobis distance of a shrunk covariance (module docstring).

  Fields:
    center: [D] the training mean c (rows are whitened as x - c; any c gives the same
      distances, the mean keeps float32 precision).
    eigvecs: [D, r] V, orthonormal columns.
    eigvals: [r] s > 0.
    mean_eigenvalue: mu = tr(S) / D.
    shrinkage_logit: logit(lambda) (trainable).
    log_bandwidth: log h (trainable).
    complete: r == D (static): S has no null space; lambda may be 0.
  """
  center: Array
  eigvecs: Array
  eigvals: Array
  mean_eigenvalue: Array
  shrinkage_logit: Array
  log_bandwidth: Array
  complete: bool = struct.field(pytree_node=False, default=False)

  name = "mahalanobis"
  trainable = ("shrinkage_logit", "log_bandwidth")
  statistics = ("center", "eigvecs", "eigvals", "mean_eigenvalue")

  @property
  def input_dim(self) -> int:
    return int(self.center.shape[0])

  @property
  def shrinkage(self) -> Array:
    return jax.nn.sigmoid(self.shrinkage_logit)

  @property
  def bandwidth(self) -> Array:
    return jnp.exp(self.log_bandwidth)

  def _scales(self) -> tuple[Array, Array]:
    """(a [r], b): whitening scales inside and outside the span of V."""
    lam = self.shrinkage
    iso = lam * self.mean_eigenvalue
    a = jax.lax.rsqrt((1.0 - lam) * self.eigvals + iso)
    return a, jax.lax.rsqrt(iso)

  def features(self, x: Array) -> Array:
    xc = x - self.center
    a, b = self._scales()
    inside = matmul.dot(xc, self.eigvecs)
    if self.complete:
      z = matmul.dot_t(inside * a, self.eigvecs)
    else:
      z = b * xc + matmul.dot_t(inside * (a - b), self.eigvecs)
    return z * jnp.exp(-self.log_bandwidth)

  def log_normalizer(self) -> Array:
    """log N(0; 0, h^2 Sigma) = -log det(h Sigma^{1/2}) - D/2 log 2 pi."""
    dim = self.center.shape[0]
    a, b = self._scales()
    log_det = jnp.sum(jnp.log(a))
    if not self.complete:
      log_det += (dim - self.eigvals.shape[0]) * jnp.log(b)
    return log_det - dim * self.log_bandwidth - 0.5 * dim * base._LOG_2PI  # pylint: disable=protected-access

  def covariance(self) -> Array:
    """[D, D] h^2 Sigma (for inspection and tests)."""
    lam = self.shrinkage
    s = matmul.dot_t(self.eigvecs * ((1.0 - lam) * self.eigvals), self.eigvecs)
    s += lam * self.mean_eigenvalue * jnp.eye(self.center.shape[0])
    return s * jnp.exp(2.0 * self.log_bandwidth)

  def refit(self, rows: np.ndarray) -> Mahalanobis:
    """The spectrum of `rows` [N, D], everything else kept (rows of equal count give
    spectra of equal rank, which cross-fitting stacks)."""
    fresh = mahalanobis(rows, shrinkage=0.5)
    if fresh.complete != self.complete:
      raise ValueError(f"refit: {rows.shape[0]} rows of {rows.shape[1]}-d features give a "
                       f"covariance of rank {fresh.eigvals.shape[0]}, not "
                       f"{'full' if self.complete else 'deficient'} like this kernel's")
    return self.replace(**{name: getattr(fresh, name) for name in self.statistics})

  @classmethod
  def from_features(cls, features, *, shrinkage: float | None = None,
                    bandwidth: float = 1.0, **_) -> Mahalanobis:
    return mahalanobis(features, shrinkage=shrinkage, bandwidth=bandwidth)


def mahalanobis(features, shrinkage: float | None = None, *,
                bandwidth: float = 1.0) -> Mahalanobis:
  """The Mahalanobis kernel of training features.

  Args:
    features: [N, D] (or [N, ..., D]: every row of the last axis) training features,
      N >= 2 rows. All rows equal (a covariance of 0) give the scaled L2 distance
      |x - y| / (h sqrt(lambda)) (module docstring).
    shrinkage: lambda in [0, 1]; None: Ledoit-Wolf's estimate (1 for a covariance of
      0). 0 needs a covariance of full rank (N > D and no constant direction).
    bandwidth: h > 0 (distances are divided by it).

  Returns:
    A Mahalanobis kernel (float32 leaves) for [D] features.

  Raises:
    ValueError: bad features, shrinkage outside [0, 1] or 0 with a singular covariance,
      bandwidth <= 0.
  """
  mean, v, s, mu = covariance_spectrum(features)
  dim = mean.shape[0]
  mean_square = mu + float(np.sum(mean * mean)) / dim  # Of the rows, about 0.
  # S = 0: Sigma = lambda I (module docstring).
  constant = mu <= max(_MIN_MEAN_EIGENVALUE, _CONSTANT_TOL * mean_square)
  if constant:
    v, s, mu = v[:, :0], s[:0], 1.0
  given = shrinkage is not None
  if not given:
    shrinkage = 1.0 if constant else ledoit_wolf_shrinkage(features)
  elif isinstance(shrinkage, bool) or not 0.0 <= float(shrinkage) <= 1.0:
    raise ValueError(f"shrinkage must be in [0, 1] (None: Ledoit-Wolf), got {shrinkage!r}")
  complete = s.shape[0] == dim
  if given and float(shrinkage) == 0.0 and not complete:
    raise ValueError(f"shrinkage=0 needs a covariance of full rank, but these {dim}-d "
                     f"features span {s.shape[0]} dimensions; pass shrinkage > 0 or None")
  base.as_param(bandwidth, "bandwidth", positive=True)
  log_h = jnp.asarray(np.log(float(bandwidth)), jnp.float32)
  return Mahalanobis(center=jnp.asarray(mean, jnp.float32),
                     eigvecs=jnp.asarray(v, jnp.float32), eigvals=jnp.asarray(s, jnp.float32),
                     mean_eigenvalue=jnp.asarray(mu, jnp.float32),
                     shrinkage_logit=jnp.asarray(_logit(shrinkage), jnp.float32),
                     log_bandwidth=log_h, complete=bool(complete))
