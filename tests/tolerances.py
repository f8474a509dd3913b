"""What two float32 programs are guaranteed to agree on, for the tests' comparisons.

Two differently compiled programs (CPU kernel vs XLA, sharded vs single device, AVX2
vs AVX-512 code, vmapped vs not) evaluate the same sums in different orders, so their
float32 results are equal only up to rounding. Bit equality is asserted only where it
truly holds: the same compiled program on the same inputs, or sums whose every partial
result is exact (small integers), where every order gives the same bits.

The bounds are the classic ones (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., section 4.2): a float32 sum of n terms carries a relative error
of at most (n - 1) u of the sum of their magnitudes, u = 2^-24 the unit roundoff. A
distance is such a sum of D non-negative terms (the exact recompute, d^2 = sum
(x_d - y_d)^2), so two programs' distances differ by at most about 2 D u relatively;
everything after it in SPADE (means of kappa distances, bilinear weights, a Gaussian of
T taps) is a convex combination, which adds at most a few u per term.
"""

import numpy as np

U = 2.0 ** -24  # float32 unit roundoff.


def distance_rtol(dim: int) -> float:
  """Relative bound between two programs' float32 distances of D = dim features.

  2 (D - 1) u for two differently ordered sums of D non-negative terms, plus a few u
  for the squares, the subtraction and the square root; doubled for slack (the tests
  must not depend on which summation order a CPU's vector width gives).
  """
  return 2.0 * (2.0 * dim + 8.0) * U


def map_rtol(dim: int, taps: int = 0) -> float:
  """Relative bound between two programs' score maps built from D-dim distances:
  distance_rtol(dim), plus convex combinations of up to `taps` terms afterwards (the
  mean over kappa and levels, bilinear upsampling, a Gaussian blur of `taps` taps)."""
  return distance_rtol(dim) + 2.0 * (taps + 16) * U


def assert_same_neighbours(dist, idx, ref_dist, ref_idx, rtol: float, atol: float = 0.0):
  """Two kNN results agree up to rounding: distances within rtol, and the same indices
  except among near-ties (candidates whose distances lie within the tolerance of each
  other may come in either order, and at the k-th place either may be chosen).

  Args:
    dist, idx: [Q, k] one program's result.
    ref_dist, ref_idx: [Q, k] the other's (or a float64 reference's).
    rtol, atol: the bound on distances (e.g. distance_rtol(D)).
  """
  dist, ref_dist = np.asarray(dist, np.float64), np.asarray(ref_dist, np.float64)
  idx, ref_idx = np.asarray(idx), np.asarray(ref_idx)
  np.testing.assert_allclose(dist, ref_dist, rtol=rtol, atol=atol)
  tol = atol + rtol * np.where(np.isfinite(ref_dist), np.abs(ref_dist), 0.0)
  for r in np.nonzero((idx != ref_idx).any(axis=1))[0]:
    kth = ref_dist[r, -1] if np.isfinite(ref_dist[r, -1]) else 0.0
    for j in np.nonzero(idx[r] != ref_idx[r])[0]:
      # The index at slot j must be one the reference holds at a near-equal distance,
      # or a near-tie of the reference's k-th neighbour (the boundary of the list).
      where = np.nonzero(ref_idx[r] == idx[r, j])[0]
      swapped = where.size and abs(ref_dist[r, where[0]] - dist[r, j]) <= 2 * tol[r, j]
      boundary = abs(dist[r, j] - kth) <= 2 * (atol + rtol * abs(kth))
      assert swapped or boundary, (
          f"row {r}, slot {j}: index {idx[r, j]} at distance {dist[r, j]} is not a "
          f"near-tie of the reference's {ref_idx[r].tolist()} at {ref_dist[r].tolist()}")
    assert len(set(idx[r].tolist())) == idx.shape[1] or (idx[r] < 0).any(), (
        f"row {r}: repeated indices {idx[r].tolist()}")
