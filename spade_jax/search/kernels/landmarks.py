"""Nystrom features: a kernel's values at L landmarks as an explicit map.

    z(x) = k(x, Z) U diag(e)^{-1/2},   k(Z, Z) = U diag(e) U^T,

Z [L, D] the landmarks, so z(x) . z(y) = k(x, Z) k(Z, Z)^{-1} k(Z, y): the kernel
projected on the landmarks' span (exact when x or y is a landmark). The induced
distance |z(x) - z(y)| is searched as L2 on the features, and the kernel density of a
memory bank is one dot product per query (density.memory_density).

The base kernel is the RBF or the Laplacian with a trainable bandwidth h; the
eigendecomposition runs inside the map (L x L, once per call), so h can be learned.
Eigenvalues below `jitter` times the largest are raised to it (a float32 Gram matrix
of close landmarks is near singular).
"""

from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import matmul
from spade_jax.search.kernels import base, shift_invariant

Array = jax.Array
BASES = ("rbf", "laplacian")


@base.register_kernel
class Nystrom(base.L2Kernel):
  """Nystrom map of an RBF / Laplacian kernel (module docstring).

  Fields:
    landmarks: [L, D] Z (fixed).
    log_bandwidth: log h (trainable).
    kind: the base kernel, "rbf" or "laplacian" (static).
    jitter: relative eigenvalue floor (static).
  """
  landmarks: Array
  log_bandwidth: Array
  kind: str = struct.field(pytree_node=False, default="rbf")
  jitter: float = struct.field(pytree_node=False, default=1e-5)

  name = "nystrom"
  trainable = ("log_bandwidth",)
  approximates_kernel = True

  @property
  def input_dim(self) -> int:
    return int(self.landmarks.shape[1])

  def base_kernel(self, x: Array, y: Array) -> Array:
    """[N, D] x [L, D] -> [N, L] base kernel values (matmul form of the distances)."""
    sq = (jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1)[None, :]
          - 2.0 * matmul.dot_t(x, y))
    sq = jnp.maximum(sq, 0.0)
    if self.kind == "rbf":
      return jnp.exp(-0.5 * sq * jnp.exp(-2.0 * self.log_bandwidth))
    return jnp.exp(-base.safe_sqrt(sq) * jnp.exp(-self.log_bandwidth))

  def features(self, x: Array) -> Array:
    e, u = jnp.linalg.eigh(self.base_kernel(self.landmarks, self.landmarks))
    e = jnp.maximum(e, self.jitter * jnp.max(e))
    return matmul.dot(self.base_kernel(x, self.landmarks), u * jax.lax.rsqrt(e))

  @classmethod
  def from_features(cls, features, *, num_landmarks: int = 256,
                    bandwidth: float | None = None, key=None, base_kernel: str = "rbf",
                    **_) -> Nystrom:
    x = np.asarray(features, np.float32)
    x = x.reshape(-1, x.shape[-1])
    key = jax.random.key(0) if key is None else key
    count = min(int(num_landmarks), x.shape[0])
    rows = np.asarray(jax.random.choice(key, x.shape[0], (count,), replace=False))
    h = shift_invariant.median_distance(x) if bandwidth is None else bandwidth
    return nystrom(x[np.sort(rows)], h, base_kernel=base_kernel)


def nystrom(landmarks, bandwidth: float, *, base_kernel: str = "rbf",
            jitter: float = 1e-5) -> Nystrom:
  """Nystrom map at landmarks [L, D] (from_features: L random training rows).

  Raises:
    ValueError: landmarks not [L, D] or not finite, bandwidth <= 0, unknown base.
  """
  z = np.asarray(landmarks, np.float32)
  if z.ndim != 2 or min(z.shape) < 1:
    raise ValueError(f"landmarks must be [L, D], got shape {z.shape}")
  if base_kernel not in BASES:
    raise ValueError(f"base_kernel must be one of {BASES}, got {base_kernel!r}")
  if not 0 <= jitter < 1:
    raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
  return Nystrom(landmarks=base.as_param(z, "landmarks"),
                 log_bandwidth=jnp.log(base.as_param(bandwidth, "bandwidth", positive=True)),
                 kind=base_kernel, jitter=float(jitter))
