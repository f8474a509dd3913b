"""Random Fourier features (Rahimi & Recht, 2007): a shift-invariant kernel as a map.

    z(x) = sqrt(2 / E) cos(x W / h + b),   W [D, E] ~ the kernel's spectral density,
                                           b [E] ~ U[0, 2 pi),

so that z(x) . z(y) ~ k(x - y) (exactly in expectation; the Monte-Carlo error is
O(1 / sqrt(E))). The spectral density is the Fourier transform of k (Bochner), one per
`spectrum` (SPECTRA), each column of W drawn independently:

* "gaussian": W ~ N(0, I_D), the RBF kernel exp(-|x - y|_2^2 / (2 h^2)) (kernels.rbf);
* "laplacian": W = g / |u|, g ~ N(0, I_D), u ~ N(0, 1) (the multivariate Cauchy
  density, a Student t with 1 degree of freedom), the Laplacian kernel
  exp(-|x - y|_2 / h) of kernels.laplacian (L2 norm);
* "laplacian_l1": W_dj ~ Cauchy(0, 1) i.i.d. per dimension, the product of 1-d
  Laplacian kernels exp(-|x - y|_1 / h) (L1 norm). (Called "cauchy" before: the name
  of its frequencies' density, not of its kernel; the old name is refused.)

The kernel-induced distance is then approximately |z(x) - z(y)|: searched as L2 on
the features (one matmul per block on every path), and the kernel density of a whole
memory bank is one dot product per query with the bank's mean feature
(density.memory_density).

W and b are fixed draws (stored in the kernel, so a reloaded kernel gives the same
distances); the bandwidth h is trainable.
"""

from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import matmul
from spade_jax.search.kernels import base, shift_invariant

Array = jax.Array
SPECTRA = ("gaussian", "laplacian", "laplacian_l1")
# Old spectrum names -> their new names (refused, with a message naming the new one).
RENAMED_SPECTRA = {"cauchy": "laplacian_l1"}


def check_spectrum(spectrum) -> None:
  """Raises a ValueError unless `spectrum` is one of SPECTRA (naming the new name of a
  renamed one: "cauchy" is "laplacian_l1")."""
  if isinstance(spectrum, str) and spectrum in RENAMED_SPECTRA:
    new = RENAMED_SPECTRA[spectrum]
    raise ValueError(
        f"spectrum {spectrum!r} was renamed {new!r}: its i.i.d. Cauchy frequencies "
        f"approximate the kernel exp(-|x - y|_1 / h) (a Laplacian kernel of the L1 norm), "
        f"not a Cauchy kernel. Pass spectrum={new!r} (the same draws); a kernel stored "
        f"with the old name must be fitted again")
  if not isinstance(spectrum, str) or spectrum not in SPECTRA:
    raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")


def draw_frequencies(key: Array, shape: tuple[int, int], spectrum: str) -> Array:
  """[D, E] frequencies W at h = 1 from the spectral density of `spectrum` (SPECTRA;
  module docstring): each column an independent draw from the D-d density."""
  check_spectrum(spectrum)
  if spectrum == "gaussian":
    return jax.random.normal(key, shape)
  if spectrum == "laplacian_l1":
    return jax.random.cauchy(key, shape)
  k_dir, k_scale = jax.random.split(key)  # "laplacian": multivariate Cauchy.
  return jax.random.normal(k_dir, shape) / jnp.abs(jax.random.normal(k_scale, shape[1:]))


@base.register_kernel
class RandomFourier(base.L2Kernel):
  """Random Fourier features of a shift-invariant kernel (module docstring).

  Fields:
    omega: [D, E] spectral draws W at h = 1 (fixed).
    phase: [E] phases b (fixed).
    log_bandwidth: log h (trainable).
    spectrum: which density W was drawn from (static; SPECTRA): "gaussian" (RBF),
      "laplacian" (exp(-|x - y|_2 / h)) or "laplacian_l1" (exp(-|x - y|_1 / h)).
  """
  omega: Array
  phase: Array
  log_bandwidth: Array
  spectrum: str = struct.field(pytree_node=False, default="gaussian")

  name = "rff"
  trainable = ("log_bandwidth",)
  approximates_kernel = True  # z(x) . z(y) ~ k(x, y): density.memory_density applies.

  def __post_init__(self):
    check_spectrum(self.spectrum)  # Also a kernel read from a file (io.py).

  @classmethod
  def check_static(cls, static) -> None:
    check_spectrum(static.get("spectrum"))

  @property
  def input_dim(self) -> int:
    return int(self.omega.shape[0])

  def features(self, x: Array) -> Array:
    num = self.omega.shape[1]
    arg = matmul.dot(x, self.omega) * jnp.exp(-self.log_bandwidth) + self.phase
    return np.sqrt(2.0 / num) * jnp.cos(arg)

  @classmethod
  def from_features(cls, features, *, num_features: int | None = None,
                    bandwidth: float | None = None, key=None, spectrum: str = "gaussian",
                    **_) -> RandomFourier:
    """num_features None: 8 D, at most 1024 (the search then runs in E dimensions: E =
    1024 for 24-d patches would make it 40 times dearer than L2's)."""
    x = np.asarray(features)
    h = shift_invariant.median_distance(x) if bandwidth is None else bandwidth
    key = jax.random.key(0) if key is None else key
    num = min(8 * x.shape[-1], 1024) if num_features is None else num_features
    return random_fourier(x.shape[-1], num, h, key, spectrum=spectrum)


def random_fourier(dim: int, num_features: int, bandwidth: float, key: Array, *,
                   spectrum: str = "gaussian") -> RandomFourier:
  """E random Fourier features of [dim] inputs with bandwidth h.

  Args:
    dim: D, the size of the input rows.
    num_features: E, the size of the features z(x).
    bandwidth: h > 0.
    key: PRNG key of W and b.
    spectrum: the kernel approximated (SPECTRA; module docstring): "gaussian" (RBF),
      "laplacian" (exp(-|x - y|_2 / h)) or "laplacian_l1" (exp(-|x - y|_1 / h)).

  Returns:
    A RandomFourier kernel of [dim] rows (omega [dim, E], phase [E]).

  Raises:
    ValueError: non-positive sizes or bandwidth, unknown or renamed spectrum.
  """
  for name, value in (("dim", dim), ("num_features", num_features)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  check_spectrum(spectrum)
  k_omega, k_phase = jax.random.split(key)
  omega = draw_frequencies(k_omega, (int(dim), int(num_features)), spectrum)
  phase = jax.random.uniform(k_phase, (int(num_features),), maxval=2.0 * np.pi)
  return RandomFourier(omega=omega.astype(jnp.float32), phase=phase.astype(jnp.float32),
                       log_bandwidth=jnp.log(base.as_param(bandwidth, "bandwidth",
                                                           positive=True)),
                       spectrum=spectrum)
