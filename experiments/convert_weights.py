r"""Converts a torchvision / lukemelas .pth (or a converted file) to .safetensors / .npz.

The output holds the Flax variables (NHWC kernels, BN statistics) under
'params/...' and 'batch_stats/...' names, so loading it needs no torch, no
pickle and no transposes. The input is read without torch and strictly checked
against the architecture.

  python experiments/convert_weights.py --backbone=wide_resnet50_2 \
      --input=~/.cache/spade_jax/wide_resnet50_2-95faca4d.pth \
      --output=~/.cache/spade_jax/wide_resnet50_2.safetensors

  # then: spade_jax.load_backbone("wide_resnet50_2", "<output>")
"""

from absl import app, flags

import spade_jax

_INPUT = flags.DEFINE_string("input", None, "Weights to read (.pth, .safetensors, .npz) "
                             "or 'imagenet' for the standard file.", required=True)
_BACKBONE = flags.DEFINE_enum("backbone", None, list(spade_jax.BACKBONES),
                              "Architecture of the weights.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Destination, ending in .safetensors or .npz.",
                              required=True)


def main(argv):
  del argv
  backbone = spade_jax.load_backbone(_BACKBONE.value, weights=_INPUT.value)
  path = spade_jax.features.backbones.save_weights(backbone, _OUTPUT.value)
  print(f"wrote {path} ({_BACKBONE.value}; features: {', '.join(backbone.features)})")


if __name__ == "__main__":
  app.run(main)
