"""The PatchCore detector (Roth et al., CVPR 2022): config, fitted index, fit / score.

  patchcore = PatchCore(backbone, PatchCoreConfig())
  index = patchcore.fit(train_images_uint8)       # PatchCoreIndex, no hidden state
  scores, maps = patchcore.score(index, test_images_uint8)
  save_index("bottle.patchcore", index); load_index("bottle.patchcore", expect=patchcore)
  (save_index / load_index: index_file.py)

`fit` runs preprocess -> backbone -> locally aware patch features
(spade_jax.patch_features: p x p neighbourhoods, the coarser levels resized to the
finest grid, channels reduced to embed_dim per level as the paper's code does, or
concatenated) in batches, then keeps a greedy coreset of all training patches
(spade_jax.coreset, coreset_ratio of them) as the memory bank. `score` computes the
test images' patch features, each patch's distance to its nearest bank entries, the
image score (the largest patch score, its reweighting, or the mean of the top k) and
the anomaly maps (bilinear upsampling to the crop, Gaussian blur), per batch
(spade_jax.scoring.memory_bank).

Kernels (PatchCoreConfig.metric): besides the fixed distances ("l2", "sqeuclidean"),
`metric` may name a kernel of spade_jax.kernels as SpadeConfig.metric does
(KERNEL_METRICS: "mahalanobis", "learned", "linear", "rbf", "laplacian",
"polynomial", "rff", "nystrom"). `fit` then fits it on all training patches
(metric_fit.fit_patch_kernel: closed form, or optax for "learned" with held-out
folds of whole images), selects the coreset in the kernel's own search space
(spade_jax.coreset(metric=kernel): on the transformed rows of a kernel searched as L2
on them, e.g. whitened patches for Mahalanobis; on the exact kernel-induced distance
otherwise) and keeps the kernel in the index beside the (untransformed) bank; `score`
measures every patch distance with it. An index fitted for another metric is refused
(its bank was selected in another space): refit.

The interface is Spade's: with a mesh (`fit(..., mesh=mesh)`, or one set with
jax.set_mesh) the coreset is selected on the training patches sharded over the mesh
axis `axis` and the memory bank is sharded over it; scoring searches it where it
lies, and the numbers are the single-device ones. `extract`, `fit_features` and
`score_features` split fit / score at the patch features.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
from typing import Any

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.detector import common, metric_fit
from spade_jax.features import geometry
from spade_jax.features import patches as patches_lib
from spade_jax.features.backbones import Backbone
from spade_jax.host import progress
from spade_jax.scoring import memory_bank
from spade_jax.search import coreset as coreset_lib
from spade_jax.search import distances, rows, sharding

Array = jax.Array
Mesh = jax.sharding.Mesh
# PatchCoreConfig.image_score: the largest patch score (the paper's s*), its
# reweighting (Eq. 7), the mean of the topk largest (scoring/memory_bank.py).
IMAGE_SCORES = ("max", "reweight", "topk")
# PatchCoreConfig.metric names of kernels fitted on the training patches (SPADE's).
KERNEL_METRICS = metric_fit.KERNEL_METRICS


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class PatchCoreConfig:
  """PatchCore settings (defaults: the paper's MVTec AD setup, WRN50 layer2 + layer3).

  Attributes:
    layers: pyramid levels whose patch features are combined (paper: layer2, 3; any
      number, each resized to the finest grid among them).
    patch_size: p, neighbourhood of the local averaging (odd; paper: 3).
    embed_dim: E, reduce the levels' channels to this many when they have more
      (PatchCore: 1024; None: keep all). EfficientNet-Lite0's layer2 + 3 have 152
      (kept), WRN50's 512 + 1024 (reduced).
    reduction: how, when they are reduced (features/patches.py): "per_level"
      (default; patchcore-inspection's, which the paper's numbers come from: each
      level's p x p neighbourhoods average-pooled to E channels, then the levels
      together to E), "adaptive_avg" (the default before "per_level": one pooling
      over the concatenated levels, which favours the level with more channels) or
      "random_projection". Part of the index's features.
    reduction_seed: fixes the random projection (unused by the others).
    coreset_ratio: fraction of the training patches kept in the memory bank, in
      (0, 1] (paper: 0.1; 1: all, no coreset).
    projection_dim: the coreset greedy runs on random projections to this many
      dimensions (paper: 128); None: on the patch features (exact greedy).
    coreset_seed: seed of the coreset's projection.
    k_nearest: bank entries averaged into a patch score (paper: 1).
    reweight: PatchCore's reweighting of the image score (memory_bank.py); True is
      image_score="reweight" (kept for older code and files: set either). Stored as
      whether the reweighting applies, also when image_score chose it.
    num_neighbors: b, the support of the reweighting (anomalib: 9; >= 2).
    image_score: the image score from the patch scores, one of IMAGE_SCORES: "max"
      (the paper's s*), "reweight" (Eq. 7, with num_neighbors) or "topk" (the mean of
      the topk largest); None (default): from the other fields, "reweight" if
      reweight, "topk" if topk is set, else "max" (the `image_score_rule` property).
      A contradicting combination (reweight=True with "max" or "topk"; topk with
      "max" or "reweight") is refused.
    topk: t of "topk", 1 <= t <= the patches per image (checked when scoring);
      None unless the image score is "topk".
    metric: distance name in spade_jax.METRICS: "l2" (anomalib's patch distance) or
      "sqeuclidean" (patchcore-inspection's: faiss IndexFlatL2 distances, squared, in
      its image scores and maps alike); or the name of a kernel fitted on the training
      patches (KERNEL_METRICS: "mahalanobis", "learned", "linear", "rbf", "laplacian",
      "polynomial", "rff", "nystrom"; module docstring), whose search space the
      coreset is selected in and whose distance scores the patches.
    sigma: Gaussian sigma of the anomaly maps, in crop pixels (paper: 4).
    resize: shorter side before the centre crop (paper: 256); with crop=None, the
      shorter side of image_size when that is chosen from an image (geometry.py).
    crop: centre crop = anomaly-map size (paper: 224); None: the whole image, resized
      to image_size.
    batch_size: images per backbone call and per scoring step (speed/memory only).
    image_size: (H, W) every image is resized to with crop=None (the maps' size;
      spade_jax.features.geometry); None with a crop. fit_folder and the scripts
      choose it from the first training image when not given.
  """
  layers: tuple[str, ...] = ("layer2", "layer3")
  patch_size: int = 3
  embed_dim: int | None = 1024
  reduction: str = "per_level"
  reduction_seed: int = 0
  coreset_ratio: float = 0.1
  projection_dim: int | None = 128
  coreset_seed: int = 0
  k_nearest: int = 1
  reweight: bool = False
  num_neighbors: int = 9
  image_score: str | None = None
  topk: int | None = None
  metric: str = "l2"
  sigma: float = 4.0
  resize: int = 256
  crop: int | None = 224
  batch_size: int = 8
  image_size: tuple[int, int] | None = None

  def __post_init__(self):
    for name in ("k_nearest", "num_neighbors", "batch_size"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"PatchCoreConfig.{name} must be a positive int, got {value!r}")
    if isinstance(self.layers, str) or not self.layers or not all(
        isinstance(l, str) for l in self.layers):
      raise ValueError(f"PatchCoreConfig.layers must be a non-empty tuple of names, got "
                       f"{self.layers!r}")
    object.__setattr__(self, "layers", tuple(self.layers))
    if len(set(self.layers)) != len(self.layers):
      raise ValueError(f"PatchCoreConfig.layers has duplicates: {self.layers}")
    for name, value in (("patch_size", self.patch_size), ("embed_dim", self.embed_dim),
                        ("reduction", self.reduction), ("seed", self.reduction_seed)):
      try:
        patches_lib.check_settings(**{"patch_size": 3, "embed_dim": None,
                                      "reduction": "per_level", "seed": 0, name: value})
      except ValueError as e:
        field = "reduction_seed" if name == "seed" else name
        raise ValueError(f"PatchCoreConfig.{field}: {e}") from None
    ratio = self.coreset_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.number)) \
        or not 0 < ratio <= 1:  # NaN fails too.
      raise ValueError(f"PatchCoreConfig.coreset_ratio must be in (0, 1], got {ratio!r}")
    if self.projection_dim is not None and (not _is_int(self.projection_dim)
                                            or self.projection_dim < 1):
      raise ValueError(f"PatchCoreConfig.projection_dim must be a positive int or None, got "
                       f"{self.projection_dim!r}")
    if not _is_int(self.coreset_seed) or self.coreset_seed < 0:
      raise ValueError(f"PatchCoreConfig.coreset_seed must be a non-negative int, got "
                       f"{self.coreset_seed!r}")
    if not isinstance(self.reweight, (bool, np.bool_)):
      raise ValueError(f"PatchCoreConfig.reweight must be a bool, got {self.reweight!r}")
    object.__setattr__(self, "reweight", self._resolve_image_score() == "reweight")
    if self.reweight and self.num_neighbors < 2:
      raise ValueError(f"PatchCoreConfig.num_neighbors must be >= 2 with reweight (b = 1 "
                       f"weights every score by 0), got {self.num_neighbors}")
    if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float, np.number)):
      raise ValueError(f"PatchCoreConfig.sigma must be a number, got {self.sigma!r}")
    object.__setattr__(self, "image_size", geometry.check_geometry(
        "PatchCoreConfig", self.resize, self.crop, self.image_size))
    side = min(self.input_size) if self.crop is not None or self.image_size else self.resize
    if not 0 <= self.sigma <= side:  # NaN and inf fail too.
      raise ValueError(f"PatchCoreConfig.sigma must be finite, >= 0 and at most the maps' "
                       f"shorter side {side}, got {self.sigma!r}")
    if self.metric not in distances.METRICS and self.metric not in KERNEL_METRICS:
      raise ValueError(f"PatchCoreConfig.metric must be a metric {sorted(distances.METRICS)} "
                       f"or a kernel {sorted(KERNEL_METRICS)}, got {self.metric!r}")

  def _resolve_image_score(self) -> str:
    """Checks image_score, reweight and topk together; returns the rule they choose."""
    rule, topk = self.image_score, self.topk
    if rule is not None and rule not in IMAGE_SCORES:
      raise ValueError(f"PatchCoreConfig.image_score must be one of {IMAGE_SCORES} or None, "
                       f"got {rule!r}")
    if topk is not None and (not _is_int(topk) or topk < 1):
      raise ValueError(f"PatchCoreConfig.topk must be a positive int or None, got {topk!r}")
    if rule is None:
      if self.reweight and topk is not None:
        raise ValueError(f"PatchCoreConfig: reweight=True and topk={topk} ask for two image "
                         "scores; set image_score='reweight' or 'topk' (and drop the other)")
      return "reweight" if self.reweight else "topk" if topk is not None else "max"
    if self.reweight and rule != "reweight":
      raise ValueError(f"PatchCoreConfig: reweight=True (image_score='reweight') contradicts "
                       f"image_score={rule!r}; drop reweight (or image_score)")
    if rule == "topk" and topk is None:
      raise ValueError("PatchCoreConfig.topk must be set with image_score='topk' (the number "
                       "of largest patch scores averaged into the image score)")
    if rule != "topk" and topk is not None:
      raise ValueError(f"PatchCoreConfig.topk={topk} is the top-k mean's (image_score="
                       f"'topk'), not used by image_score={rule!r}; drop topk")
    return rule

  @property
  def is_kernel(self) -> bool:
    """Whether `metric` names a kernel fitted on the training patches."""
    return self.metric in KERNEL_METRICS

  @property
  def image_score_rule(self) -> str:
    """The image score in use, one of IMAGE_SCORES (image_score, or what None means)."""
    return self._resolve_image_score()

  def score_settings(self) -> dict[str, Any]:
    """The settings PatchCore's image score depends on besides the bank's features:
    the metric (a kernel's name: each fold of a calibration refits the kernel on its
    training patches, as fit does on all of them), k_nearest, the image score
    (reweight, with its support num_neighbors; topk, and image_score "topk" with it),
    and what selected the bank (coreset_ratio, projection_dim, coreset_seed: a
    calibration refits the bank per fold with them) and patch_size. A calibrated
    threshold records them (calibration.Threshold) and holds only for scores made with
    them. topk is always recorded (None: not the top-k mean), so thresholds from before
    it, which lack it, are taken as None's, the max or reweighted score they were
    calibrated on."""
    settings = {"metric": self.metric, "k_nearest": self.k_nearest,
                "reweight": bool(self.reweight), "coreset_ratio": float(self.coreset_ratio),
                "projection_dim": self.projection_dim, "coreset_seed": self.coreset_seed,
                "patch_size": self.patch_size, "topk": self.topk}
    if self.reweight:
      settings["num_neighbors"] = self.num_neighbors
    if self.topk is not None:
      settings["image_score"] = "topk"
    return settings

  @property
  def input_size(self) -> tuple[int, int]:
    """(H, W) of the backbone input and of the anomaly maps: (crop, crop) or image_size
    (ValueError: crop=None without image_size)."""
    return geometry.input_size("PatchCoreConfig", self.crop, self.image_size)

  def geometry_fields(self) -> dict[str, Any]:
    """resize, crop (and image_size with crop=None) of feature_config."""
    return geometry.feature_fields("PatchCoreConfig", self.resize, self.crop, self.image_size)

  def feature_config(self, backbone_name: str) -> str:
    """Canonical JSON of what determines the bank's features (not the scoring knobs,
    nor the coreset: a bank is valid whatever its size)."""
    config = {"backbone": backbone_name, "layers": list(self.layers),
              **self.geometry_fields(), "patch_size": self.patch_size,
              "embed_dim": self.embed_dim, "reduction": self.reduction}
    if self.reduction == "random_projection":
      config["reduction_seed"] = self.reduction_seed
    return json.dumps(config, sort_keys=True)

  def coreset_size(self, num_patches: int) -> int:
    """Bank rows kept of num_patches: int(ratio * num_patches), at least 1."""
    return max(1, min(num_patches, int(self.coreset_ratio * num_patches)))


@struct.dataclass
class PatchCoreIndex:
  """A fitted PatchCore memory bank: a pytree of the bank + static metadata.

  Attributes:
    bank: [B, D] float32 coreset of the training patch features (or a
      spade_jax.ShardedGallery of them).
    backbone_name: the backbone that produced them (static).
    feature_config: canonical JSON of backbone, layers, resize, crop, patch_size,
      embed_dim, reduction (static); the index is valid for any scoring settings
      (k_nearest, image_score, reweight, num_neighbors, topk, metric, sigma) but only
      for these features.
    weights_id: the identity of the backbone's weights (Backbone.weights_id; static);
      None: not recorded. Scoring refuses an index of other weights.
    kernel: the kernel of `fitted_metric` fitted on the training patches (small,
      unsharded, replicated on the mesh of a sharded bank); None for a fixed metric.
    fitted_metric: the PatchCoreConfig.metric that `kernel` was fitted (and the bank
      selected) for (static); None: a fixed metric (and every index of before
      kernels), valid for any fixed metric.
  """
  bank: Array
  backbone_name: str = struct.field(pytree_node=False)
  feature_config: str = struct.field(pytree_node=False)
  weights_id: str | None = struct.field(pytree_node=False, default=None)
  kernel: Any = None
  fitted_metric: str | None = struct.field(pytree_node=False, default=None)

  @property
  def fingerprint(self) -> str:
    """Short hash of feature_config and weights_id."""
    return common.fingerprint(self.feature_config, self.weights_id)

  @property
  def num_entries(self) -> int:
    """B, the rows of the memory bank."""
    return sharding.num_rows(self.bank)

  @property
  def is_sharded(self) -> bool:
    return isinstance(self.bank, sharding.ShardedGallery)


def shard_patchcore_index(index: PatchCoreIndex, mesh: Mesh | None = None,
                          axis: str = "data") -> PatchCoreIndex:
  """`index` with its bank sharded over `mesh`'s `axis` (spade_jax.shard_gallery)."""
  mesh = sharding.resolve_mesh(mesh, axis)
  return index.replace(bank=sharding.shard_gallery(index.bank, mesh, axis),
                       kernel=_replicate(index.kernel, mesh))


def _replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda x: sharding.place_replicated(x, mesh), tree)


def check_metric(index: PatchCoreIndex, config: PatchCoreConfig, where: str) -> None:
  """Raises a ValueError unless `index` was fitted for config.metric's kind: a kernel
  metric needs the index's kernel of that metric (its bank was selected in that
  kernel's space); a fixed metric an index without a kernel."""
  fitted = index.fitted_metric
  if config.is_kernel and (fitted != config.metric or index.kernel is None):
    held = "no kernel" if fitted is None else f"the kernel of metric {fitted!r}"
    raise ValueError(
        f"{where}: metric={config.metric!r} scores with the kernel fitted on the training "
        f"patches, which also selected the memory bank, but the index holds {held}; refit "
        f"the index with metric={config.metric!r} (fit.py --metric={config.metric})")
  if not config.is_kernel and fitted is not None:
    raise ValueError(
        f"{where}: the index's memory bank was selected for the kernel of metric "
        f"{fitted!r}, not for metric={config.metric!r}; score with metric={fitted!r} "
        f"(--metric={fitted}) or refit the index with metric={config.metric!r}")


check_compatible = common.check_compatible


def _check_bank_size(config: PatchCoreConfig, size: int) -> None:
  names = ["k_nearest"] + (["num_neighbors"] if config.reweight else [])
  for name in names:
    if getattr(config, name) > size:
      raise ValueError(f"PatchCoreConfig.{name}={getattr(config, name)} is larger than the "
                       f"memory bank ({size} entries); raise coreset_ratio or lower it")


class PatchCore:
  """PatchCore with a frozen backbone. Holds no fitted state: fit returns an index."""

  def __init__(self, backbone: Any, config: PatchCoreConfig | None = None):
    """backbone: `.name` and `backbone(images [N, H, W, 3] float32) -> dict` with the
    config's layers ([N, h, w, C])."""
    self.backbone = backbone
    self.config = PatchCoreConfig() if config is None else config
    if not isinstance(self.config, PatchCoreConfig):
      raise ValueError(f"config must be a PatchCoreConfig, got {type(self.config).__name__}")
    common.check_backbone_levels(backbone, self.config.layers)

  @property
  def feature_config(self) -> str:
    return self.config.feature_config(self.backbone.name)

  def _batches(self, images, what: str, done: str = "patch features of"):
    """Yields patch features [B, H, W, D] (device) per batch of preprocessed images.

    Logs progress as "<what>: <done> i / N images, ..." (see host/progress.py).
    """
    cfg = self.config
    total = len(images)
    for chunk in common.image_batches(images, what, done, cfg.batch_size):
      with progress.stage("backbone") as timed:  # Backbone and patch features.
        batch, count = common.pad_batch(common.preprocess(chunk, cfg), cfg.batch_size, total)
        batch = jnp.asarray(batch, jnp.float32)
        # A spade_jax Backbone computes only the levels asked for (no head, no pool).
        out = (self.backbone(batch, features=cfg.layers)
               if isinstance(self.backbone, Backbone) else self.backbone(batch))
        common.check_returned_levels(self.backbone, out, cfg.layers)
        feats = timed.ready(common.unpad(patches_lib.patch_features(
            out, cfg.layers, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
            reduction=cfg.reduction, seed=cfg.reduction_seed), count))
      yield feats

  def extract(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Patch features of images, on the host.

    Args:
      images: [N, H, W, 3] uint8 (or a list of [H, W, 3]).

    Returns:
      [N, h, w, D] float32 NumPy: the finest chosen level's grid, D channels (see
      spade_jax.patch_features).
    """
    return np.concatenate([np.asarray(p) for p in self._batches(images, "images")])

  def fit_features(self, train_patches: Any, *, mesh: Mesh | None = None,
                   axis: str = "data", process_local: bool = False) -> PatchCoreIndex:
    """A PatchCoreIndex from training patch features (e.g. from `extract`).

    Args:
      train_patches: [M, h, w, D] (or [P, D]) patch features of the training images
        ([P, D]: a learned kernel's held-out folds are then of patches, not images).
      mesh: select the coreset on patches sharded over this mesh's `axis` and shard
        the bank over it; None: the mesh set with jax.set_mesh, else one device.
      axis: the mesh axis that splits the patches and the bank.
      process_local: several processes: the features are this process's share
        (see spade_jax.shard_gallery); needs a mesh.

    Returns:
      PatchCoreIndex whose bank holds coreset_size(P) of the P training patches, in
      the coreset's selection order (a ShardedGallery when there is a mesh); with a
      kernel metric, the kernel fitted on all P patches (selected in its space).
    """
    cfg = self.config
    if np.ndim(train_patches) not in (2, 4):
      raise ValueError(f"train_patches must be [M, h, w, D] or [P, D], got shape "
                       f"{np.shape(train_patches)}")
    dim = int(np.shape(train_patches)[-1])
    flat = (np.asarray(train_patches, np.float32) if process_local
            else jnp.asarray(train_patches, jnp.float32)).reshape(-1, dim)
    mesh = common.mesh_or_none(mesh, axis)
    if mesh is None:
      if process_local:
        raise ValueError("process_local=True needs a mesh (pass mesh=...)")
      if flat.shape[0] == 0:
        raise ValueError("train_patches is empty (0 patches)")
      patches = flat
      total = int(flat.shape[0])
    else:
      patches = sharding.shard_gallery(flat, mesh, axis, process_local=process_local)
      total = patches.size
    size = cfg.coreset_size(total)
    _check_bank_size(cfg, size)
    kernel = None
    if cfg.is_kernel:  # On every training patch, grouped by image (a learned kernel's folds).
      per_image = (int(np.prod(np.shape(train_patches)[1:3])) if np.ndim(train_patches) == 4
                   else 1)
      host = metric_fit.host_rows(patches) if mesh is not None else np.asarray(flat)
      kernel = metric_fit.fit_patch_kernel(cfg.metric, host.reshape(-1, per_image, dim))
    if size == total and (mesh is None or patches.contiguous):
      bank = patches  # Ratio 1 (or a bank too small to subsample): every patch, in order.
    else:
      chosen = coreset_lib.coreset(patches, size, projection_dim=cfg.projection_dim,
                                   key=cfg.coreset_seed, metric=kernel)
      bank = rows.take_rows(patches, chosen)
      if mesh is not None:
        bank = sharding.shard_gallery(bank, mesh, axis)
    if kernel is not None and mesh is not None:
      kernel = _replicate(kernel, mesh)
    return PatchCoreIndex(bank=bank, backbone_name=self.backbone.name,
                          feature_config=self.feature_config,
                          weights_id=common.weights_id(self.backbone), kernel=kernel,
                          fitted_metric=cfg.metric if cfg.is_kernel else None)

  def fit(self, train_images: np.ndarray | Sequence[np.ndarray], *, mesh: Mesh | None = None,
          axis: str = "data") -> PatchCoreIndex:
    """Extracts the training patch features and keeps their coreset as the bank.

    Args:
      train_images: [M, H, W, 3] uint8 normal images (or a list of [H, W, 3]).
      mesh: select the coreset and shard the bank over this jax.sharding.Mesh's `axis`
        (other mesh axes spread the test patches); None: the mesh set with
        jax.set_mesh, else one device.
      axis: the mesh axis that splits the bank.

    Returns:
      PatchCoreIndex.
    """
    mesh = common.mesh_or_none(mesh, axis)  # Checked before the backbone runs.
    feats = jnp.concatenate(list(self._batches(train_images, "train_images")))
    return self.fit_features(feats, mesh=mesh, axis=axis)

  def _prepare_index(self, index: PatchCoreIndex, mesh: Mesh | None,
                     axis: str) -> PatchCoreIndex:
    if not isinstance(index, PatchCoreIndex):
      raise ValueError(f"index must be a PatchCoreIndex, got {type(index).__name__}")
    check_compatible(index, self.backbone.name, self.config, "PatchCore.score",
                     weights=common.weights_id(self.backbone))
    _check_bank_size(self.config, index.num_entries)
    check_metric(index, self.config, "PatchCore.score")
    if index.is_sharded:
      if mesh is not None and mesh != index.bank.mesh:
        raise ValueError("PatchCore.score: the index is sharded over another mesh than "
                         "`mesh`; refit, or pass mesh=None")
      return index
    mesh = common.mesh_or_none(mesh, axis)
    return index if mesh is None else shard_patchcore_index(index, mesh, axis)

  def _score_batch(self, index: PatchCoreIndex, patches: Any) -> tuple[np.ndarray, np.ndarray]:
    cfg = self.config
    with progress.stage("search") as timed:  # The kNN searches and the image scores.
      scores, score_maps = timed.ready(memory_bank.patchcore_scores(
          patches, index.bank, k=cfg.k_nearest,
          metric=index.kernel if cfg.is_kernel else cfg.metric,
          reweight_neighbors=cfg.num_neighbors if cfg.reweight else None, topk=cfg.topk))
    return common.scores_and_maps(scores, score_maps, cfg.input_size, cfg.sigma)

  def score(self, index: PatchCoreIndex, images: np.ndarray | Sequence[np.ndarray], *,
            mesh: Mesh | None = None, axis: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Image scores and anomaly maps of test images.

    Args:
      index: from fit / load_index, for this backbone and feature config.
      images: [N, H, W, 3] uint8 (or a list of [H, W, 3]).
      mesh: an unsharded index is sharded over this mesh's `axis` first (None: the mesh
        set with jax.set_mesh, else one device); a sharded index uses its own mesh.
      axis: the mesh axis that splits the bank.

    Returns:
      (scores [N] float32, anomaly maps [N, crop, crop] float32), NumPy.
    """
    index = self._prepare_index(index, mesh, axis)
    return common.concatenate_scored(self._score_batch(index, p)
                                     for p in self._batches(images, "images", done="scored"))

  def score_features(self, index: PatchCoreIndex, patches: Any, *, mesh: Mesh | None = None,
                     axis: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """`score` from test patch features (e.g. from `extract`), batch_size at a time.

    Args:
      index: as in `score`.
      patches: [N, h, w, D] patch features of the test images.
      mesh, axis: as in `score`.

    Returns:
      (scores [N] float32, anomaly maps [N, crop, crop] float32), NumPy.
    """
    index = self._prepare_index(index, mesh, axis)
    if np.ndim(patches) != 4:
      raise ValueError(f"patches must be [N, h, w, D], got shape {np.shape(patches)}")
    count = int(np.shape(patches)[0])
    if count == 0:
      raise ValueError("patches hold 0 test images")
    return common.score_in_batches(lambda rows: self._score_batch(index, patches[rows]),
                                   count, self.config.batch_size)

