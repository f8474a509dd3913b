"""The last, shorter batch is padded to the batch size (one compiled shape per run), and
the padding never reaches a result: every detector's features equal one big batch's."""

import dataclasses

import jax
import numpy as np
import pytest
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax.detector import common

CONFIGS = {
    "spade": (spade_jax.Spade, spade_jax.SpadeConfig(
        k_images=2, resize=72, crop=64, batch_size=3, layers=("layer1", "layer2"))),
    "patchcore": (spade_jax.PatchCore, spade_jax.PatchCoreConfig(
        layers=("layer1", "layer2"), resize=72, crop=64, batch_size=3, projection_dim=8)),
    "padim": (spade_jax.Padim, spade_jax.PadimConfig(
        resize=64, crop=64, batch_size=3, num_features=8)),
}


class ShapeRecorder(FakeBackbone):
  """FakeBackbone that records the batch size of every call."""

  def __init__(self):
    super().__init__()
    self.batch_sizes = []

  def __call__(self, images):
    self.batch_sizes.append(int(images.shape[0]))
    return super().__call__(images)


def _images(n: int) -> np.ndarray:
  rng = np.random.default_rng(n)
  return rng.integers(0, 256, (n, 80, 80, 3), dtype=np.uint8)


def test_pad_batch_and_unpad():
  batch = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
  padded, count = common.pad_batch(batch, 5, total=7)
  assert count == 2 and padded.shape == (5, 3)
  np.testing.assert_array_equal(padded[:2], batch)
  np.testing.assert_array_equal(padded[2:], np.repeat(batch[-1:], 3, axis=0))
  out = common.unpad({"a": padded, "b": padded[:, 0]}, count)
  np.testing.assert_array_equal(out["a"], batch)
  np.testing.assert_array_equal(out["b"], batch[:, 0])
  # A run of one batch keeps its shape; a full batch is untouched.
  assert common.pad_batch(batch, 5, total=2)[0].shape == (2, 3)
  assert common.pad_batch(batch, 2, total=7)[0] is batch


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_one_batch_shape_and_features_equal_one_big_batch(method):
  cls, config = CONFIGS[method]
  images = _images(7)  # Batches of 3, 3 and 1 (padded to 3).
  backbone = ShapeRecorder()
  features = cls(backbone, config).extract(images)
  assert backbone.batch_sizes == [3, 3, 3]
  whole = cls(FakeBackbone(), dataclasses.replace(config, batch_size=7)).extract(images)
  got, want = jax.tree.leaves(features), jax.tree.leaves(whole)
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert g.shape == w.shape  # The padding rows are gone.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # A single short batch is not padded.
  small = ShapeRecorder()
  cls(small, config).extract(images[:2])
  assert small.batch_sizes == [2]
