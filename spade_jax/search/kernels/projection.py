"""A learnable low-rank linear metric: d(x, y) = |(x - y) P|, P [D, r].

Searched as L2 on the projected rows z = (x - c) P (one matmul per block on every
path, the CPU kernel included). P is trainable (kernels.fit); r = D gives a full
learnable Mahalanobis metric (P P^T a precision matrix). The centre c only keeps the
float32 precision of z (distances do not depend on it).

As a density (likelihood objectives) the Gaussian kernel exp(-d^2 / 2) is normalised
on the r-dimensional subspace P projects to: log sqrt(det(P^T P)) - r/2 log 2 pi. With
r < D that is a density of the projected data, so likelihoods of different subspaces
are not comparable, and with N <= D training rows the directions the data do not
span can grow P without cost; prefer r <= N - 1, or Mahalanobis (shrinkage) there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import matmul
from spade_jax.search.kernels import base, whitening

Array = jax.Array


@base.register_kernel
class Linear(base.L2Kernel):
  """d(x, y) = |(x - y) P|.

  Fields:
    projection: [D, r] P (trainable).
    center: [D] c, subtracted before projecting (fixed).
  """
  projection: Array
  center: Array

  name = "linear"
  trainable = ("projection",)

  @property
  def input_dim(self) -> int:
    return int(self.projection.shape[0])

  def features(self, x: Array) -> Array:
    return matmul.dot(x - self.center, self.projection)

  def log_normalizer(self) -> Array:
    rank = self.projection.shape[1]
    _, log_det = jnp.linalg.slogdet(self.projection.T @ self.projection)
    return 0.5 * log_det - 0.5 * rank * base._LOG_2PI  # pylint: disable=protected-access

  @classmethod
  def from_features(cls, features, *, rank: int | None = None, **_) -> Linear:
    return linear_from_features(features, rank=rank)


def linear(projection, center=None) -> Linear:
  """The metric |(x - y) P| of a given P [D, r] (center: [D], default 0).

  Raises:
    ValueError: P not [D, r], not finite, or a center of another size.
  """
  p = np.asarray(projection, np.float32)
  if p.ndim != 2 or min(p.shape) < 1:
    raise ValueError(f"projection must be [D, r], got shape {p.shape}")
  base.as_param(p, "projection")
  c = np.zeros(p.shape[0], np.float32) if center is None else np.asarray(center, np.float32)
  if c.shape != (p.shape[0],):
    raise ValueError(f"center must be [{p.shape[0]}], got shape {c.shape}")
  return Linear(projection=jnp.asarray(p), center=base.as_param(c, "center"))


def linear_from_features(features, rank: int | None = None) -> Linear:
  """P = the whitening of the top-r principal directions of features [N, D] (d is then
  the Mahalanobis distance within those r directions); rank None: min(D, N - 1, 64)."""
  mean, v, s, _ = whitening.covariance_spectrum(features)
  dim = mean.shape[0]
  rank = min(dim, s.shape[0], 64) if rank is None else rank
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not \
      1 <= rank <= s.shape[0]:
    raise ValueError(f"rank must be an int in [1, {s.shape[0]}] (the features' rank), "
                     f"got {rank!r}")
  top = np.argsort(s)[::-1][:rank]
  return linear(v[:, top] / np.sqrt(s[top]), mean)
