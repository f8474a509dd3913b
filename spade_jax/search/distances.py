"""Distance kernels: the Metric interface that the kNN search streams.

A Metric says how to compare feature vectors in the two forms the search needs:

* a *matmul form*: embeddings e_q(q) [E] and e_g(g) [E] whose inner product is a
  proxy, strictly increasing in the true distance for each fixed query. The streaming
  top-k only compares proxies, so per-query constants may be dropped. For L2,
  e_q = [-2q, 1] and e_g = [g, |g|^2] give |g|^2 - 2 q.g = d^2 - |q|^2. Folding the
  norms into the matmul makes the matmul output *be* the proxy block, so the
  selection reads it straight from memory (no elementwise pass, and no fusion that
  recomputes it with different rounding);
* an *exact* direct form (x [D], y [D]) -> distance, used to recompute the distances of
  the few selected neighbours. The matmul form cancels catastrophically for
  near-duplicate points (|q|^2 + |g|^2 - 2 q.g with all three terms ~1e4 loses ~1e-3
  absolute), so the reported distances never come from it.

A fixed distance is a new Metric: write `prepare`, `embed_queries`, `embed_gallery`,
`finalize`, `exact` and call `register_metric` (optionally `gallery_extra`, when the
gallery embedding is the rows plus a few extra columns, as for L2). A distance with
parameters (learnable, or fitted from data) is a kernel (kernels/base.py): the same
forms, as methods of a pytree whose parameters are traced jit arguments. The search
takes either (`get_metric`); a Metric is a pytree without leaves, so both travel as
ordinary jit arguments. Everything here is written for plain arrays and is traced
inside the callers' jit; nothing here calls jit itself.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp

from spade_jax.search import matmul
from spade_jax.search.kernels import base

Array = jax.Array

# Smallest norm used when unit-normalising for the cosine distance; a zero vector is
# then at cosine distance 1 from everything instead of NaN.
_COSINE_EPS = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class Metric:
  """A distance between feature vectors, in the forms the streaming kNN needs.

  Instances are hashable by identity, so a Metric can be a static jit argument.

  Attributes:
    name: registry name.
    prepare: rows [N, D] -> [N, D'], applied once to queries and gallery before the
      search (identity for L2, unit-normalisation for cosine). The other functions
      all see prepared rows.
    embed_queries: prepared queries [Q, D'] -> [Q, E] (computed once per search).
    embed_gallery: prepared gallery rows [C, D'] -> [C, E] (computed per chunk, so it
      should be cheap next to the matmul). embed_queries(q) @ embed_gallery(g).T is the
      proxy [Q, C]: strictly increasing in the true distance along each query row
      (equal distances give equal proxies).
    finalize: (proxy [Q, k], prepared queries [Q, D']) -> distances [Q, k]; turns a
      proxy into an (approximate) distance, e.g. add |q|^2, clamp at 0, sqrt.
    exact: (x [D'], y [D']) -> scalar distance, computed directly (no cancellation).
    gallery_extra: optional. prepared rows [C, D'] -> [C, X] such that
      embed_gallery(g) == concatenate([g, gallery_extra(g)], -1): the gallery embedding
      is the prepared rows plus X extra columns (X may be 0). Then the CPU kernel
      (cpu_kernel.py) reads the rows in place instead of materialising embeddings.
      None (the default) is always correct: embed_gallery is then used as it is.
    prepare_is_identity: True if prepare(x) is x.astype(float32). With gallery_extra,
      this lets the CPU kernel search a float32 memory bank without copying it.
    translation_invariant: True if the distance of (x - c, y - c) is that of (x, y)
      for every c (L2, sqeuclidean). The search then embeds prepared rows minus a
      center near the queries (neighbors.search_center), so the matmul form keeps its
      precision on features with a large common offset, where |g|^2 - 2 q.g cancels.
  """
  name: str
  prepare: Callable[[Array], Array]
  embed_queries: Callable[[Array], Array]
  embed_gallery: Callable[[Array], Array]
  finalize: Callable[[Array, Array], Array]
  exact: Callable[[Array, Array], Array]
  gallery_extra: Callable[[Array], Array] | None = None
  prepare_is_identity: bool = False
  translation_invariant: bool = False

  def pairwise(self, query_embeddings: Array, gallery_embeddings: Array) -> Array:
    """[Q, E] x [C, E] -> proxy [Q, C] float32 (one matmul)."""
    return matmul.dot_t(query_embeddings, gallery_embeddings)

  def __repr__(self) -> str:
    return f"Metric({self.name!r})"


# A Metric is a pytree without leaves (itself the static part, hashed by identity), so
# the search passes a Metric and a kernel alike as a jit argument.
jax.tree_util.register_static(Metric)


def _identity(x: Array) -> Array:
  return x.astype(jnp.float32)


def _squared_norms(x: Array) -> Array:
  """[N, D] -> [N, 1]."""
  x = x.astype(jnp.float32)
  return jnp.sum(x * x, axis=-1, keepdims=True)


def _l2_embed_queries(q: Array) -> Array:
  """[-2q, 1]: the matmul adds the gallery norm column once. (-2 is exact.)"""
  q = q.astype(jnp.float32)
  return jnp.concatenate([-2.0 * q, jnp.ones(q.shape[:-1] + (1,), jnp.float32)], axis=-1)


def _l2_embed_gallery(g: Array) -> Array:
  """[g, |g|^2], so that e_q . e_g = |g|^2 - 2 q.g = |q - g|^2 - |q|^2."""
  g = g.astype(jnp.float32)
  return jnp.concatenate([g, _squared_norms(g)], axis=-1)


def _no_extra(g: Array) -> Array:
  """[N, D] -> [N, 0]: the embedding is the rows themselves."""
  return jnp.zeros(g.shape[:-1] + (0,), jnp.float32)


def _sqeuclidean_finalize(proxy: Array, q: Array) -> Array:
  # Rounding can push a true 0 below zero; a squared distance never is.
  return jnp.maximum(proxy + _squared_norms(q), 0.0)


def _l2_finalize(proxy: Array, q: Array) -> Array:
  return jnp.sqrt(_sqeuclidean_finalize(proxy, q))


def _sqeuclidean_exact(x: Array, y: Array) -> Array:
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)
  return jnp.sum(diff * diff, axis=-1)


def _l2_exact(x: Array, y: Array) -> Array:
  # safe_sqrt: sqrt's value, but gradient 0 instead of NaN at distance 0.
  return base.safe_sqrt(_sqeuclidean_exact(x, y))


def _unit_rows(x: Array) -> Array:
  """[N, D] -> rows scaled to unit L2 norm (zero rows stay zero)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _COSINE_EPS)


def _negate(x: Array) -> Array:
  return -x.astype(jnp.float32)


def _cosine_finalize(proxy: Array, q: Array) -> Array:
  """proxy = -cos(q, g) on unit rows; cosine distance = 1 - cos."""
  del q
  return jnp.clip(1.0 + proxy, 0.0, 2.0)


def _cosine_exact(x: Array, y: Array) -> Array:
  # 1 - x.y == |x - y|^2 / 2 for unit rows; the difference form keeps the precision of
  # near-duplicates (1 - x.y cancels). A zero row is at distance 1 from everything,
  # as in the matmul form (its unit row is 0, so cos = 0).
  x_zero = jnp.all(x == 0)
  y_zero = jnp.all(y == 0)
  half_sq = 0.5 * _sqeuclidean_exact(x, y)
  return jnp.where(x_zero | y_zero, 1.0, half_sq)


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric, *, overwrite: bool = False) -> Metric:
  """Adds `metric` to METRICS under metric.name and returns it.

  Raises:
    ValueError: if the name is taken and overwrite is False.
  """
  if not isinstance(metric, Metric):
    raise ValueError(f"metric must be a spade_jax.Metric, got {type(metric).__name__}")
  if metric.name in METRICS and not overwrite:
    raise ValueError(f"metric {metric.name!r} is already registered; pass overwrite=True")
  METRICS[metric.name] = metric
  return metric


def get_metric(metric: str | Metric | base.Kernel) -> Metric | base.Kernel:
  """Resolves a registry name (or passes a Metric or a kernel through).

  Raises:
    ValueError: unknown name.
  """
  if isinstance(metric, (Metric, base.Kernel)):
    return metric
  if isinstance(metric, str) and metric in METRICS:
    return METRICS[metric]
  if isinstance(metric, str) and metric in base.KERNELS:
    raise ValueError(
        f"metric {metric!r} is a kernel with parameters: pass the kernel itself, e.g. "
        f"spade_jax.kernels.from_features({metric!r}, train_features)")
  raise ValueError(f"metric must be one of {sorted(METRICS)}, a Metric or a kernel "
                   f"(spade_jax.kernels), got {metric!r}")


def pairwise_distances(queries: Array, gallery: Array,
                       metric: str | Metric | base.Kernel = "l2") -> Array:
  """All distances via the matmul form (materialises [Q, M]; for small problems, tests).

  Args:
    queries: [Q, D] float.
    gallery: [M, D] float.
    metric: name, Metric or kernel.

  Returns:
    [Q, M] float32 distances (matmul precision, see module docstring).
  """
  m = get_metric(metric)
  q = m.prepare(jnp.asarray(queries, jnp.float32))
  g = m.prepare(jnp.asarray(gallery, jnp.float32))
  if m.translation_invariant:
    center = jnp.mean(q, axis=0)
    q, g = q - center, g - center
  return m.finalize(m.pairwise(m.embed_queries(q), m.embed_gallery(g)), q)


L2 = register_metric(Metric("l2", _identity, _l2_embed_queries, _l2_embed_gallery,
                            _l2_finalize, _l2_exact, gallery_extra=_squared_norms,
                            prepare_is_identity=True, translation_invariant=True))
SQEUCLIDEAN = register_metric(Metric("sqeuclidean", _identity, _l2_embed_queries,
                                     _l2_embed_gallery, _sqeuclidean_finalize,
                                     _sqeuclidean_exact, gallery_extra=_squared_norms,
                                     prepare_is_identity=True, translation_invariant=True))
COSINE = register_metric(Metric("cosine", _unit_rows, _negate, _identity, _cosine_finalize,
                                _cosine_exact, gallery_extra=_no_extra))
