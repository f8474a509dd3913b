"""`load_backbone`: name + weights (None, a file, or "imagenet") -> Backbone."""

from __future__ import annotations

import os
import pathlib
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.features import checkpoint
from spade_jax.features import weights as weights_lib
from spade_jax.features.backbones import convert, registry
from spade_jax.features.backbones.backbone import Backbone, FeatureInfo

_DUMMY_SHAPE = (1, 32, 32, 3)  # Variable shapes do not depend on image size.
_FEATURE_ORDER = ("stem", "layer1", "layer2", "layer3", "layer4", "pool", "logits")


def variable_shapes(module) -> dict[str, tuple[int, ...]]:
  """{flax_name: shape} of every variable of `module`, without allocating."""
  tree = jax.eval_shape(module.init, jax.random.key(0),
                        jax.ShapeDtypeStruct(_DUMMY_SHAPE, jnp.float32))
  return {k: tuple(v.shape) for k, v in convert.flatten(tree).items()}


def param_count(name: str) -> int:
  """Parameters of backbone `name` with its 1000-class classifier, counted like
  torchvision (conv, BN scale/bias, fc; no BN running statistics)."""
  shapes = variable_shapes(registry.get_spec(name).make(num_classes=1000))
  return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("params/"))


def random_variables(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
  """torchvision-style random init on the host, one generator per variable.

  NumPy rather than `module.init`: no forward pass to trace or compile (seconds
  for the big nets), and the values depend only on (seed, variable name).
  Conv kernels He-normal (fan_out, as torchvision), classifier U(+-1/sqrt(in)),
  BatchNorm identity (scale 1, bias 0, mean 0, var 1).
  """
  flat = {}
  for name, shape in shapes.items():
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel" and len(shape) == 4:
      std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
      value = rng.standard_normal(shape, np.float32) * np.float32(std)
    elif leaf == "kernel":
      bound = 1.0 / np.sqrt(shape[0])
      value = rng.uniform(-bound, bound, shape).astype(np.float32)
    elif leaf in ("scale", "var"):
      value = np.ones(shape, np.float32)
    else:  # bias, mean
      value = np.zeros(shape, np.float32)
    flat[name] = value
  return convert.unflatten(flat)


def _module_and_variables(name: str, weights: dict[str, np.ndarray], source: str,
                          torch_layout: bool):
  """(module, NumPy variables) for a torch state dict or a converted flat dict.

  The classifier's presence and width are read from the weights, so a
  checkpoint without 'fc' gives a module without 'logits'.
  """
  spec = registry.get_spec(name)
  fc_key = (convert.torch_key(spec.classifier_kernel, spec.torch_underscore)
            if torch_layout else spec.classifier_kernel)
  fc = weights.get(fc_key)
  num_classes = None
  if fc is not None:
    # torch Linear weight is [classes, in]; a Flax kernel is [in, classes].
    num_classes = int(fc.shape[0] if torch_layout else fc.shape[-1]) if fc.ndim == 2 else 1000
  module = spec.make(num_classes=num_classes)
  expected = variable_shapes(module)
  if torch_layout:
    variables = convert.variables_from_torch(weights, expected, source, spec.torch_underscore)
  else:
    variables = convert.check_and_unflatten(weights, expected, source)
  return module, variables


def _read_weights_file(name: str, path: pathlib.Path) -> tuple[dict[str, np.ndarray], bool]:
  """Returns (arrays, torch_layout) from a torch or converted file."""
  kind = checkpoint.sniff_format(path)
  if kind in ("torch_zip", "torch_legacy"):
    return checkpoint.read_torch_state_dict(path), True
  if kind in ("safetensors", "npz"):
    arrays, meta = checkpoint.load_converted(path)
    if meta.get("backbone", name) != name:
      raise checkpoint.CheckpointError(
          f"{path} holds converted {meta['backbone']} weights, not {name}")
    return arrays, False
  raise checkpoint.CheckpointError(
      f"{path}: not a checkpoint (expected a torch .pth, .safetensors or .npz)")


def _make_backbone(name: str, module, variables) -> Backbone:
  spec = registry.get_spec(name)
  channels = spec.channels(module)
  order = [k for k in _FEATURE_ORDER if k in channels]
  features = {k: FeatureInfo(channels[k], spec.strides.get(k)) for k in order}
  variables = jax.tree.map(jnp.asarray, variables)
  return Backbone(name=name, module=module, variables=variables, features=features)


def backbone_from_state_dict(name: str, state_dict: dict[str, np.ndarray],
                             source: str = "state dict") -> Backbone:
  """A Backbone from an in-memory torch state dict {key: array (torch layout)}.

  Same strict checks as loading a file; `source` names it in errors.
  """
  module, variables = _module_and_variables(name, state_dict, source, torch_layout=True)
  return _make_backbone(name, module, variables)


def load_backbone(name: str, weights: str | os.PathLike | None = None, *,
                  seed: int = 0) -> Backbone:
  """Builds backbone `name` with the given weights.

  Args:
    name: one of spade_jax.BACKBONES.
    weights: None for a seeded random init (tests); "imagenet" for the standard
      pretrained file (torchvision V1 for ResNets, downloaded into the cache if
      absent; the packaged checkpoint for efficientnet_lite0..2); or a path to a
      torchvision / lukemelas .pth or a converted .safetensors / .npz file. A
      checkpoint without a classifier gives a backbone without 'logits'.
    seed: PRNG seed of the random init (weights=None only).

  Returns:
    A Backbone whose variables live on the default device.

  Raises:
    ValueError: unknown name; checkpoint.CheckpointError (a ValueError) for an
      unreadable / unsafe / mismatched file; FileNotFoundError when the file or
      the "imagenet" weights are unavailable.
  """
  spec = registry.get_spec(name)
  if weights is None:
    module = spec.make(num_classes=1000)
    variables: Any = random_variables(variable_shapes(module), seed)
    return _make_backbone(name, module, variables)
  if isinstance(weights, str) and weights == "imagenet":
    path = weights_lib.imagenet_weights(name)
  else:
    path = pathlib.Path(weights)
    if path.is_dir():
      raise FileNotFoundError(f"weights path {path} is a directory, not a file; expected "
                              "a torch .pth, .safetensors or .npz file")
    if not path.is_file():
      raise FileNotFoundError(f"weights file {path} does not exist")
  arrays, torch_layout = _read_weights_file(name, path)
  module, variables = _module_and_variables(name, arrays, str(path), torch_layout)
  return _make_backbone(name, module, variables)


def save_weights(backbone: Backbone, path: str | os.PathLike) -> pathlib.Path:
  """Writes `backbone.variables` as a converted .safetensors / .npz file."""
  flat = {k: np.asarray(v, np.float32) for k, v in convert.flatten(backbone.variables).items()}
  return checkpoint.save_converted(path, flat, {"backbone": backbone.name})
