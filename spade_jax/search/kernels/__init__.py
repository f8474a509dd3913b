"""Kernels as values (spade_jax.kernels): parametrised distances the search takes.

A kernel is a pytree of parameters (traced, differentiable jit arguments) with the
forms the streamed search needs; pass it as `metric=` to spade_jax.knn, image_scores
and pixel_scores (a dict level -> kernel for pixel_scores), sharded or not.

* base.py: Kernel, the two families L2Kernel (searched as L2 on transformed rows) and
  DotProductKernel (an elementwise transform of the matmul), register_kernel;
* the built-in families, one module each: whitening.py (mahalanobis), projection.py
  (linear, low rank), shift_invariant.py (rbf, laplacian), dot_product.py
  (polynomial), fourier.py (random Fourier features), landmarks.py (nystrom);
* density.py: the kernel density of a whole memory bank (explicit features);
* objectives.py, training.py: learning kernels with optax (fit) from normal features;
* build.py: kernels by name from training features (from_features, learn, for_levels);
* io.py: kernels as {name: array} + a JSON-able spec (index files).

Names resolve lazily (PEP 562): base.py sits below the search (distances.py accepts
kernels), training.py above it (its objectives search), so this package imports nothing
until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Kernel": "base", "L2Kernel": "base", "DotProductKernel": "base",
    "KERNELS": "base", "register_kernel": "base", "safe_sqrt": "base",
    "Mahalanobis": "whitening", "mahalanobis": "whitening",
    "ledoit_wolf_shrinkage": "whitening", "covariance_spectrum": "whitening",
    "Linear": "projection", "linear": "projection", "linear_from_features": "projection",
    "RBF": "shift_invariant", "rbf": "shift_invariant", "Laplacian": "shift_invariant",
    "laplacian": "shift_invariant", "median_distance": "shift_invariant",
    "Polynomial": "dot_product", "polynomial": "dot_product",
    "RandomFourier": "fourier", "random_fourier": "fourier",
    "Nystrom": "landmarks", "nystrom": "landmarks",
    "memory_density": "density", "mean_features": "density",
    "LooLogLikelihood": "objectives", "SyntheticAUROC": "objectives",
    "OBJECTIVES": "objectives",
    "fit": "training", "evaluate": "training",
    "from_features": "build", "learn": "build", "for_levels": "build",
    "DEFAULT_OBJECTIVE": "build",
    "kernel_to_arrays": "io", "kernel_from_arrays": "io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    importlib.import_module(f"{__name__}.families")  # Every built-in kernel registered.
    value = getattr(module, name)
    globals()[name] = value
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__
