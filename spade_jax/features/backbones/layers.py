"""Conv / BatchNorm / pooling building blocks with PyTorch padding semantics.

Flax's 'SAME' padding is TensorFlow's: on a stride-2 layer with an even input it
pads (k//2 - 1, k//2), e.g. (2, 3) for the 7x7/s2 ResNet stem where PyTorch pads
(3, 3). Converted torchvision weights then see shifted inputs and give different
features, so ResNet layers use explicit symmetric padding. EfficientNet-Lite's
reference (lukemelas) on the other hand *does* pad like TensorFlow, so it gets
`tf_same_padding`, computed from the static input size.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's init for random (untrained) weights: He normal, fan_out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

Padding = tuple[tuple[int, int], tuple[int, int]]


def symmetric_padding(kernel: int) -> Padding:
  """PyTorch `padding=kernel // 2` on both spatial axes."""
  p = kernel // 2
  return ((p, p), (p, p))


def tf_same_padding(height: int, width: int, kernel: int, stride: int) -> Padding:
  """TensorFlow 'SAME' padding for one input size (lukemelas Conv2d*SamePadding).

  Output size is ceil(size / stride); the odd pixel of padding goes after.
  """
  pads = []
  for size in (height, width):
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def conv(features: int, kernel: int, stride: int, padding: Padding, name: str,
         groups: int = 1) -> nn.Conv:
  """A bias-free conv (every conv in these nets is followed by BatchNorm)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=padding, feature_group_count=groups, use_bias=False,
                 kernel_init=conv_init, name=name)


def batch_norm(epsilon: float, name: str) -> nn.BatchNorm:
  """Inference-mode BatchNorm: (x - running_mean) / sqrt(running_var + eps)."""
  return nn.BatchNorm(use_running_average=True, epsilon=epsilon, name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(3, stride=2, padding=1): the padding is -inf, never a max."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, C]."""
  return jnp.mean(x, axis=(1, 2))
