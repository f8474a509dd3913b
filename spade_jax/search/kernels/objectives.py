"""What kernels.fit maximises, from normal features only.

An objective is set up once on the host (`setup(kernel, features, groups=, key=)`,
which draws folds, refits statistics and returns a pure loss with its data), then the
loss runs inside fit's jitted loop:

* `LooLogLikelihood`: likelihood cross-validation (Habbema et al.; Duin 1976), the
  classic bandwidth rule extended to a metric's parameters. Each held-out feature x_i
  is scored by the kNN-truncated kernel density of the rest,

      log p(x_i) = log (1 / n_rest) sum_{j in kNN(x_i)} K(x_i, x_j),

  K the kernel's normalised density (Kernel.log_kernel). Its normaliser (a log-det
  term: -log det(h Sigma^{1/2}) for Mahalanobis, -D log h for the RBF) is what keeps
  the fit from collapsing: shrinking all distances to 0 costs log-det. Held out means
  held out: with folds=None each row is scored against all others (leave-one-out);
  with `folds`, whole folds (of rows, or of groups, e.g. the patches of one image) are
  held out, and a kernel's data statistics (Kernel.statistics, e.g. Mahalanobis'
  covariance) are re-estimated on the rest. A covariance estimated from the held-out
  rows themselves would let N < D training features be fitted infinitely well: the
  directions they do not span cost nothing. Kernels with statistics therefore need
  folds.
* `SyntheticAUROC`: synthetic anomalies made from the training images themselves
  (cut-paste, noise / texture blends: spade_jax.data.synthetic) against held-out
  normal images, both scored by SPADE's image score (mean distance to the k nearest
  normal features), through a differentiable AUROC: the mean over (anomaly, normal)
  pairs of sigmoid((s_a - s_n) / (t * std(s))). Dividing by the scores' spread makes it
  invariant to the scale of the distances. The caller computes the anomalies'
  features; `sources` names the training row each came from, which is never its
  neighbour (it holds the same image).

Both neighbour searches are the library's (neighbors.local_knn with the kernel's traced
parameters): indices are constants, distances and kernel values are recomputed from
the live parameters, so gradients are exact at the chosen neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
import numpy as np

from spade_jax.search import neighbors

Array = jax.Array
LossFn = Callable[[Any, Any, Array], Array]  # (kernel, data, key) -> scalar loss.


def _rows(features, name: str) -> tuple[np.ndarray, np.ndarray]:
  """[N, ..., D] -> ([R, D] float32 rows, [R] int32 group = index along axis 0)."""
  x = np.asarray(features, np.float32)
  if x.ndim < 2 or x.shape[0] < 2:
    raise ValueError(f"{name} must be [N, D] or [N, ..., D] with N >= 2, got shape "
                     f"{x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} contains NaN or Inf")
  groups = np.repeat(np.arange(x.shape[0], dtype=np.int32), int(np.prod(x.shape[1:-1])))
  return x.reshape(-1, x.shape[-1]), groups


def _check_int(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Folds:
  """Held-out folds of rows. fold_of_row [R]: the fold holding the row out (-1: never
  held out); members [F, m]: the rows of each fold (every fold has m rows)."""
  fold_of_row: np.ndarray
  members: np.ndarray


def make_folds(groups: np.ndarray, folds: int, key: Array) -> Folds:
  """Random folds of equal size over the groups (the remainder groups are never held
  out, so every rest has the same number of rows when groups are equal-sized).

  Raises:
    ValueError: folds outside [2, number of groups], or groups of unequal size.
  """
  names, counts = np.unique(groups, return_counts=True)
  if len(set(counts.tolist())) != 1:
    raise ValueError("cross-fitting needs groups of equal size")
  if not 2 <= folds <= len(names):
    raise ValueError(f"folds must be in [2, {len(names)}] (the number of groups), got {folds}")
  order = names[np.asarray(jax.random.permutation(key, len(names)))]
  per_fold = len(names) // folds
  fold_of_group = np.full(int(names.max()) + 1, -1, np.int32)
  for f in range(folds):
    fold_of_group[order[f * per_fold:(f + 1) * per_fold]] = f
  fold_of_row = fold_of_group[groups]
  members = np.stack([np.nonzero(fold_of_row == f)[0] for f in range(folds)]).astype(np.int32)
  return Folds(fold_of_row=fold_of_row, members=members)


def fold_statistics(kernel: Any, x: np.ndarray, folds: Folds) -> dict[str, Array] | None:
  """Each fold's kernel statistics estimated without its rows, stacked [F, ...]; None
  for a kernel without statistics."""
  if not kernel.statistics:
    return None
  fitted = [kernel.refit(x[folds.fold_of_row != f]) for f in range(folds.members.shape[0])]
  return {name: jnp.stack([getattr(k, name) for k in fitted]) for name in kernel.statistics}


def fold_kernel(kernel: Any, stats: dict[str, Array] | None, f: Array | int) -> Any:
  """`kernel` with fold f's statistics (traced f)."""
  if stats is None:
    return kernel
  return kernel.replace(**{name: value[f] for name, value in stats.items()})


def _pair_values(fn: Callable[[Array, Array], Array], q: Array, rows: Array) -> Array:
  """fn of each query [Q, E] with each of its rows [Q, k, E] -> [Q, k]."""
  return jax.vmap(jax.vmap(fn, (None, 0)), (0, 0))(q, rows)


def _search(kernel: Any, queries: Array, x: Array, k: int, valid: Array | None = None
            ) -> Array:
  """[Q, k] indices of the k nearest rows of x (valid ones), under the kernel."""
  chunk, block = neighbors.default_blocks(queries.shape[0], x.shape[0])
  _, idx = neighbors.local_knn(queries, x, k, kernel, chunk, valid=valid, query_block=block)
  return jnp.maximum(idx, 0)


def _check_density(kernel: Any) -> None:
  try:
    probe = jnp.zeros((1, kernel.input_dim or 1), jnp.float32)
    jax.eval_shape(lambda k: k.log_kernel(k.prepare(probe)[0], k.prepare(probe)[0]), kernel)
  except NotImplementedError as e:
    raise ValueError(f"LooLogLikelihood needs a kernel with a normalised density; {e}") from e


@dataclasses.dataclass(frozen=True)
class LooLogLikelihood:
  """Mean held-out log-likelihood under the kNN-truncated kernel density of the rest.

  Attributes:
    k: neighbours in the truncated density (at most the rest's rows; None: all of
      them, the full kernel density). A small k biases the fit toward narrow kernels:
      the mass beyond the k-th neighbour is dropped.
    folds: None: leave-one-out (each row against all others); F: F folds of groups
      held out in turn (needed for kernels with statistics, and for features of
      several rows per image, whose other rows are not independent of it).
    batch_size: held-out rows per step; when every fold (or, leave-one-out, the data)
      fits, every row is scored every step (an exact, deterministic objective),
      otherwise one random fold and batch_size random rows of it (stochastic).
  """
  k: int | None = 50
  folds: int | None = None
  batch_size: int = 512

  def setup(self, kernel: Any, features: Any, *, groups: Any = None,
            key: Array) -> tuple[LossFn, dict[str, Any]]:
    if self.k is not None:
      _check_int("k", self.k, 1)
    _check_int("batch_size", self.batch_size, 1)
    _check_density(kernel)
    x, row_groups = _rows(features, "features")
    if groups is not None:
      row_groups = np.asarray(groups).reshape(-1)
      if row_groups.shape[0] != x.shape[0]:
        raise ValueError(f"groups must have one entry per row ({x.shape[0]}), got "
                         f"{row_groups.shape[0]}")
    several = len(np.unique(row_groups)) < x.shape[0]
    if self.folds is None:
      if kernel.statistics:
        raise ValueError(f"kernel {kernel.name!r} has statistics of the data "
                         f"{kernel.statistics}: use LooLogLikelihood(folds=...), so that "
                         "they are estimated without the held-out features")
      if several:
        raise ValueError("features hold several rows per image (or groups were given): "
                         "use LooLogLikelihood(folds=...) to hold out whole images")
      return self._loo_loss(x.shape[0], self._k(x.shape[0] - 1)), {"x": jnp.asarray(x)}
    _check_int("folds", self.folds, 2)
    folds = make_folds(row_groups, self.folds, key)
    rest = int(np.sum(folds.fold_of_row != 0))
    data = {"x": jnp.asarray(x), "fold_of_row": jnp.asarray(folds.fold_of_row),
            "members": jnp.asarray(folds.members),
            "stats": fold_statistics(kernel, x, folds)}
    return self._fold_loss(folds.members.shape, rest, self._k(rest)), data

  def _k(self, rest: int) -> int:
    return rest if self.k is None else min(self.k, rest)

  def _log_density(self, kernel: Any, x: Array, queries: Array, idx: Array,
                   keep: Array | None, rest: int) -> Array:
    """[Q] log (1 / rest) sum_{kept j} K(q, x_idx[j]) from the live kernel."""
    q = kernel.prepare(queries)
    rows = neighbors.prepare_rows(kernel, x[idx])
    log_k = _pair_values(kernel.log_kernel, q, rows)
    if keep is not None:
      log_k = jnp.where(keep, log_k, -jnp.inf)
    return logsumexp(log_k, axis=1) - jnp.log(float(rest))

  def _loo_loss(self, num: int, k: int) -> LossFn:
    batch = self.batch_size

    def loss(kernel, data, key):
      x = data["x"]
      rows = (jnp.arange(num) if batch >= num
              else jax.random.randint(key, (batch,), 0, num))
      idx = _search(kernel, x[rows], x, min(k + 1, num))
      keep = idx != rows[:, None]  # Not the row itself...
      keep &= jnp.cumsum(keep, axis=1) <= k  # ... and k of the others.
      return -jnp.mean(self._log_density(kernel, x, x[rows], idx, keep, num - 1))

    return loss

  def _fold_loss(self, members_shape: tuple[int, int], rest: int, k: int) -> LossFn:
    num_folds, per_fold = members_shape
    batch = self.batch_size

    def one_fold(kernel, data, f, rows):
      kf = fold_kernel(kernel, data["stats"], f)
      x = data["x"]
      idx = _search(kf, x[rows], x, k, valid=data["fold_of_row"] != f)
      return self._log_density(kf, x, x[rows], idx, None, rest)

    def loss(kernel, data, key):
      if per_fold <= batch:  # Every held-out row of every fold (equal sizes): exact.
        return -jnp.mean(jnp.stack([one_fold(kernel, data, f, data["members"][f])
                                    for f in range(num_folds)]))
      key_f, key_rows = jax.random.split(key)
      f = jax.random.randint(key_f, (), 0, num_folds)
      rows = data["members"][f][jax.random.randint(key_rows, (batch,), 0, per_fold)]
      return -jnp.mean(one_fold(kernel, data, f, rows))

    return loss


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticAUROC:
  """Minus a differentiable AUROC of synthetic anomalies against held-out normals.

  Attributes:
    anomalies: [A, D] features of synthetic anomalies made from the training images
      (spade_jax.data.synthetic), computed by the caller like the normal ones.
    sources: [A] int, the training row each anomaly was made from (excluded from its
      neighbours); required with folds.
    k: neighbours of the image score (mean distance to the k nearest normal features).
    temperature: t of sigmoid((s_a - s_n) / (t * std(s))); smaller is closer to the
      AUROC's step, with flatter gradients away from ties.
    folds: None: each normal row scored against all other normals; F: folds of
      normal rows held out in turn, statistics re-estimated on the rest, anomalies
      scored in the fold of their source.
  """
  anomalies: Any
  sources: Any = None
  k: int = 5
  temperature: float = 0.1
  folds: int | None = None

  def setup(self, kernel: Any, features: Any, *, groups: Any = None,
            key: Array) -> tuple[LossFn, dict[str, Any]]:
    _check_int("k", self.k, 1)
    if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
      raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
    if groups is not None:
      raise ValueError("SyntheticAUROC scores images: pass features [N, D], no groups")
    x, _ = _rows(features, "features")
    a = np.asarray(self.anomalies, np.float32)
    if a.ndim != 2 or a.shape[1] != x.shape[1] or a.shape[0] < 1:
      raise ValueError(f"anomalies must be [A, {x.shape[1]}], got shape {a.shape}")
    if not np.isfinite(a).all():
      raise ValueError("anomalies contain NaN or Inf")
    n = x.shape[0]
    sources = None if self.sources is None else np.asarray(self.sources).reshape(-1)
    if sources is not None and (sources.shape[0] != a.shape[0] or sources.min() < 0
                                or sources.max() >= n):
      raise ValueError(f"sources must be [A={a.shape[0]}] rows in [0, {n})")
    if self.folds is None:
      if kernel.statistics:
        raise ValueError(f"kernel {kernel.name!r} has statistics of the data: use "
                         "SyntheticAUROC(folds=..., sources=...)")
      if not 1 <= self.k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}], got {self.k}")
      data = {"x": jnp.asarray(x), "a": jnp.asarray(a),
              "sources": jnp.asarray(-1 if sources is None else sources, jnp.int32)
              * jnp.ones(a.shape[0], jnp.int32)}
      return self._loo_loss(), data
    if sources is None:
      raise ValueError("SyntheticAUROC(folds=...) needs the anomalies' sources")
    _check_int("folds", self.folds, 2)
    folds = make_folds(np.arange(n), self.folds, key)
    rest = int(np.sum(folds.fold_of_row != 0))
    if not 1 <= self.k <= rest:
      raise ValueError(f"k must be in [1, {rest}], got {self.k}")
    fold_of_anomaly = folds.fold_of_row[sources]
    data = {"x": jnp.asarray(x), "a": jnp.asarray(a), "fold_of_row": folds.fold_of_row,
            "members": folds.members, "stats": fold_statistics(kernel, x, folds)}
    groups_a = [np.nonzero(fold_of_anomaly == f)[0] for f in range(self.folds)]
    return self._fold_loss(groups_a), data

  def _auroc_loss(self, normal: Array, anomalous: Array) -> Array:
    spread = jnp.std(jnp.concatenate([normal, anomalous])) + 1e-12
    diff = (anomalous[:, None] - normal[None, :]) / (self.temperature * spread)
    return -jnp.mean(jax.nn.sigmoid(diff))

  def _score(self, kernel: Any, x: Array, queries: Array, idx: Array,
             keep: Array | None) -> Array:
    """Mean exact distance to the kept neighbours (live kernel)."""
    q = kernel.prepare(queries)
    d = _pair_values(kernel.exact, q, neighbors.prepare_rows(kernel, x[idx]))
    if keep is None:
      return jnp.mean(d, axis=1)
    return jnp.sum(jnp.where(keep, d, 0.0), axis=1) / self.k

  def _loo_loss(self) -> LossFn:
    k = self.k

    def without(idx, exclude):
      keep = idx != exclude[:, None]
      return keep & (jnp.cumsum(keep, axis=1) <= k)

    def loss(kernel, data, key):
      del key
      x, a = data["x"], data["a"]
      rows = jnp.arange(x.shape[0])
      idx_n = _search(kernel, x, x, k + 1)
      idx_a = _search(kernel, a, x, k + 1)
      normal = self._score(kernel, x, x, idx_n, without(idx_n, rows))
      anomalous = self._score(kernel, x, a, idx_a, without(idx_a, data["sources"]))
      return self._auroc_loss(normal, anomalous)

    return loss

  def _fold_loss(self, anomalies_of_fold: list[np.ndarray]) -> LossFn:
    k = self.k

    def loss(kernel, data, key):
      del key
      x, a = data["x"], data["a"]
      normal, anomalous = [], []
      for f, which in enumerate(anomalies_of_fold):
        kf = fold_kernel(kernel, data["stats"], f)
        valid = data["fold_of_row"] != f
        rows = data["members"][f]
        normal.append(self._score(kf, x, x[rows], _search(kf, x[rows], x, k, valid), None))
        if which.size:
          queries = a[which]
          anomalous.append(self._score(kf, x, queries, _search(kf, queries, x, k, valid),
                                       None))
      return self._auroc_loss(jnp.concatenate(normal), jnp.concatenate(anomalous))

    return loss


OBJECTIVES = {"loo": LooLogLikelihood, "synthetic": SyntheticAUROC}
