"""A tiny, fixed random feature pyramid with the Backbone calling convention.

`FakeBackbone()(images [N, H, W, 3] float32) -> {'layer1'..'layer4': [N, H/s, W/s, C]
(strides 4, 8, 16, 32), 'pool': [N, C4]}`: average pooling plus fixed random 1x1
projections and ReLU, in plain JAX. Local image content changes local features, which
is all the detector tests need.
"""

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.features.backbones.backbone import weights_identity

CHANNELS = {"layer1": 6, "layer2": 8, "layer3": 10, "layer4": 12}


def _avg_pool(x, s):
  n, h, w, c = x.shape
  return x.reshape(n, h // s, s, w // s, s, c).mean(axis=(2, 4))


class FakeBackbone:
  """Deterministic stand-in for spade_jax backbones (name, features, __call__)."""

  def __init__(self, name: str = "fake_pyramid", seed: int = 0):
    self.name = name
    rng = np.random.default_rng(seed)
    c_in, self.weights = 3, {}
    for level, c in CHANNELS.items():
      self.weights[level] = jnp.asarray(rng.standard_normal((c_in, c)).astype(np.float32))
      c_in = c
    self.features = {**CHANNELS, "pool": CHANNELS["layer4"]}
    # As a real Backbone's: the identity of these weights (another seed: other weights).
    self.weights_id = weights_identity(self.weights)
    self._apply = jax.jit(self._forward)

  def _forward(self, weights, images):
    out, x = {}, _avg_pool(images, 4)
    for i, level in enumerate(CHANNELS):
      if i:
        x = _avg_pool(x, 2)
      x = jax.nn.relu(x @ weights[level]) + 0.1 * x @ weights[level]
      out[level] = x
    out["pool"] = out["layer4"].mean(axis=(1, 2))
    return out

  def __call__(self, images):
    return self._apply(self.weights, images)
