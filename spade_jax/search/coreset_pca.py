"""The principal-component bound of the pruned greedy coreset (coreset(prune="pca")).

A greedy step must find the rows y whose running minimum m = min_c fl|y - c|^2 drops at
the new center c. With a basis V = [P Q] of the rows' space (P: the top r = COLUMNS - 1
principal directions of the rows, Q: the others) and their mean mu,

  |y - c|^2 >= (|P^T (y - c)|^2 + (|Q^T (y - mu)| - |Q^T (c - mu)|)^2) / ||V||_2^2

(|V^T v| <= ||V||_2 |v|, and the reverse triangle inequality on Q's part), so each row
needs only its COLUMNS values w(y) = (P^T (y - mu), |Q^T (y - mu)|), [R, 32] (a quarter
of the bytes of 128 projected values), to rule out a new minimum: a row is open only
when this bound, with the float32 rounding margins of open_rows, is below m. The bound
holds for any float32 matrix V and vector mu (the PCA only makes it tight), so a
sharded bank may use any basis per device; basis() gives every device the same one
anyway (the covariance of all rows, summed over the mesh axis).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

COLUMNS = 32  # r = 31 principal components and the norm of the rest: 128-byte rows.
MAX_DIM = 1024  # The margins below assume d <= 1024 (d^2 2^-24 <= 0.07).
_U = 2.0 ** -24
_CAP = np.float32(2.0 ** 126)  # Caps the bound's sum (overflow), far below float32 max.
_FLOOR = np.float32(2.0 ** -100)
_MAX_RADIUS = np.float32(2.0 ** 100)  # Beyond it the bound is switched off (scale 0).


class Basis(NamedTuple):
  """What the bound needs of the rows' space (basis()): mean [d], vectors [d, d]
  (columns: the top r principal directions first), scale and error (float32 scalars,
  see open_rows), radius: the largest fl|y - mean| over the rows (all devices)."""
  mean: Array
  vectors: Array
  scale: Array
  error: Array
  radius: Array


def _slack(d: int) -> np.float32:
  """The relative margin sl = 16 (d + r + 16) 2^-24 of open_rows (<= 1.1e-3 for d <= 1024)."""
  return np.float32(16 * (d + COLUMNS + 15) * _U)


def _project_rows(y: Array, mean: Array, vectors: Array) -> tuple[Array, Array]:
  """(w [R, COLUMNS]: (P^T (y - mean), |Q^T (y - mean)|) in float32, radii [R]:
  fl|y - mean|) of rows y [R, d]; d < COLUMNS: zero columns before the norm."""
  centred = y - mean[None, :]
  z = jnp.dot(centred, vectors, precision=lax.Precision.HIGHEST)
  r = min(COLUMNS - 1, y.shape[1] - 1)
  rest = jnp.sqrt(jnp.sum(jnp.square(z[:, r:]), axis=1))
  w = jnp.concatenate([z[:, :r], jnp.zeros((y.shape[0], COLUMNS - 1 - r), z.dtype),
                       rest[:, None]], axis=1)
  return w, jnp.sqrt(jnp.sum(jnp.square(centred), axis=1))


def basis(y: Array, valid: Array | None, axis: str | None) -> Basis:
  """The basis of the valid rows y [R, d] (float32; over the mesh axis when `axis`):
  the mean, the covariance's eigenvectors by decreasing eigenvalue, and the scalars
  of open_rows' bound (their derivation: open_rows)."""
  num, d = y.shape
  assert d <= MAX_DIM, d  # coreset() refuses more.
  weight = jnp.ones((num,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  total = lambda v: v if axis is None else lax.psum(v, axis)
  count = jnp.maximum(total(jnp.sum(weight)), 1.0)
  mean = total(jnp.sum(y * weight[:, None], axis=0)) / count
  centred = (y - mean[None, :]) * weight[:, None]
  cov = total(jnp.dot(centred.T, centred, precision=lax.Precision.HIGHEST)) / count
  vectors = jnp.linalg.eigh(cov)[1][:, ::-1]  # Decreasing eigenvalues.
  # f = fl||fl(V^T V) - I||_F; ||V||_2^2 <= (1 + 2 f) / (1 - 2 g d) (open_rows).
  gram = jnp.dot(vectors.T, vectors, precision=lax.Precision.HIGHEST)
  f = jnp.sqrt(jnp.sum(jnp.square(gram - jnp.eye(d, dtype=jnp.float32))))
  gamma = (d + 2) * _U
  norm2 = (1 + 2 * f) / np.float32(1 - 2 * gamma * d)  # >= ||V||_2^2 >= ||V||_2 (>= 1).
  radius = jnp.max(jnp.where(weight > 0, _project_rows(y, mean, vectors)[1], 0.0))
  if axis is not None:
    radius = lax.pmax(radius, axis)
  usable = (f <= 0.25) & (radius <= _MAX_RADIUS) & jnp.all(jnp.isfinite(vectors))
  scale = (1 - _slack(d)) * np.float32(1 - 2 * gamma * d) / (1 + 2 * f)
  error = np.float32(4 * gamma * (math.sqrt(d) + 2)) * norm2
  zero = jnp.float32(0)
  return Basis(mean, jnp.where(usable, vectors, 0.0), jnp.where(usable, scale, zero),
               jnp.where(usable, error, zero), jnp.where(usable, radius, zero))


def project(b: Basis, y: Array) -> Array:
  """[R, COLUMNS] float32 w of rows y [R, d] (the bound's rows)."""
  return _project_rows(y, b.mean, b.vectors)[0]


def open_rows(b: Basis, w: Array, center: Array, mins: Array) -> Array:
  """[R] bool: the rows whose running minimum mins [R] may drop at the new center
  [d], from their bound rows w = project(b, y) [R, COLUMNS]; every other row has
  fl|y - center|^2 >= its minimum, however the float32 distance sums its d squares.

  Why (u = 2^-24, d <= 1024, g = (d + 2) u, r + 1 = COLUMNS, sl = _slack(d) >= 16 (d +
  r + 16) u; fl: float32, in any order of summation, with FMA or not; e_n = 2 n 2^-126
  for results below normal floats that XLA may flush to 0). Exact values: V, mu (the
  float32 basis, any matrix and vector), w(v) = (P^T (v - mu), |Q^T (v - mu)|).
  1. ||V||_2^2 <= N2 = (1 + 2 f) / (1 - 2 g d): G~ = fl(V^T V) is within g |V|^T |V|
     of V^T V entrywise, so ||V^T V - G~||_F <= g ||V||_F^2 <= g d ||V||_2^2, and
     ||G~ - I||_F <= 2 f (the sum of d^2 squares is within (d^2 + 2) u < 0.1), so
     ||V||_2^2 = ||V^T V||_2 <= 1 + 2 f + g d ||V||_2^2. basis() switches the bound
     off (scale = error = 0: every row but those at -inf open) unless f <= 1/4 and
     every fl|y - mu| <= 2^100, so nothing below overflows but the capped sum.
  2. Computed rows: w~(v) = (z~[:r], fl|z~[r:]|), z~ = fl(fl(v - mu) V). The rounding
     of v - mu moves z by <= u ||V||_2 |v - mu|, the d-term products by <= g (|V|^T
     |v - mu|) entrywise, a vector of norm <= g ||V||_F |v - mu| <= g sqrt(d N2) |v -
     mu|, and the norm of the rest by <= g |z~[r:]| <= g N2 |v - mu| (1 + g); and
     ||a| - |b|| <= |a - b| moves the norm like the vector; flushing moves a norm by
     at most sqrt(e_d) <= 2^-57 and the products by far less. With |v - mu| <= (1 +
     g) rho~ + 2^-57 (rho~ = fl|v - mu|), |w~(v) - w(v)| <= error rho~ + 2^-55 for
     error = 4 g (sqrt(d) + 2) N2 (2x the sum of the terms; error <= 2^-6). So for a
     row y and the center c, |w~(y) - w~(c) - (w(y) - w(c))| <= E = error (radius +
     rho~_c) + 2^-50 (radius >= rho~_y, the largest over the rows; the margins cover
     the rounding of E).
  3. With D = |y - c|^2 (exact) and q = |w~(y) - w~(c)| (exact from the float32
     values): sqrt(D) >= |w(y) - w(c)| / ||V||_2 >= (q - E) / sqrt(N2). The bound's
     sum q~ = fl(sum of r + 1 squares of float32 differences) <= (1 + (r + 3) u) q^2
     + e_{r+1} (capped at 2^126: a capped or overflowed sum still means q^2 >= 2^125).
  4. The test closes a row when lb >= fl(m + 2^-100), lb = fl(fl(max(fl(fl(sqrt(q~))
     (1 - sl)) - E, 0)^2) scale), scale = fl((1 - sl) (1 - 2 g d) / (1 + 2 f)) <=
     (1 - sl) (1 + 3 u) / N2. Then lb >= 2^-100 > 0, so q~ >= 2^-101 and e_{r+1} /
     q~ <= (r + 1) u: fl(sqrt(q~) (1 - sl)) <= q (1 - sl) (1 + 3 u) / (1 - (2 r + 4) u)
     <= q (1 - sl / 2) and its difference with E (positive) rounds to at most (q - E)
     (the u of the subtraction is within the sl / 2 left). So lb <= (q - E)^2 (1 - sl)
     (1 + 6 u) / N2 <= D (1 - sl / 2).
  5. The float32 distance fl|y - c|^2 >= (1 - g) D - e_d >= lb (1 + sl / 2 - g) - e_d
     >= lb + lb 7 d u - e_d >= lb >= m: 7 d u lb >= 7 d 2^-124 > e_d = d 2^-125 and
     sl / 2 - g >= 7 d u. So the minimum min(m, fl|y - c|^2) stays m, bit for bit.
  Rows at -inf (selected, padding) are never open (fl(-inf + 2^-100) = -inf); rows
  at +inf (no minimum yet) always (lb <= 2^126); a NaN bound (never, by 1.) is open.
  """
  d = center.shape[0]
  wc, rho_c = _project_rows(center[None, :], b.mean, b.vectors)
  sl = _slack(d)
  e = b.error * (b.radius + rho_c[0]) + np.float32(2.0 ** -50)
  # A barrier keeps the row sums a reduction of their own (as in coreset._lower_bounds).
  q = lax.optimization_barrier(jnp.sum(jnp.square(w - wc), axis=1))
  root = jnp.maximum(jnp.sqrt(jnp.minimum(q, _CAP)) * (1 - sl) - e, 0.0)
  lb = jnp.square(root) * b.scale
  return ~(lb >= mins + _FLOOR)
