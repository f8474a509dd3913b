"""torchvision ResNet / Wide-ResNet (V1.5) as a frozen Flax Linen feature extractor.

Linen rather than NNX: a backbone here is pure inference. With Linen the
variables are a plain dict pytree and `module.apply(variables, images)` is
already a pure function that can be jitted, vmapped or sharded as is; NNX would
add mutable object state that a frozen, never-trained extractor does not need.

Layout is NHWC; BatchNorm always uses running statistics (eps 1e-5); every conv
and the max-pool use torch's explicit symmetric padding (see layers.py). V1.5:
in a bottleneck the stride sits on the 3x3 conv, as in torchvision.

Submodule names mirror torchvision's state-dict keys with '.' -> '_' before an
index ('layer1.0.downsample.1' -> 'layer1_0/downsample_1') so the weight
converter is a name rule, not a table.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax

from spade_jax.features.backbones import layers

_BN_EPS = 1e-5


class BasicBlock(nn.Module):
  """Two 3x3 convs (resnet18/34). expansion = 1."""
  planes: int
  stride: int = 1
  downsample: bool = False
  width: int = 0  # Unused; keeps the block signature uniform.

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad3 = layers.symmetric_padding(3)
    y = layers.conv(self.planes, 3, self.stride, pad3, "conv1")(x)
    y = nn.relu(layers.batch_norm(_BN_EPS, "bn1")(y))
    y = layers.conv(self.planes, 3, 1, pad3, "conv2")(y)
    y = layers.batch_norm(_BN_EPS, "bn2")(y)
    if self.downsample:
      x = layers.conv(self.planes, 1, self.stride, ((0, 0), (0, 0)), "downsample_0")(x)
      x = layers.batch_norm(_BN_EPS, "downsample_1")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here: V1.5) -> 1x1 (x4). `width` is the inner width."""
  planes: int
  stride: int = 1
  downsample: bool = False
  width: int = 0

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.planes * self.expansion
    no_pad = ((0, 0), (0, 0))
    y = layers.PointwiseConv(self.width, name="conv1")(x)
    y = nn.relu(layers.batch_norm(_BN_EPS, "bn1")(y))
    y = layers.conv(self.width, 3, self.stride, layers.symmetric_padding(3), "conv2")(y)
    y = nn.relu(layers.batch_norm(_BN_EPS, "bn2")(y))
    y = layers.PointwiseConv(out, name="conv3")(y)
    y = layers.batch_norm(_BN_EPS, "bn3")(y)
    if self.downsample:
      x = layers.conv(out, 1, self.stride, no_pad, "downsample_0")(x)
      x = layers.batch_norm(_BN_EPS, "downsample_1")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Generic torchvision ResNet returning named features.

  Attributes:
    stage_sizes: blocks per stage (layer1..layer4).
    block: BasicBlock or Bottleneck.
    width_per_group: 64 for ResNet, 128 for Wide-ResNet-x2.
    num_classes: classifier outputs; None builds no classifier (no 'logits').
  """
  stage_sizes: Sequence[int]
  block: type[nn.Module] = Bottleneck
  width_per_group: int = 64
  num_classes: int | None = 1000

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: [N, H, W, 3] float32 normalized -> features (see FEATURE_STRIDES).

    Returns {'stem': [N, H/2, W/2, 64] (conv1-bn-relu, before the max-pool),
    'layer1'..'layer4': strides 4, 8, 16, 32, 'pool': [N, C4] global average of
    layer4, 'logits': [N, num_classes] when there is a classifier}.
    """
    x = layers.conv(64, 7, 2, layers.symmetric_padding(7), "conv1")(images)
    x = nn.relu(layers.batch_norm(_BN_EPS, "bn1")(x))
    features = {"stem": x}
    x = layers.max_pool_3x3_s2(x)
    in_channels = 64
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = 64 * 2**i
      width = planes * self.width_per_group // 64
      out_channels = planes * self.block.expansion
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = self.block(planes=planes, stride=stride, width=width,
                       downsample=(j == 0 and (stride != 1 or in_channels != out_channels)),
                       name=f"layer{i + 1}_{j}")(x)
        in_channels = out_channels
      features[f"layer{i + 1}"] = x
    features["pool"] = layers.global_avg_pool(x)
    if self.num_classes is not None:
      features["logits"] = nn.Dense(self.num_classes, name="fc")(features["pool"])
    return features


FEATURE_STRIDES = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def feature_channels(module: ResNet) -> dict[str, int]:
  """Channels of each feature of `module`."""
  exp = module.block.expansion
  channels = {"stem": 64, **{f"layer{i + 1}": 64 * 2**i * exp for i in range(4)}}
  channels["pool"] = channels["layer4"]
  if module.num_classes is not None:
    channels["logits"] = module.num_classes
  return channels


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3))
WideResNet50_2 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), width_per_group=128)
WideResNet101_2 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), width_per_group=128)
