"""What a fitted detector becomes in a deployed artifact: its arrays and one pure function.

  program = programs.build(detector, index)
  scores, maps = program.score(program.arrays, images)   # traceable, pure

A `Program` splits a fitted detector into the values a deployment carries in a file
(`arrays`: the backbone's variables, the index's gallery, memory bank or Gaussians,
fitted kernels and bandwidths) and the computation that uses them (`score`: backbone,
search, scoring, maps), built from the detector's own scoring functions, so an export
computes what `detector.score` computes. One builder per detector class, registered
with `register_program`: a detector added later plugs in with one function.

An Ensemble (detector/ensemble.py) is the programs of its members (each built by its
own builder above) run on the same input, their outputs standardised by the index's
statistics and combined as Ensemble.score does (ensemble_program). Its members must
bring images to one input (the same resize, crop and input size).

Only the arrays are traced arguments; what stays in the function is what the
detector's config fixes (layers, k, kappa, the metric's name, PaDiM's channel subset,
PatchCore's random projection of reduction="random_projection").
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax import scoring
from spade_jax.detector import ensemble, padim, patchcore, spade
from spade_jax.features import embedding, patches
from spade_jax.scoring import anomaly_map, gaussian, memory_bank

Array = jax.Array

# ImageNet normalisation (features/preprocessing.py), applied inside the program.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Program:
  """A fitted detector as arrays + a pure scoring function.

  Attributes:
    method: "spade", "patchcore", "padim", "ensemble", ... (the index's method name).
    arrays: pytree of the arrays the function reads (jax or NumPy arrays, Python
      floats); strings in it are settings, not arrays, and stay in the function.
    score: (arrays, images [B, H, W, 3] float32, ImageNet-normalised) ->
      (image scores [B] float32, anomaly maps [B, H, W] float32); pure, traceable.
      (H, W) is the detector's input size (config.input_size).
    input_size: (H, W), the program's input and the maps' size: (crop, crop) with a
      centre crop, else image_size (features/geometry.py).
    resize: with a crop, the shorter side images are resized to before it.
    crop: the side of the centre crop, or None: the whole image resized to input_size.
    settings: the detector's config as JSON-able values (for the manifest).
  """
  method: str
  arrays: Any
  score: Callable[[Any, Array], tuple[Array, Array]]
  input_size: tuple[int, int]
  resize: int
  crop: int | None
  settings: dict[str, Any]


_BUILDERS: dict[type, tuple[str, Callable[[Any, Any], Program]]] = {}


def register_program(detector_type: type, method: str
                     ) -> Callable[[Callable[[Any, Any], Program]], Callable[[Any, Any], Program]]:
  """Decorator: `builder(detector, index) -> Program` for detectors of `detector_type`."""

  def register(builder):
    _BUILDERS[detector_type] = (method, builder)
    return builder

  return register


def build(detector: Any, index: Any) -> Program:
  """The Program of `detector` with its fitted `index`.

  Raises:
    ValueError: a detector with no registered builder, a backbone that is not a
      spade_jax Backbone (its variables must be arrays to carry), an index that does not
      fit the detector (the detector's own checks), or a sharded index; for an
      Ensemble, any of these for a member (naming it), or members whose inputs differ.
  """
  entry = _BUILDERS.get(type(detector))
  if entry is None:
    known = sorted(m for m, _ in _BUILDERS.values())
    raise ValueError(f"cannot export a {type(detector).__name__}: exportable detectors are "
                     f"{known} (register a builder with "
                     "spade_jax.deploy.programs.register_program)")
  if isinstance(detector, ensemble.Ensemble):  # Each member's backbone: build(member).
    return entry[1](detector, index)
  backbone = detector.backbone
  if not (callable(getattr(backbone, "apply", None)) and hasattr(backbone, "variables")):
    raise ValueError(f"cannot export backbone {getattr(backbone, 'name', backbone)!r}: an "
                     "export needs a spade_jax Backbone (spade_jax.load_backbone), whose "
                     "pure apply(variables, images) and variables it carries")
  return entry[1](detector, index)


def method_of(detector: Any) -> str | None:
  """The method name of a detector with a registered builder (None: not exportable)."""
  entry = _BUILDERS.get(type(detector))
  return None if entry is None else entry[0]


def normalise(images_uint8: Array) -> Array:
  """[B, H, W, 3] uint8 -> float32 (x / 255 - mean) / std, as preprocessing.preprocess."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def _config_settings(config: Any) -> dict[str, Any]:
  """A detector config's fields as JSON values (tuples as lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def _prepared(detector: Any, index: Any) -> Any:
  """`index` checked as detector.score checks it (backbone, weights, config, fits)."""
  index = detector._prepare_index(index, None, "data")  # pylint: disable=protected-access
  if index.is_sharded:
    raise ValueError("cannot export a sharded index: save it (spade_jax.save_index) and "
                     "load it without a mesh first")
  return index


def _maps(score_maps: Array, config: Any) -> Array:
  """[B, h, w] score maps -> [B, H, W] anomaly maps at the input size (upsampled,
  blurred)."""
  return anomaly_map.anomaly_maps(score_maps, tuple(config.input_size), sigma=config.sigma)


def _program(method: str, arrays: Any, score: Callable[[Any, Array], tuple[Array, Array]],
             config: Any) -> Program:
  return Program(method, arrays, score, tuple(config.input_size), config.resize, config.crop,
                 _config_settings(config))


@register_program(spade.Spade, "spade")
def spade_program(detector: spade.Spade, index: spade.SpadeIndex) -> Program:
  """SPADE: image kNN of the pooled features, pixel kNN among the K nearest images."""
  cfg = detector.config
  index = _prepared(detector, index)
  image_kwargs, pixel_kwargs = detector.scoring_kwargs(index)
  arrays = {"backbone": detector.backbone.variables, "train_pool": index.train_pool,
            "train_features": index.train_features,
            # Kernels and bandwidths (floats: carried as float32 scalars); metric names
            # are strings and stay settings.
            "image_kwargs": image_kwargs, "pixel_kwargs": pixel_kwargs}
  backbone = detector.backbone

  def score(arrays, images):
    out = backbone.apply(arrays["backbone"], images)
    scores, nbrs = scoring.image_scores(
        out["pool"].astype(jnp.float32), arrays["train_pool"], cfg.k_image_score,
        num_neighbors=cfg.k_images, **arrays["image_kwargs"])
    score_maps = scoring.pixel_scores(
        {l: out[l].astype(jnp.float32) for l in cfg.layers}, arrays["train_features"], nbrs,
        kappa=cfg.kappa, combine=cfg.combine, **arrays["pixel_kwargs"])
    return scores, _maps(score_maps, cfg)

  return _program("spade", arrays, score, cfg)


@register_program(patchcore.PatchCore, "patchcore")
def patchcore_program(detector: patchcore.PatchCore, index: patchcore.PatchCoreIndex
                      ) -> Program:
  """PatchCore: locally aware patch features scored against the memory bank (with a
  kernel metric, the index's fitted kernel: its arrays are traced arguments)."""
  cfg = detector.config
  index = _prepared(detector, index)
  arrays = {"backbone": detector.backbone.variables, "bank": index.bank}
  if cfg.is_kernel:
    arrays["kernel"] = index.kernel
  backbone = detector.backbone

  def score(arrays, images):
    out = backbone.apply(arrays["backbone"], images)
    feats = patches.patch_features({l: out[l] for l in cfg.layers}, cfg.layers,
                                   patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                   reduction=cfg.reduction, seed=cfg.reduction_seed)
    scores, score_maps = memory_bank.patchcore_scores(
        feats, arrays["bank"], k=cfg.k_nearest,
        metric=arrays["kernel"] if cfg.is_kernel else cfg.metric,
        reweight_neighbors=cfg.num_neighbors if cfg.reweight else None, topk=cfg.topk)
    return scores, _maps(score_maps, cfg)

  return _program("patchcore", arrays, score, cfg)


@register_program(padim.Padim, "padim")
def padim_program(detector: padim.Padim, index: padim.PadimIndex) -> Program:
  """PaDiM: Mahalanobis distance of each position's embedding to its Gaussian; the image
  score is the largest value of the final map."""
  cfg = detector.config
  index = _prepared(detector, index)
  arrays = {"backbone": detector.backbone.variables, "mean": index.mean,
            "precision": index.precision}
  backbone, channels, grid = detector.backbone, tuple(index.channels), tuple(index.grid)

  def score(arrays, images):
    out = backbone.apply(arrays["backbone"], images)
    emb = embedding.padim_embedding({l: out[l] for l in cfg.layers}, cfg.layers, channels)
    n, h, w, d = emb.shape
    if (h, w) != grid:
      raise ValueError(f"the backbone gives a {(h, w)} grid, the index holds {grid}")
    dist = gaussian.mahalanobis_distances(emb.reshape(n, h * w, d), arrays["mean"],
                                          arrays["precision"])
    maps = _maps(dist.reshape(n, h, w), cfg)
    return maps.max(axis=(1, 2)), maps

  return _program("padim", arrays, score, cfg)


def _geometry(config: Any) -> tuple[Any, ...]:
  """What a detector's input (its Program's input_size, resize and crop) depends on: the
  input size, the crop and, with a crop, resize (crop=None resizes to image_size)."""
  return tuple(config.input_size), config.crop, config.resize if config.crop is not None \
      else None


def _describe_geometry(config: Any) -> str:
  height, width = config.input_size
  if config.crop is None:
    return f"the whole image resized to {height}x{width}"
  return f"resize {config.resize}, centre crop {config.crop}"


@register_program(ensemble.Ensemble, "ensemble")
def ensemble_program(detector: ensemble.Ensemble, index: ensemble.EnsembleIndex) -> Program:
  """An ensemble: every member's program (built by its own builder) on the same input,
  each output standardised by the index's statistics and combined as Ensemble.score
  does (ensemble.combine_outputs):

    z_m = (score_m - image_center[m]) / image_scale[m],
    Z_m = (map_m - pixel_center[m]) / pixel_scale[m],

  then their mean or max over the M members (EnsembleConfig.combine). Arrays: each
  member's (a backbone shared by several members carried once) and the four [M] float32
  statistics. Ensemble.score preprocesses the images once per member, with the member's
  own resize / crop / image_size: one program input stands for all of them only when
  they agree, so members with different inputs are refused. Ensemble.score computes the
  image z-scores in float64; the program in float32.

  Raises:
    ValueError: an index of other members, a member that cannot be exported (naming
      it), or members whose inputs differ (naming them and their inputs).
  """
  detector.check_index(index)
  configs = [member.config for member in detector.members]
  if len({_geometry(c) for c in configs}) > 1:
    inputs = "; ".join(f"{name}: {_describe_geometry(c)}"
                       for name, c in zip(detector.names, configs))
    raise ValueError(f"cannot export this ensemble: its members bring images to different "
                     f"inputs ({inputs}), and one program takes one input; fit the members "
                     f"with the same resize, crop and image_size (fit.py --method=ensemble "
                     f"does)")
  members = []
  for m, (member, member_index) in enumerate(zip(detector.members, index.indices)):
    try:
      members.append(build(member, member_index))
    except ValueError as e:
      raise ValueError(f"ensemble member {m} ({detector.names[m]}): {e}") from None
  # A backbone shared by several members (Ensemble.from_specs loads each once): its
  # variables once, under "backbones", and not in those members' arrays.
  # (A builder without a "backbone" entry keeps its arrays whole: key None.)
  shared: dict[int, str] = {}
  backbones, member_arrays, backbone_keys = {}, [], []
  for member, program in zip(detector.members, members):
    arrays, key = program.arrays, None
    if isinstance(arrays, dict) and "backbone" in arrays:
      arrays = dict(arrays)
      key = shared.setdefault(id(member.backbone), str(len(shared)))
      backbones.setdefault(key, arrays.pop("backbone"))
    member_arrays.append(arrays)
    backbone_keys.append(key)
  arrays = {"backbones": backbones, "members": member_arrays,
            **{name: np.asarray(getattr(index, name), np.float32)
               for name in ("image_center", "image_scale", "pixel_center", "pixel_scale")}}
  combine = detector.config.combine

  def score(arrays, images):
    z_scores, z_maps = [], []
    for m, (program, key) in enumerate(zip(members, backbone_keys)):
      member_arrays = arrays["members"][m] if key is None else {
          **arrays["members"][m], "backbone": arrays["backbones"][key]}
      scores, maps = program.score(member_arrays, images)
      z_scores.append((scores.astype(jnp.float32) - arrays["image_center"][m])
                      / arrays["image_scale"][m])
      z_maps.append((maps.astype(jnp.float32) - arrays["pixel_center"][m])
                    / arrays["pixel_scale"][m])
    reduce = jnp.mean if combine == "mean" else jnp.max
    return reduce(jnp.stack(z_scores), axis=0), reduce(jnp.stack(z_maps), axis=0)

  first = members[0]
  settings = {**_config_settings(detector.config),
              "members": [{"name": name, "method": p.method, "settings": p.settings}
                          for name, p in zip(detector.names, members)]}
  return Program("ensemble", arrays, score, first.input_size, first.resize, first.crop,
                 settings)


def as_numpy_tree(tree: Any) -> Any:
  """`tree` with every array and number leaf as a NumPy array (floats as float32)."""

  def leaf(x):
    if isinstance(x, str):
      return x
    if isinstance(x, float):
      return np.float32(x)
    return np.asarray(x)

  return jax.tree.map(leaf, tree)
