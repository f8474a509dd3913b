"""Float32 matrix products at full precision on every backend.

XLA may compute a float32 dot at reduced precision where that is the backend's
default: on NVIDIA GPUs since Ampere, TensorFloat-32 (a 10-bit mantissa); on TPUs,
bfloat16 passes. SPADE's distances come from the expansion |q|^2 + |g|^2 - 2 q.g,
where such rounding is amplified by cancellation: on an H200, TF32 moved distances of
ordinary features by up to 4% and changed their nearest neighbours. Every dot of the
search, the kernels and the scoring therefore asks for Precision.HIGHEST (plain float32;
identical to the default on CPUs). Operands in bfloat16 stay a bfloat16 product with
float32 accumulation: that is the explicit fast option (experiments/bench/precision.py).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array

HIGHEST = lax.Precision.HIGHEST


def dot(a: Array, b: Array) -> Array:
  """a @ b ([..., K] x [K, N] or vectors), float32 result at full precision."""
  return jnp.matmul(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def dot_t(a: Array, b: Array) -> Array:
  """a @ b.T: [Q, E] x [C, E] -> [Q, C] float32 at full precision (the proxy block)."""
  return jnp.matmul(a, b.T, precision=HIGHEST, preferred_element_type=jnp.float32)


def vdot(x: Array, y: Array) -> Array:
  """Inner product of two vectors [D] x [D] -> scalar float32 at full precision."""
  return jnp.dot(x, y, precision=HIGHEST, preferred_element_type=jnp.float32)
