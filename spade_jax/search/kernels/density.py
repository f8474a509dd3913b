"""The kernel density of a whole memory bank, one dot product per query.

For a kernel with explicit features z, z(x) . z(y) ~ k(x, y) (random Fourier features,
Nystrom: `approximates_kernel`), the kernel density of a bank {g_j},

    p(q) = (1 / M) sum_j k(q, g_j) ~ z(q) . mu,    mu = (1 / M) sum_j z(g_j),

costs one pass over the bank for mu ([E]) and then one dot product per query, instead
of a [Q, M] kernel matrix. (k(x, x) = 1 here: an unnormalised density.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import matmul, neighbors
from spade_jax.search.kernels import base

Array = jax.Array


def _check(kernel: Any, dim: int) -> None:
  if not (base.is_kernel(kernel) and getattr(kernel, "approximates_kernel", False)):
    raise ValueError("memory density needs a kernel with explicit features (random "
                     f"Fourier features, Nystrom), got {kernel!r}")
  if kernel.input_dim is not None and kernel.input_dim != dim:
    raise ValueError(f"kernel takes {kernel.input_dim}-d features, got {dim}-d ones")


@jax.jit
def _mean_features(kernel, bank):
  return jnp.mean(kernel.prepare(bank), axis=0)


def mean_features(kernel: Any, bank: Array) -> Array:
  """mu [E]: the mean feature of bank [M, D] (the bank's kernel mean embedding)."""
  bank = jnp.asarray(bank)
  if bank.ndim != 2 or bank.shape[0] < 1:
    raise ValueError(f"bank must be [M, D] with M >= 1, got shape {bank.shape}")
  _check(kernel, bank.shape[1])
  neighbors.check_finite("bank", bank)
  return _mean_features(kernel, bank)


@jax.jit
def _density(kernel, queries, mean):
  return matmul.dot(kernel.prepare(queries), mean)


def memory_density(kernel: Any, queries: Array, bank: Array | None = None, *,
                   mean: Array | None = None) -> Array:
  """p(q) ~ (1 / M) sum_j k(q, g_j) for queries [Q, D] against bank [M, D] (or its
  mean feature from mean_features). Differentiable in queries, bank and kernel.

  Returns:
    [Q] float32 densities (in [0, 1] up to the approximation).
  """
  queries = jnp.asarray(queries)
  if queries.ndim != 2:
    raise ValueError(f"queries must be [Q, D], got shape {queries.shape}")
  _check(kernel, queries.shape[1])
  if (bank is None) == (mean is None):
    raise ValueError("pass exactly one of bank and mean")
  mean = mean_features(kernel, bank) if mean is None else jnp.asarray(mean, jnp.float32)
  if mean.ndim != 1:
    raise ValueError(f"mean must be [E], got shape {np.shape(mean)}")
  return _density(kernel, queries, mean)
