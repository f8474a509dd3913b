"""kernels.fit: a kernel's trainable parameters learned with optax, in one jitted loop.

    kernel, losses = kernels.fit(kernel, train_features,
                                 objective=kernels.LooLogLikelihood(folds=5),
                                 optimizer=optax.adam(0.05), steps=100,
                                 key=jax.random.key(0))

The objective is set up once on the host (folds, refitted statistics: objectives.py);
then `steps` optimizer steps run inside one jax.jit as a lax.scan, the kernel's
structure static and its parameters, the data and the step keys traced arguments.
Only the kernel's `trainable` fields (or those named) change; the rest (random
features, landmarks, a covariance spectrum) stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
import numpy as np
import optax

from spade_jax.search.kernels import base
from spade_jax.search.kernels import objectives as objectives_lib

Array = jax.Array


def _check(kernel: Any, steps: int, trainable: Sequence[str] | None) -> tuple[str, ...]:
  if not base.is_kernel(kernel):
    raise ValueError(f"kernel must be a spade_jax.kernels kernel, got {type(kernel).__name__}")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  names = tuple(type(kernel).trainable if trainable is None else trainable)
  params = kernel.params()
  unknown = [n for n in names if n not in params]
  if not names or unknown:
    raise ValueError(f"trainable must name array fields of {kernel.name!r} "
                     f"({sorted(params)}), got {list(names)}")
  return names


def _setup(kernel, features, objective, groups, key):
  objective = objectives_lib.LooLogLikelihood() if objective is None else objective
  if not hasattr(objective, "setup"):
    raise ValueError(f"objective must be an objective (kernels.LooLogLikelihood, "
                     f"kernels.SyntheticAUROC), got {objective!r}")
  if kernel.input_dim is not None and np.shape(features)[-1] != kernel.input_dim:
    raise ValueError(f"features are {np.shape(features)[-1]}-d, the kernel takes "
                     f"{kernel.input_dim}-d ones")
  return objective.setup(kernel, features, groups=groups, key=key)


def fit(kernel: Any, features: Any, *, objective: Any = None,
        optimizer: optax.GradientTransformation | None = None, steps: int = 100,
        key: Array | None = None, groups: Any = None,
        trainable: Sequence[str] | None = None) -> tuple[Any, Array]:
  """Learns a kernel's parameters from normal features.

  Args:
    kernel: the starting kernel (e.g. kernels.from_features(name, features)).
    features: [N, D] normal features, or [N, ..., D] (rows of the last axis, grouped by
      the first: e.g. the patches of N images).
    objective: an objective (objectives.py); default LooLogLikelihood().
    optimizer: an optax GradientTransformation; default optax.adam(0.05).
    steps: optimizer steps.
    key: PRNG key (folds, minibatches); default jax.random.key(0).
    groups: [rows] group of each row, overriding the grouping by the first axis.
    trainable: the fields to learn (default: the kernel class's `trainable`).

  Returns:
    (the fitted kernel, losses [steps] float32: the objective before each step).

  Raises:
    ValueError: a bad argument, or parameters that became NaN/Inf (lower the learning
      rate).
  """
  names = _check(kernel, steps, trainable)
  key = jax.random.key(0) if key is None else key
  setup_key, run_key = jax.random.split(key)
  loss_fn, data = _setup(kernel, features, objective, groups, setup_key)
  optimizer = optax.adam(0.05) if optimizer is None else optimizer

  @jax.jit
  def run(params, kernel, data, keys):
    def step(carry, step_key):
      p, state = carry
      loss, grads = jax.value_and_grad(
          lambda p: loss_fn(kernel.replace(**p), data, step_key))(p)
      updates, state = optimizer.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), loss

    (p, _), losses = lax.scan(step, (params, optimizer.init(params)), keys)
    return p, losses

  params = {n: getattr(kernel, n) for n in names}
  params, losses = run(params, kernel, data, jax.random.split(run_key, int(steps)))
  fitted = kernel.replace(**params)
  if not base.leaves_finite(fitted):
    raise ValueError(f"kernels.fit diverged: {kernel.name!r} has NaN/Inf parameters after "
                     f"{steps} steps (losses {np.asarray(losses)[-3:]}); lower the "
                     "learning rate")
  return fitted, losses


def evaluate(kernel: Any, features: Any, *, objective: Any = None, key: Array | None = None,
             groups: Any = None) -> float:
  """The objective's loss of `kernel` on features (as fit would see it at step 0, with
  the same key: e.g. for a grid search of the same objective)."""
  key = jax.random.key(0) if key is None else key
  setup_key, run_key = jax.random.split(key)
  loss_fn, data = _setup(kernel, features, objective, groups, setup_key)
  return float(jax.jit(loss_fn)(kernel, data, jax.random.split(run_key, 1)[0]))
