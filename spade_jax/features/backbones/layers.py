"""Conv / BatchNorm / pooling building blocks with PyTorch padding semantics.

Flax's 'SAME' padding is TensorFlow's: on a stride-2 layer with an even input it
pads (k//2 - 1, k//2), e.g. (2, 3) for the 7x7/s2 ResNet stem where PyTorch pads
(3, 3). Converted torchvision weights then see shifted inputs and give different
features, so ResNet layers use explicit symmetric padding. EfficientNet-Lite's
reference (lukemelas) on the other hand *does* pad like TensorFlow, so it gets
`tf_same_padding`, computed from the static input size.

Depthwise and 1x1 convolutions are not `nn.Conv` here, for speed on CPU (issue 20,
BENCHMARKS.md "Backbone throughput"): XLA:CPU runs a grouped convolution with one
group per channel at a few GFLOP/s, about 10-30x slower than the same sum written as
k * k shifted multiply-adds over the channels-last array, which XLA fuses into one
loop; a 1x1 convolution is a matrix product, and as one it reaches XLA's fast dot
path directly. Both keep nn.Conv's parameter ('kernel', same shape and init), so the
variables, the converted checkpoints and Backbone.weights_id are unchanged.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax import lax
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


def depthwise_conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int,
                        padding: Padding) -> jax.Array:
  """A depthwise (one group per channel) convolution as k * k shifted multiply-adds.

  Args:
    x: [N, H, W, C] float32.
    kernel: [k, k, 1, C], nn.Conv's layout for feature_group_count == C.
    stride: the same on both spatial axes.
    padding: ((top, bottom), (left, right)) zeros.

  Returns:
    [N, Ho, Wo, C], Ho = (H + top + bottom - k) // stride + 1 (likewise Wo): the same
    sum as lax.conv_general_dilated, in another order (equal within float32 rounding).
  """
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  n, hp, wp, c = xp.shape
  ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
  out = None
  for i in range(k):
    for j in range(k):
      end = (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c)
      tap = lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """nn.Conv(features, (k, k), feature_group_count=features, use_bias=False), computed by
  depthwise_conv_nhwc. Same parameter: 'kernel' [k, k, 1, features]."""
  features: int
  kernel_size: int
  stride: int
  padding: Padding

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, features] -> [N, Ho, Wo, features]."""
    kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, 1,
                                              self.features))
    return depthwise_conv_nhwc(x, kernel, self.stride, self.padding)


class PointwiseConv(nn.Module):
  """nn.Conv(features, (1, 1), use_bias=False) as a matrix product over the channels.

  Same parameter: 'kernel' [1, 1, C_in, features].
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C_in] -> [N, H, W, features]."""
    kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features))
    return lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def batch_norm(epsilon: float, name: str) -> nn.BatchNorm:
  """Inference-mode BatchNorm: (x - running_mean) / sqrt(running_var + eps)."""
  return nn.BatchNorm(use_running_average=True, epsilon=epsilon, name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(3, stride=2, padding=1): the padding is -inf, never a max."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, C]."""
  return jnp.mean(x, axis=(1, 2))
