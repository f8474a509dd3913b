"""PaDiM's per-position Gaussians (Defard et al., ICPR 2020, Sec. 3.2): fit and distances.

Notation of the paper: X_ij = {x_ij^k, k = 1 .. N} are the d-dimensional embedding
vectors (spade_jax.padim_embedding) at position (i, j) of the N training images.
PaDiM models X_ij by a Gaussian N(mu_ij, Sigma_ij), one per position:

  mu_ij    = (1 / N) sum_k x_ij^k,
  Sigma_ij = 1 / (N - 1) sum_k (x_ij^k - mu_ij)(x_ij^k - mu_ij)^T + eps I
             (regularization "paper", eps = 0.01 in the paper and both reference codes),

or, with regularization "ledoit_wolf", the Ledoit-Wolf shrinkage of the maximum-
likelihood covariance S_ij = (1 / N) sum_k y_k y_k^T, y_k = x_ij^k - mu_ij, exactly as
sklearn.covariance.ledoit_wolf computes it (eps is not added):

  m = tr(S) / d,   delta = |S - m I|_F^2 / d,
  beta = ((1 / N) sum_k |y_k|^4 - |S|_F^2) / (N d), clipped to [0, delta],
  shrinkage = beta / delta (0 when delta = 0),
  Sigma_ij = (1 - shrinkage) S + shrinkage m I.

The anomaly score of a test embedding x_ij is its Mahalanobis distance

  M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij)),

computed with the stored precision Sigma_ij^-1 (the quadratic form clamped at 0
before the root, as anomalib does).

Layout: positions are rows. fit_gaussians takes samples [P, N, d] (P = h w positions,
row-major over (i, j)) and returns mean [P, d] and precision [P, d, d];
mahalanobis_distances takes test embeddings [N, P, d] and returns [N, P].

Numerics: all in float32, without ever factoring Sigma itself. Both estimates have
the form Sigma = alpha Y^T Y + beta I, Y [N, d] the centred vectors y_k (two passes):
"paper" alpha = 1 / (N - 1), beta = eps; "ledoit_wolf" alpha = (1 - shrinkage) / N,
beta = shrinkage m (its scalars from S, products at full precision,
search/matmul.py). The QR decomposition of the stacked (N + d) x d matrix
[sqrt(alpha) Y; sqrt(beta) I] = Q R gives Sigma = R^T R with cond(R) = sqrt(cond(Sigma)),
and the precision is R^-1 R^-T (a triangular solve and a product). Forming Sigma in
float32 first would round it with an absolute error of about lambda_max u, which eps
no longer dominates: on Wide-ResNet-like features (N = 200, d = 550, cond(Sigma) ~ 1e5)
a Cholesky factorisation of the float32 Sigma moved distances by 2e-3 relatively, this
QR route by 5e-7 (float64 reference). (anomalib inverts the float32 covariance with
torch.linalg.inv; the authors' code works in float64 NumPy.) The factorisation is
LAPACK's geqrf on CPUs, cuSOLVER's geqrf on GPUs (custom calls of jax's stable list),
XLA's QR on TPUs.

Memory: the precisions take P d^2 floats, e.g. 56 x 56 positions x 550^2 x 4 bytes =
3.8 GB for Wide-ResNet50-2 at 224 pixels (d = 550), 125 MB for ResNet18 (d = 100).
fit_gaussians computes at most chunk_size positions at a time (lax.map): its peak
beyond its input and output is a few chunk_size (N + d) d floats (the stacked
matrices, their R factors and inverses, the precisions); by default about 2^24 floats
a step.

Sharded: samples given as a ShardedGallery over a mesh axis (spade_jax.shard_gallery
of [P, N, d]: positions padded to a multiple of the axis) are fitted where they lie,
each device its own positions (shard_map, no communication); mean and precision come
back as ShardedGallerys on the same mesh (their padding rows hold a precision I, never
read back). mahalanobis_distances with sharded statistics replicates the test
embeddings, computes each device's positions and gathers the [N, P] distances,
replicated on the mesh. The numbers are the single-device ones within float32
rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from spade_jax.search import matmul, neighbors, sharding

Array = jax.Array
ShardedGallery = sharding.ShardedGallery

REGULARIZATIONS = ("paper", "ledoit_wolf")
PAPER_EPSILON = 0.01
# Default fit step: chunk (N + d) d <= 2^24 floats (64 MB per stacked [chunk, N + d, d]).
CHUNK_FLOATS = 1 << 24


def default_chunk_size(num_images: int, dim: int) -> int:
  """Positions fitted per step by default: max(1, 2^24 // ((N + d) d)) (40 for N = 200,
  d = 550)."""
  return max(1, CHUNK_FLOATS // ((num_images + dim) * dim))


def chunk_positions(positions: int, chunk_size: int) -> int:
  """Positions per lax.map step: chunk_size, lowered to a divisor of `positions` when
  one lies in [chunk_size / 2, chunk_size] (one compiled step, no remainder step)."""
  if chunk_size >= positions:
    return positions
  for size in range(chunk_size, max(1, chunk_size // 2) - 1, -1):
    if positions % size == 0:
      return size
  return chunk_size


def _gram(y: Array) -> Array:
  """[..., N, d] -> [..., d, d] sum_k y_k y_k^T at full float32 precision."""
  return matmul.dot(jnp.swapaxes(y, -1, -2), y)


def _ledoit_wolf(y: Array) -> tuple[Array, Array]:
  """(shrinkage, m) of centred samples y [..., N, d], sklearn's formula (module docstring)."""
  n, d = y.shape[-2:]
  s = _gram(y) / n
  eye = jnp.eye(d, dtype=jnp.float32)
  m = jnp.trace(s, axis1=-2, axis2=-1) / d
  delta = jnp.sum((s - m[..., None, None] * eye) ** 2, axis=(-2, -1)) / d
  fourth = jnp.sum(jnp.sum(y * y, axis=-1) ** 2, axis=-1)  # sum_k |y_k|^4
  beta = (fourth / n - jnp.sum(s * s, axis=(-2, -1))) / (n * d)
  beta = jnp.minimum(jnp.maximum(beta, 0.0), delta)
  shrinkage = jnp.where(delta > 0, beta / jnp.where(delta > 0, delta, 1.0), 0.0)
  return shrinkage, m


def _centred(x: Array, regularization: str, epsilon: float
             ) -> tuple[Array, Array, Array, Array]:
  """(mean [..., d], Y [..., N, d], alpha [...], beta [...]): Sigma = alpha Y^T Y + beta I."""
  x = x.astype(jnp.float32)
  n = x.shape[-2]
  mean = jnp.mean(x, axis=-2)
  y = x - mean[..., None, :]
  if regularization == "paper":
    ones = jnp.ones(x.shape[:-2], jnp.float32)
    return mean, y, ones / (n - 1), ones * epsilon
  shrinkage, m = _ledoit_wolf(y)
  return mean, y, (1.0 - shrinkage) / n, shrinkage * m


def covariance_impl(x: Array, regularization: str, epsilon: float) -> tuple[Array, Array]:
  """mu and Sigma of samples x [..., N, d] (module docstring), float32, formed directly.

  Returns:
    (mean [..., d], covariance [..., d, d]).
  """
  mean, y, alpha, beta = _centred(x, regularization, epsilon)
  eye = jnp.eye(x.shape[-1], dtype=jnp.float32)
  return mean, alpha[..., None, None] * _gram(y) + beta[..., None, None] * eye


def precision_impl(y: Array, alpha: Array, beta: Array) -> Array:
  """(alpha Y^T Y + beta I)^-1 = R^-1 R^-T, R the QR factor of [sqrt(alpha) Y; sqrt(beta) I].

  Args:
    y: [..., N, d] centred samples.
    alpha, beta: [...] non-negative weights.

  Returns:
    [..., d, d] float32; Inf / NaN where the matrix is singular (beta = 0, rank Y < d).
  """
  d = y.shape[-1]
  eye = jnp.eye(d, dtype=jnp.float32)
  ridge = jnp.sqrt(beta)[..., None, None] * jnp.broadcast_to(eye, y.shape[:-2] + (d, d))
  stacked = jnp.concatenate([jnp.sqrt(alpha)[..., None, None] * y, ridge], axis=-2)
  r = jnp.linalg.qr(stacked, mode="r")  # [..., d, d] upper triangular, R^T R = Sigma.
  r_inv = lax.linalg.triangular_solve(r, jnp.broadcast_to(eye, r.shape), left_side=True,
                                      lower=False)
  return matmul.dot(r_inv, jnp.swapaxes(r_inv, -1, -2))


def fit_gaussians_impl(samples: Array, valid: Array | None, regularization: str,
                       epsilon: float, chunk_size: int) -> tuple[Array, Array]:
  """Un-jitted fit of one device's positions (traced; inside shard_map when sharded).

  Args:
    samples: [P, N, d] embeddings x_ij^k, one row per position.
    valid: [P] bool, False on padding rows (their Sigma is replaced by I), or None.
    regularization, epsilon: as fit_gaussians.
    chunk_size: at most this many positions per step of lax.map (bounds the peak
      memory; chunk_positions).

  Returns:
    (mean [P, d], precision [P, d, d]) float32.
  """
  if valid is None:
    valid = jnp.ones(samples.shape[:1], bool)

  def one(args):
    x, ok = args
    mean, y, alpha, beta = _centred(x, regularization, epsilon)
    # Padding rows: Sigma = I (finite, never read back).
    alpha, beta = jnp.where(ok, alpha, 0.0), jnp.where(ok, beta, 1.0)
    return mean, precision_impl(y, alpha, beta)

  chunk = chunk_positions(samples.shape[0], chunk_size)
  if chunk == samples.shape[0]:
    return jax.vmap(one)((samples, valid))
  return lax.map(one, (samples, valid), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("regularization", "epsilon", "chunk_size"))
def _fit_jit(samples, *, regularization, epsilon, chunk_size):
  if not isinstance(samples, ShardedGallery):
    return fit_gaussians_impl(samples, None, regularization, epsilon, chunk_size)
  mesh, axis = samples.mesh, samples.axis
  local = functools.partial(fit_gaussians_impl, regularization=regularization,
                            epsilon=epsilon, chunk_size=chunk_size)
  mean, precision = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis)),
                                  out_specs=(P(axis), P(axis)), check_vma=False)(
                                      samples.data, samples.valid)
  return (samples.replace(data=mean), samples.replace(data=precision))


def _distances_impl(x: Array, mean: Array, precision: Array) -> Array:
  """[C, N, d] embeddings, [C, d], [C, d, d] -> [C, N] Mahalanobis distances."""
  y = x.astype(jnp.float32) - mean[:, None, :]
  quad = jnp.sum(matmul.dot(y, precision) * y, axis=-1)
  return jnp.sqrt(jnp.maximum(quad, 0.0))


def mahalanobis_distances_impl(embeddings: Array, mean: Array | ShardedGallery,
                               precision: Array | ShardedGallery) -> Array:
  """Un-jitted mahalanobis_distances on validated arguments (traced inside jit)."""
  x = jnp.swapaxes(embeddings.astype(jnp.float32), 0, 1)  # [P, N, d]
  if not isinstance(mean, ShardedGallery):
    return _distances_impl(x, mean, precision).T
  mesh, axis = mean.mesh, mean.axis
  positions, rows = x.shape[0], mean.data.shape[0]
  x = sharding.constrain(jnp.pad(x, ((0, rows - positions), (0, 0), (0, 0))), mesh, P(axis))
  dist = jax.shard_map(_distances_impl, mesh=mesh, in_specs=(P(axis), P(axis), P(axis)),
                       out_specs=P(axis), check_vma=False)(x, mean.data, precision.data)
  return sharding.constrain(dist, mesh, P())[:positions].T


@jax.jit
def _distances_jit(embeddings, mean, precision):
  return mahalanobis_distances_impl(embeddings, mean, precision)


@functools.partial(jax.jit, static_argnames=("regularization", "epsilon"))
def _covariances_jit(samples, *, regularization, epsilon):
  return covariance_impl(samples, regularization, epsilon)


# ----------------------------------------------------------------------------------
# Validation and the public functions.


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_regularization(regularization: Any, epsilon: Any) -> float:
  """Validated epsilon as a float.

  Raises:
    ValueError: an unknown regularization, or epsilon not a finite number > 0.
  """
  if regularization not in REGULARIZATIONS:
    raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got "
                     f"{regularization!r}")
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.integer,
                                                           np.floating)):
    raise ValueError(f"epsilon must be a number, got {epsilon!r}")
  if not (math.isfinite(float(epsilon)) and float(epsilon) > 0):
    raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
  return float(epsilon)


def _check_samples(samples: Any) -> tuple[int, int, int]:
  shape = np.shape(samples)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"samples must be a non-empty [P, N, d] array (positions, training "
                     f"images, channels), got shape {shape}")
  neighbors.check_real("samples", samples)
  if shape[1] < 2:
    raise ValueError(f"samples hold {shape[1]} training image(s) per position; a "
                     "covariance needs at least 2")
  return shape


def _as_gallery(x: Any, name: str) -> Any:
  sharded = sharding.as_sharded(x, name)
  if sharded is None:
    return x
  if not sharded.contiguous:
    raise ValueError(f"{name} is sharded from process-local parts (padding inside); "
                     "shard the positions of the whole array (spade_jax.shard_gallery)")
  return sharded


def gaussian_covariances(samples: Any, *, regularization: str = "paper",
                         epsilon: float = PAPER_EPSILON) -> tuple[Array, Array]:
  """mu_ij and Sigma_ij of every position (module docstring), on one device, unchunked.

  fit_gaussians keeps only the precisions and never forms Sigma; this is the
  covariance itself, rounded to float32 (for inspection and tests: P d^2 floats at
  once).

  Args:
    samples: [P, N, d] float embeddings of N >= 2 training images per position.
    regularization: "paper" (+ eps I) or "ledoit_wolf".
    epsilon: eps, > 0 (used by "paper").

  Returns:
    (mean [P, d], covariance [P, d, d]) float32.
  """
  epsilon = check_regularization(regularization, epsilon)
  _check_samples(samples)
  return _covariances_jit(jnp.asarray(samples), regularization=regularization,
                          epsilon=epsilon)


def fit_gaussians(samples: Any, *, regularization: str = "paper",
                  epsilon: float = PAPER_EPSILON, chunk_size: int | None = None,
                  check_finite_inputs: bool = True) -> tuple[Any, Any]:
  """PaDiM's Gaussian of every position: mean mu_ij and precision Sigma_ij^-1.

  Args:
    samples: [P, N, d] float embeddings x_ij^k (P positions, N >= 2 training images, d
      channels), or a ShardedGallery of them over a mesh axis (spade_jax.shard_gallery;
      each device fits its positions).
    regularization: "paper" (Sigma + eps I, the paper's) or "ledoit_wolf" (sklearn's
      Ledoit-Wolf shrinkage; eps unused).
    epsilon: eps, finite and > 0 (paper: 0.01).
    chunk_size: at most this many positions per step (memory only; None:
      default_chunk_size(N, d); see chunk_positions).
    check_finite_inputs: reject NaN / Inf samples (one device reduction).

  Returns:
    (mean [P, d], precision [P, d, d]) float32; ShardedGallerys on the samples' mesh
    when they are sharded. A position whose Sigma is singular (only possible with
    "ledoit_wolf" when its shrinkage is 0 and N <= d, e.g. N = 2, or every channel is
    constant over the training images) has an Inf / NaN precision.

  Raises:
    ValueError: bad shapes, fewer than 2 training images, an unknown regularization,
      epsilon <= 0, chunk_size < 1, NaN / Inf samples.
  """
  epsilon = check_regularization(regularization, epsilon)
  samples = _as_gallery(samples, "samples")
  _check_samples(samples)
  if chunk_size is None:
    chunk_size = default_chunk_size(int(samples.shape[1]), int(samples.shape[2]))
  if not _is_int(chunk_size) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  if check_finite_inputs:
    neighbors.check_finite("samples", sharding.data_of(samples))
  if not isinstance(samples, ShardedGallery):
    samples = jnp.asarray(samples)
  return _fit_jit(samples, regularization=regularization, epsilon=epsilon,
                  chunk_size=int(chunk_size))


def mahalanobis_distances(embeddings: Any, mean: Any, precision: Any, *,
                          check_finite_inputs: bool = True) -> Array:
  """Per-position Mahalanobis distances M(x_ij) = sqrt((x - mu)^T Sigma^-1 (x - mu)).

  Args:
    embeddings: [N, P, d] float test embeddings (positions row-major over (i, j)).
    mean: [P, d] mu_ij from fit_gaussians (or a ShardedGallery of them).
    precision: [P, d, d] Sigma_ij^-1 (sharded alike when mean is).

  Returns:
    [N, P] float32 distances (replicated on the mesh of sharded statistics).

  Raises:
    ValueError: shapes that do not match, statistics sharded differently, NaN / Inf
      embeddings.
  """
  mean = _as_gallery(mean, "mean")
  precision = _as_gallery(precision, "precision")
  shape = np.shape(embeddings)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"embeddings must be a non-empty [N, P, d] array, got shape {shape}")
  neighbors.check_real("embeddings", embeddings)
  positions, dim = shape[1:]
  if np.shape(mean) != (positions, dim) or np.shape(precision) != (positions, dim, dim):
    raise ValueError(f"mean {np.shape(mean)} and precision {np.shape(precision)} must be "
                     f"[P, d] and [P, d, d] for embeddings of P={positions} positions and "
                     f"d={dim} channels")
  sharded = [isinstance(x, ShardedGallery) for x in (mean, precision)]
  if any(sharded):
    if not all(sharded) or (mean.mesh, mean.axis, mean.data.shape[0]) != (
        precision.mesh, precision.axis, precision.data.shape[0]):
      raise ValueError("mean and precision must be sharded alike (one mesh, axis and "
                       "padding: shard both, e.g. spade_jax.shard_gallery of a dict)")
  if check_finite_inputs:
    neighbors.check_finite("embeddings", embeddings)
  if any(sharded):
    embeddings = sharding.place_replicated(embeddings, mean.mesh)
  return _distances_jit(embeddings, mean, precision)
