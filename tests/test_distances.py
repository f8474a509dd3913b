"""The Metric interface: built-ins vs NumPy, and a researcher-defined metric."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as reference
import pytest

import spade_jax
from spade_jax.search import distances


@pytest.mark.parametrize("name", ["l2", "sqeuclidean", "cosine"])
def test_builtin_forms_agree_with_reference(name):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((4, 7)).astype(np.float32)
  g = rng.standard_normal((9, 7)).astype(np.float32)
  m = spade_jax.METRICS[name]
  ref = reference.distances(q, g, name)
  # Matmul form (proxy -> finalize): float32 matmul accuracy.
  np.testing.assert_allclose(distances.pairwise_distances(q, g, name), ref, atol=1e-5)
  # Direct form, one pair at a time.
  qp, gp = m.prepare(jnp.asarray(q)), m.prepare(jnp.asarray(g))
  exact = jax.vmap(jax.vmap(m.exact, (None, 0)), (0, None))(qp, gp)
  np.testing.assert_allclose(exact, ref, rtol=1e-5, atol=1e-6)
  # The proxy (one matmul of the embeddings) ranks each row like the true distance.
  proxy = m.pairwise(m.embed_queries(qp), m.embed_gallery(gp))
  np.testing.assert_array_equal(np.argsort(proxy, 1), np.argsort(ref, 1))


def test_registry_and_hashable():
  assert {"l2", "sqeuclidean", "cosine"} <= set(spade_jax.METRICS)
  m = spade_jax.METRICS["l2"]
  assert hash(m) == hash(m) and distances.get_metric(m) is m
  with pytest.raises(ValueError, match="already registered"):
    spade_jax.register_metric(dataclasses.replace(m))
  with pytest.raises(ValueError, match="must be a spade_jax.Metric"):
    spade_jax.register_metric("l2")
  with pytest.raises(ValueError, match="metric must be one of"):
    distances.get_metric("nope")


def test_new_metric_plugs_into_knn(monkeypatch):
  # A weighted (diagonal Mahalanobis) L2: a researcher only supplies `prepare`.
  monkeypatch.setattr(distances, "METRICS", dict(distances.METRICS))
  weights = jnp.asarray([1.0, 3.0, 0.5], jnp.float32)
  l2 = distances.METRICS["l2"]
  weighted = spade_jax.Metric("weighted_l2", lambda x: x * weights, l2.embed_queries,
                              l2.embed_gallery, l2.finalize, l2.exact)
  distances.register_metric(weighted)
  rng = np.random.default_rng(1)
  q = rng.standard_normal((5, 3)).astype(np.float32)
  g = rng.standard_normal((20, 3)).astype(np.float32)
  dist, idx = spade_jax.knn(q, g, 4, "weighted_l2", chunk_size=6)
  w = np.asarray(weights, np.float64)
  ref = reference.distances(q * w, g * w, "l2")
  np.testing.assert_array_equal(idx, np.argsort(ref, 1, kind="stable")[:, :4])
  np.testing.assert_allclose(dist, np.sort(ref, 1)[:, :4], rtol=1e-5)
