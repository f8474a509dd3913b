"""A polynomial dot-product kernel, whose induced distance is not monotone in L2.

    k(x, y) = (gamma x . y + c)^p,   d_k^2 = k(x, x) + k(y, y) - 2 k(x, y),

p a positive integer (static), gamma > 0 and c > 0 trainable (as logs). Its proxy for
a fixed query, k(g, g) - 2 k(q, g), is an elementwise transform of the matmul q . g,
so the search takes the XLA path (base.DotProductKernel); the CPU kernel, which
computes plain matmuls, is never used for it.

The exact form avoids the cancellation of k(x, x) + k(y, y) - 2 k(x, y) between
near-duplicates: with u = k-argument of (x, x), v of (y, y), w of (x, y) and
delta = x - y, u - w = gamma x . delta, v - w = -gamma y . delta and
u^p - w^p = (u - w) sum_i u^i w^(p-1-i), which gives

    d_k^2 = gamma |delta|^2 S(u, w) + gamma (y . delta) (S(u, w) - S(v, w)),
    S(a, b) = sum_{i<p} a^i b^(p-1-i),   S(u, w) - S(v, w) = sum_i (u^i - v^i) w^(p-1-i),

every term a product of differences.
"""

from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import matmul
from spade_jax.search.kernels import base

Array = jax.Array


def _power_sum(a: Array, b: Array, n: int) -> Array:
  """sum_{i<n} a^i b^(n-1-i) (0 for n = 0)."""
  return sum((a**i * b ** (n - 1 - i) for i in range(n)), jnp.zeros_like(a))


@base.register_kernel
class Polynomial(base.DotProductKernel):
  """(gamma x . y + c)^degree.

  Fields:
    log_gamma: log gamma (trainable).
    log_offset: log c (trainable).
    degree: p >= 1 (static).
  """
  log_gamma: Array
  log_offset: Array
  degree: int = struct.field(pytree_node=False, default=2)

  name = "polynomial"
  trainable = ("log_gamma", "log_offset")

  def kappa(self, t: Array) -> Array:
    return (jnp.exp(self.log_gamma) * t + jnp.exp(self.log_offset)) ** self.degree

  def exact(self, x: Array, y: Array) -> Array:
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    gamma, c, p = jnp.exp(self.log_gamma), jnp.exp(self.log_offset), self.degree
    delta = x - y
    u = gamma * matmul.vdot(x, x) + c
    v = gamma * matmul.vdot(y, y) + c
    w = gamma * matmul.vdot(x, y) + c
    u_minus_v = gamma * matmul.vdot(x + y, delta)
    # S(u, w) - S(v, w) = sum_{i<p} (u^i - v^i) w^(p-1-i), u^i - v^i = (u - v) S_i(u, v).
    diff = sum((u_minus_v * _power_sum(u, v, i) * w ** (p - 1 - i) for i in range(1, p)),
               jnp.zeros_like(u))
    sq = (gamma * matmul.vdot(delta, delta) * _power_sum(u, w, p)
          + gamma * matmul.vdot(y, delta) * diff)
    return base.safe_sqrt(jnp.maximum(sq, 0.0))

  @classmethod
  def from_features(cls, features, *, degree: int = 2, offset: float = 1.0, **_):
    x = np.asarray(features, np.float64)
    x = x.reshape(-1, x.shape[-1])
    mean_sq = float(np.mean(np.sum(x * x, axis=1)))
    return polynomial(degree, gamma=1.0 / mean_sq if mean_sq > 0 else 1.0, offset=offset)


def polynomial(degree: int = 2, *, gamma: float = 1.0, offset: float = 1.0) -> Polynomial:
  """(gamma x . y + offset)^degree; from_features sets gamma = 1 / mean |x|^2.

  Raises:
    ValueError: degree not a positive int, gamma or offset not > 0.
  """
  if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
    raise ValueError(f"degree must be a positive int, got {degree!r}")
  return Polynomial(log_gamma=jnp.log(base.as_param(gamma, "gamma", positive=True)),
                    log_offset=jnp.log(base.as_param(offset, "offset", positive=True)),
                    degree=int(degree))
