"""Kernels by name, fitted from training features: closed form, or learned with optax.

    k = kernels.from_features("mahalanobis", train_pool)           # Ledoit-Wolf
    k, losses = kernels.learn("mahalanobis", train_pool, steps=100)  # + kernels.fit
    per_level = kernels.for_levels("mahalanobis", {"pool": pool, "layer1": feats1, ...})

`features` may be [N, D] (one row per image) or [N, ..., D] (rows of the last axis,
e.g. the [N, h, w, C] patches of N images); learning then holds out whole images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from spade_jax.search.kernels import (
  base,
  families,  # noqa: F401  (imported: the registry)
  objectives,
  training,
)

Array = jax.Array
# The objective of kernels.learn when none is given: likelihood cross-validation over
# 5 folds of images (kernels with statistics need folds; see objectives.py), the
# density truncated to the 50 nearest rows of the rest.
DEFAULT_OBJECTIVE = objectives.LooLogLikelihood(k=50, folds=5, batch_size=512)


def kernel_class(name: str) -> type:
  """The registered kernel class of `name`.

  Raises:
    ValueError: an unknown name.
  """
  if name not in base.KERNELS:
    raise ValueError(f"unknown kernel {name!r}; known: {sorted(base.KERNELS)}")
  return base.KERNELS[name]


def from_features(name: str, features: Any, *, key: Array | None = None, **options) -> Any:
  """A `name` kernel fitted from training features in closed form or by a heuristic:
  mahalanobis (Ledoit-Wolf), linear (top principal directions, whitened), rbf /
  laplacian (median heuristic bandwidth), polynomial (gamma = 1 / mean |x|^2), rff /
  nystrom (random draws / landmarks from `key`, median heuristic bandwidth).

  Args:
    name: a registered kernel name (base.KERNELS).
    features: [N, D] or [N, ..., D] training features (NumPy or JAX).
    key: PRNG key of random kernels (default jax.random.key(0)).
    **options: the family's from_features options (e.g. shrinkage=, rank=,
      num_features=, num_landmarks=, bandwidth=, degree=).

  Raises:
    ValueError: unknown name, bad features or options.
  """
  cls = kernel_class(name)
  if not hasattr(cls, "from_features"):
    raise ValueError(f"kernel {name!r} has no from_features; build it directly")
  if np.ndim(features) < 2:
    raise ValueError(f"features must be [N, D] or [N, ..., D], got shape {np.shape(features)}")
  return cls.from_features(np.asarray(features), key=key, **options)


def learn(kernel: str | Any, features: Any, *, objective: Any = None, steps: int = 100,
          learning_rate: float = 0.05, optimizer: optax.GradientTransformation | None = None,
          key: Array | None = None, **options) -> tuple[Any, Array]:
  """from_features (when given a name) then kernels.fit with Adam.

  Args:
    kernel: a kernel name or a starting kernel.
    features: [N, D] or [N, ..., D] normal training features.
    objective: default DEFAULT_OBJECTIVE (cross-validated likelihood, 5 folds).
    steps, learning_rate: Adam's steps and rate (optimizer overrides both's Adam).
    key: PRNG key (random kernels, folds, minibatches).
    **options: from_features options.

  Returns:
    (the learned kernel, the losses [steps]).
  """
  key = jax.random.key(0) if key is None else key
  init_key, fit_key = jax.random.split(key)
  if isinstance(kernel, str):
    kernel = from_features(kernel, features, key=init_key, **options)
  if optimizer is None:
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
      raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    optimizer = optax.adam(learning_rate)
  return training.fit(kernel, features, objective=DEFAULT_OBJECTIVE if objective is None
                     else objective, optimizer=optimizer, steps=steps, key=fit_key)


def for_levels(name: str, features: Mapping[str, Any], *, learned: bool = False,
               key: Array | None = None, **kwargs) -> dict[str, Any]:
  """One kernel per feature set (e.g. {"pool": [N, D], "layer1": [N, h, w, C], ...}),
  by from_features, or by learn when learned=True (kwargs go to either).

  Returns:
    {name: kernel}, ready for image_scores(metric=out["pool"]) and
    pixel_scores(metric={level: out[level] for level in levels}).
  """
  if not isinstance(features, Mapping) or not features:
    raise ValueError("features must be a non-empty dict name -> [N, ..., D] features")
  key = jax.random.key(0) if key is None else key
  out = {}
  for i, (level, feats) in enumerate(features.items()):
    level_key = jax.random.fold_in(key, i)
    if learned:
      out[level], _ = learn(name, feats, key=level_key, **kwargs)
    else:
      out[level] = from_features(name, feats, key=level_key, **kwargs)
  return out
