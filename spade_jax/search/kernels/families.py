"""Every built-in kernel family, imported so that their classes are in base.KERNELS."""

from spade_jax.search.kernels import (  # noqa: F401  (imported to register the families)
  dot_product,
  fourier,
  landmarks,
  projection,
  shift_invariant,
  whitening,
)
