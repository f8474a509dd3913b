"""`Backbone`: a frozen feature extractor = Linen module + its variables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import hashlib
import json
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """Channels and stride (w.r.t. the input; None for pooled vectors) of a feature."""
  channels: int
  stride: int | None


@functools.cache
def _compiled_apply(module: nn.Module, features: tuple[str, ...] | None):
  """One jitted apply per (module, feature subset); XLA drops unused outputs.

  A module whose class sets `cpu_image_at_a_time = True` takes the batch one image
  per step of a lax.map on CPU (the same result; lax.platform_dependent lowers only
  the branch of the platform compiled for). That is for memory-bound networks:
  XLA:CPU allocates a whole batch's activations (77 MB of temporaries for
  efficientnet_lite0 at 8 x 224^2) with mmap and page-faults them in again on every
  call, a quarter of its forward pass; one image's stay allocated between calls and
  mostly in cache. The compute-bound ResNets ran slower that way (their convolutions
  lose more on small batches than the page faults cost), so they keep the batch.
  """

  def forward(variables, images):
    out = module.apply(variables, images)
    return out if features is None else {k: out[k] for k in features}

  if not getattr(module, "cpu_image_at_a_time", False):
    return jax.jit(forward)

  def image_at_a_time(variables, images):
    out = lax.map(lambda image: forward(variables, image[None]), images)
    return jax.tree.map(lambda a: a[:, 0], out)

  def apply(variables, images):
    return lax.platform_dependent(variables, images, cpu=image_at_a_time, default=forward)

  return jax.jit(apply)


def weights_identity(variables: Any) -> str:
  """"sha256:<hex>" of a backbone's variables: every leaf's path, dtype, shape and bytes.

  The identity of the weights themselves, not of the file they came from: a torch
  checkpoint and its converted .safetensors give the same identity, another training
  run or a random init another. Index files record it (Spade / PatchCore refuse an
  index fitted with other weights).
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(json.dumps([jax.tree_util.keystr(path), value.dtype.str,
                              list(value.shape)]).encode() + b"\0")
    digest.update(value.reshape(-1).view(np.uint8))
  return f"sha256:{digest.hexdigest()}"


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A frozen backbone.

  Attributes:
    name: registry name, e.g. 'wide_resnet50_2'.
    module: the Flax Linen module (hashable; the jit cache key).
    variables: {'params': ..., 'batch_stats': ...} pytree.
    features: name -> FeatureInfo for every feature the module returns.
    weights_id: weights_identity(variables) ("sha256:<hex>"), computed on first use;
      fitted indexes record it, and scoring refuses an index of other weights.
  """
  name: str
  module: nn.Module
  variables: Any
  features: Mapping[str, FeatureInfo]

  @functools.cached_property
  def weights_id(self) -> str:
    """weights_identity(self.variables), computed once."""
    return weights_identity(self.variables)

  def apply(self, variables: Any, images: jax.Array) -> dict[str, jax.Array]:
    """The pure function: images [N, H, W, 3] float32 -> {feature: array}.

    Not jitted and not validated, so it composes with jit / vmap / grad.
    Spatial features are [N, ceil-ish(H / stride), ..., C]; 'pool' is [N, C];
    'logits' is [N, num_classes].
    """
    return self.module.apply(variables, images)

  def __call__(self, images: jax.Array | np.ndarray,
               features: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """Validated, jit-compiled forward pass.

    Args:
      images: [N, H, W, 3] float32, normalized (see spade_jax.features.preprocessing).
      features: optional subset of `self.features` to return.

    Returns:
      {feature name: array}; spatial ones are [N, h, w, C], 'pool' [N, C].
    """
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
      raise ValueError(f"images must be an array, got {type(images).__name__}")
    if len(shape) != 4:
      raise ValueError(f"images must have rank 4 [N, H, W, 3] (NHWC), got shape {tuple(shape)}")
    if shape[-1] != 3:
      raise ValueError(f"images must have 3 channels last (NHWC), got shape {tuple(shape)}")
    if np.dtype(dtype) != np.float32:
      raise ValueError(f"images must be float32 (use spade_jax.preprocess), got {dtype}")
    if min(shape[:3]) < 1:
      raise ValueError(f"images must be non-empty, got shape {tuple(shape)}")
    if features is not None:
      if isinstance(features, str):
        features = (features,)
      unknown = [f for f in features if f not in self.features]
      if unknown:
        raise ValueError(f"unknown features {unknown} for {self.name}; "
                         f"available: {', '.join(self.features)}")
      features = tuple(features)
    return _compiled_apply(self.module, features)(self.variables, images)
