"""The pipeline benchmark section's rows for every method (experiments/bench/pipeline.py)
at toy sizes: each method fits and scores, and its index size is its arrays' bytes."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from spade_fake_backbone import FakeBackbone

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
from bench import pipeline  # noqa: E402  (the benchmark section itself)


@pytest.mark.parametrize("method", sorted(pipeline.METHODS))
def test_method_rows(method):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (4, 73, 73, 3), np.uint8)
  test = rng.integers(0, 256, (2, 73, 73, 3), np.uint8)
  row = pipeline._method_row(method, FakeBackbone(), train, test, k_images=2, batch_size=2,
                             resize=73, crop=64, repeats=1)
  assert row["method"] == method and row["num_train"] == 4 and row["num_test"] == 2
  assert row["fit_images_per_s"] > 0 and row["score_images_per_s"] > 0
  assert row["index_bytes"] > 0


def test_index_bytes_counts_every_array():
  tree = {"a": np.zeros((3, 4), np.float32), "b": (jax.numpy.ones(5, jax.numpy.int32),),
          "c": 1.5}
  assert pipeline.index_bytes(tree) == 3 * 4 * 4 + 5 * 4  # Python scalars: settings.
