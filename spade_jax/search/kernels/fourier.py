"""Random Fourier features (Rahimi & Recht, 2007): a shift-invariant kernel as a map.

    z(x) = sqrt(2 / E) cos(x W / h + b),   W [D, E] ~ the kernel's spectral density,
                                           b [E] ~ U[0, 2 pi),

so that z(x) . z(y) ~ k(x - y) (exactly in expectation): W ~ N(0, 1) for the RBF
kernel exp(-|x - y|^2 / (2 h^2)), W ~ Cauchy(0, 1) for the kernel prod_d
1 / (1 + (x_d - y_d)^2 / h^2) (spectrum "cauchy"). The kernel-induced distance is then
approximately |z(x) - z(y)|: searched as L2 on the features (one matmul per block on
every path), and the kernel density of a whole memory bank is one dot product per
query with the bank's mean feature (density.memory_density).

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
SPECTRA = ("gaussian", "cauchy")


@base.register_kernel
class RandomFourier(base.L2Kernel):
  """Random Fourier features of a shift-invariant kernel (module docstring).

  Fields:
    omega: [D, E] spectral draws W at h = 1 (fixed).
    phase: [E] phases b (fixed).
    log_bandwidth: log h (trainable).
    spectrum: "gaussian" (RBF) or "cauchy" (static; which W was drawn from).
  """
  omega: Array
  phase: Array
  log_bandwidth: Array
  spectrum: str = struct.field(pytree_node=False, default="gaussian")

  name = "rff"
  trainable = ("log_bandwidth",)
  approximates_kernel = True  # z(x) . z(y) ~ k(x, y): density.memory_density applies.

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

  Raises:
    ValueError: non-positive sizes or bandwidth, unknown spectrum.
  """
  for name, value in (("dim", dim), ("num_features", num_features)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if spectrum not in SPECTRA:
    raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
  k_omega, k_phase = jax.random.split(key)
  shape = (int(dim), int(num_features))
  omega = (jax.random.normal(k_omega, shape) if spectrum == "gaussian"
           else jax.random.cauchy(k_omega, shape))
  phase = jax.random.uniform(k_phase, (int(num_features),), maxval=2.0 * np.pi)
  return RandomFourier(omega=omega.astype(jnp.float32), phase=phase.astype(jnp.float32),
                       log_bandwidth=jnp.log(base.as_param(bandwidth, "bandwidth",
                                                           positive=True)),
                       spectrum=spectrum)
