"""The backbone names `load_backbone` accepts and how to build each."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses

import flax.linen as nn

from spade_jax.features.backbones import efficientnet_lite, resnet


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build one architecture.

  Attributes:
    make: num_classes (None: no classifier) -> Linen module.
    channels: module -> {feature: channels}.
    strides: {spatial feature: stride}.
    torch_underscore: torch keys prefix modules with '_' (lukemelas naming).
  """
  make: Callable[..., nn.Module]
  channels: Callable[[nn.Module], Mapping[str, int]]
  strides: Mapping[str, int]
  torch_underscore: bool = False

  # Flax name of the classifier's weight; its absence means "no logits".
  classifier_kernel = "params/fc/kernel"


def _resnet(make) -> BackboneSpec:
  return BackboneSpec(make, resnet.feature_channels, resnet.FEATURE_STRIDES)


def _lite(make) -> BackboneSpec:
  return BackboneSpec(make, efficientnet_lite.feature_channels,
                      efficientnet_lite.FEATURE_STRIDES, torch_underscore=True)


SPECS: Mapping[str, BackboneSpec] = {
    "resnet18": _resnet(resnet.ResNet18),
    "resnet34": _resnet(resnet.ResNet34),
    "resnet50": _resnet(resnet.ResNet50),
    "resnet101": _resnet(resnet.ResNet101),
    "resnet152": _resnet(resnet.ResNet152),
    "wide_resnet50_2": _resnet(resnet.WideResNet50_2),
    "wide_resnet101_2": _resnet(resnet.WideResNet101_2),
    "efficientnet_lite0": _lite(efficientnet_lite.EfficientNetLite0),
    "efficientnet_lite1": _lite(efficientnet_lite.EfficientNetLite1),
    "efficientnet_lite2": _lite(efficientnet_lite.EfficientNetLite2),
    "efficientnet_lite3": _lite(efficientnet_lite.EfficientNetLite3),
    "efficientnet_lite4": _lite(efficientnet_lite.EfficientNetLite4),
}

BACKBONES: tuple[str, ...] = tuple(SPECS)


def get_spec(name: str) -> BackboneSpec:
  """Raises ValueError listing the valid names if `name` is unknown."""
  if not isinstance(name, str) or name not in SPECS:
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
  return SPECS[name]
