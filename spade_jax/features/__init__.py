"""Stage 1, features: uint8 images -> pyramid features (and PatchCore's patch features), in
pure functions.

* preprocessing.py: resize, centre crop, ImageNet normalisation (torchvision semantics);
* backbones/: Flax ResNets and EfficientNet-Lite, `apply(variables, images)` -> the
  named pyramid {'stem', 'layer1'..'layer4', 'pool', 'logits'}; converted weights;
* checkpoint.py, checkpoint_pickle.py: reading torch checkpoints without torch and
  without running their code, with bounded time and memory;
* weights.py: the ImageNet weight files (cache, download, integrity);
* patches.py: PatchCore's locally aware patch features (p x p averaging, levels resized
  to one grid, concatenated, optionally reduced).
"""
