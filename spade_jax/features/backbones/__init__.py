"""Frozen ImageNet backbones (Flax Linen) that return named pyramid features.

  backbone = load_backbone("wide_resnet50_2", weights="imagenet")
  feats = backbone(images)        # images: [N, H, W, 3] float32 normalized
  feats["layer2"]                 # [N, H/8, W/8, 512]

Every backbone returns 'stem', 'layer1'..'layer4' (strides 2, 4, 8, 16, 32),
'pool' ([N, C]) and, when it has a classifier, 'logits'.
"""

from spade_jax.features.backbones.backbone import Backbone, FeatureInfo
from spade_jax.features.backbones.load import (
                                     backbone_from_state_dict,
                                     load_backbone,
                                     param_count,
                                     save_weights,
)
from spade_jax.features.backbones.registry import BACKBONES, get_spec

__all__ = [
    "BACKBONES", "Backbone", "FeatureInfo", "backbone_from_state_dict", "get_spec",
    "load_backbone", "param_count", "save_weights",
]
