"""The SPADE detector: config, fitted index (a pytree value), fit / score.

  spade = Spade(backbone, SpadeConfig())
  index = spade.fit(train_images_uint8)           # SpadeIndex, no hidden state
  scores, maps = spade.score(index, test_images_uint8)
  save_index("bottle.spade", index); index = load_index("bottle.spade", expect=spade)
  (save_index / load_index: index_file.py)

`fit` runs preprocess -> backbone in batches and keeps the pooled features and the
pyramid levels of the training images. `score` does, per batch of test images: the
image kNN (one search gives both the k_image_score neighbours of the image score and
the k_images nearest images of the pixel gallery), the pixel scores, then the anomaly
maps (bilinear upsampling to the crop size, Gaussian blur).

With a mesh (`fit(..., mesh=mesh)`, or one set with jax.set_mesh) the index holds
galleries sharded over the mesh axis `axis` (spade_jax.shard_gallery) and scoring
searches them where they lie; the numbers are the single-device ones. `extract`,
`fit_features` and `score_features` split fit / score at the features, for runs
where each process computes the features of its share of the images.

Kernel metrics and soft scores (SpadeConfig.metric / aggregate / bandwidth): with a
kernel name (KERNEL_METRICS, e.g. "mahalanobis") `fit` also fits one kernel per part,
the pooled vectors ("pool") and each layer, on the training features
(scoring.variants.fit_variant), and with aggregate "softmin" / "kde" and no bandwidth
the median-heuristic bandwidths (scoring.variants.median_bandwidths, in the metric's
units); the SpadeIndex carries them (`kernels`, `bandwidths`, `fitted_metric`) and
score uses them. An index holding none, or those of another metric, is refused by
score with a clear error: `index = spade.fit_kernels(index)` fits them from the
index's own training features (never silently per score call: a learned kernel takes
seconds). The defaults (metric "l2", aggregate "mean") fit nothing: SPADE as published.
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

from spade_jax import scoring
from spade_jax.detector import common, metric_fit
from spade_jax.features import geometry
from spade_jax.host import progress
from spade_jax.search import distances, sharding

Array = jax.Array
Mesh = jax.sharding.Mesh
KERNEL_METRICS = metric_fit.KERNEL_METRICS
AGGREGATES = metric_fit.AGGREGATES


@dataclasses.dataclass(frozen=True)
class SpadeConfig:
  """SPADE settings (defaults: the paper's MVTec AD setup).

  Attributes:
    k_images: K, nearest training images whose pyramid positions form each test
      image's pixel gallery (paper, MVTec: 50).
    k_image_score: k of the image score (mean distance to the k nearest pooled
      features). 5, as the public PyTorch port whose image AUROC (85.4) matches the
      paper's (85.5) in SPADE.md.
    kappa: nearest gallery features averaged per position (paper: 1).
    layers: pyramid levels (paper: layer1..3 = 56, 28, 14 at 224 input).
    combine: "ensemble" (default: each level scored alone, upsampled, averaged; SPADE.md
      reports it ~+0.2 pixel AUROC over "cat", and it is ~6x cheaper for
      wide_resnet50_2: the 56x56 level is searched in 256-d instead of 1792-d) or "cat".
    sigma: Gaussian sigma of the anomaly maps, in crop pixels (paper: 4).
    metric: a fixed distance of spade_jax.METRICS ("l2", ...), or the name of a kernel
      fitted on the training features, one per part (KERNEL_METRICS: "mahalanobis",
      "learned", "linear", "rbf", "laplacian", "polynomial", "rff", "nystrom"; needs
      combine="ensemble").
    aggregate: how the k (kappa) nearest distances become a score: "mean" (SPADE),
      "softmin" or "kde" (scoring/aggregate.py).
    bandwidth: h > 0 of "softmin" / "kde", in the metric's distance units, for the
      image and the pixel scores alike; None: the median heuristic of the training
      images per part (scoring.variants.median_bandwidths), fitted with the index.
    resize: shorter side before the centre crop (paper: 256); with crop=None, the
      shorter side of image_size when that is chosen from an image (geometry.py).
    crop: centre crop = anomaly-map size (paper: 224); None: the whole image, resized
      to image_size.
    batch_size: images per backbone call and per scoring step (speed/memory only).
    image_size: (H, W) every image is resized to with crop=None (the maps' size;
      spade_jax.features.geometry); None with a crop. fit_folder and the scripts
      choose it from the first training image when not given.
  """
  k_images: int = 50
  k_image_score: int = 5
  kappa: int = 1
  layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
  combine: str = "ensemble"
  sigma: float = 4.0
  metric: str = "l2"
  resize: int = 256
  crop: int | None = 224
  batch_size: int = 8
  aggregate: str = "mean"
  bandwidth: float | None = None
  image_size: tuple[int, int] | None = None

  def __post_init__(self):
    for name in ("k_images", "k_image_score", "kappa", "batch_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"SpadeConfig.{name} must be a positive int, got {value!r}")
    if isinstance(self.layers, str) or not self.layers or not all(
        isinstance(l, str) for l in self.layers):
      raise ValueError(f"SpadeConfig.layers must be a non-empty tuple of names, got "
                       f"{self.layers!r}")
    object.__setattr__(self, "layers", tuple(self.layers))
    if len(set(self.layers)) != len(self.layers):
      raise ValueError(f"SpadeConfig.layers has duplicates: {self.layers}")
    if self.combine not in scoring.COMBINE_MODES:
      raise ValueError(f"SpadeConfig.combine must be one of {scoring.COMBINE_MODES}, got "
                       f"{self.combine!r}")
    if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float, np.number)):
      raise ValueError(f"SpadeConfig.sigma must be a number, got {self.sigma!r}")
    object.__setattr__(self, "image_size", geometry.check_geometry(
        "SpadeConfig", self.resize, self.crop, self.image_size))
    side = min(self.input_size) if self.crop is not None or self.image_size else self.resize
    if not 0 <= self.sigma <= side:  # NaN and inf fail too.
      raise ValueError(f"SpadeConfig.sigma must be finite, >= 0 and at most the maps' "
                       f"shorter side {side}, got {self.sigma!r}")
    if self.metric not in distances.METRICS and self.metric not in KERNEL_METRICS:
      raise ValueError(f"SpadeConfig.metric must be a metric {sorted(distances.METRICS)} or "
                       f"a kernel {sorted(KERNEL_METRICS)}, got {self.metric!r}")
    if self.metric in KERNEL_METRICS and self.combine != "ensemble":
      raise ValueError(f"SpadeConfig.metric={self.metric!r} fits one kernel per layer, which "
                       f"needs combine='ensemble' (combine={self.combine!r} searches the "
                       "concatenated layers)")
    if self.aggregate not in AGGREGATES:
      raise ValueError(f"SpadeConfig.aggregate must be one of {AGGREGATES}, got "
                       f"{self.aggregate!r}")
    metric_fit.check_bandwidth(self.bandwidth, self.aggregate)
    if self.bandwidth is not None:
      object.__setattr__(self, "bandwidth", float(self.bandwidth))

  @property
  def is_kernel(self) -> bool:
    """Whether `metric` names a kernel fitted on the training features."""
    return self.metric in KERNEL_METRICS

  @property
  def needs_bandwidths(self) -> bool:
    """Whether scoring takes median-heuristic bandwidths from the index."""
    return self.aggregate != "mean" and self.bandwidth is None

  def bandwidth_parts(self) -> tuple[str, ...]:
    """The parts with a bandwidth of their own: "pool" and each layer ("ensemble") or
    "cat" (the concatenated layers)."""
    return ("pool", *(self.layers if self.combine == "ensemble" else ("cat",)))

  def score_settings(self) -> dict[str, Any]:
    """The settings SPADE's image score depends on besides the index: k_image_score,
    metric, aggregate and bandwidth (the pixel settings k_images, kappa, combine and
    sigma change the maps only). A calibrated threshold records them
    (calibration.Threshold) and holds only for scores made with them."""
    return {"k_image_score": self.k_image_score, "metric": self.metric,
            "aggregate": self.aggregate, "bandwidth": self.bandwidth}

  @property
  def input_size(self) -> tuple[int, int]:
    """(H, W) of the backbone input and of the anomaly maps: (crop, crop) or image_size
    (ValueError: crop=None without image_size)."""
    return geometry.input_size("SpadeConfig", self.crop, self.image_size)

  def geometry_fields(self) -> dict[str, Any]:
    """resize, crop (and image_size with crop=None) of feature_config."""
    return geometry.feature_fields("SpadeConfig", self.resize, self.crop, self.image_size)

  def feature_config(self, backbone_name: str) -> str:
    """Canonical JSON of what determines the stored features (not the scoring knobs)."""
    return json.dumps({"backbone": backbone_name, "layers": list(self.layers),
                       **self.geometry_fields()}, sort_keys=True)


@struct.dataclass
class SpadeIndex:
  """A fitted SPADE gallery: a pytree of the training features + static metadata.

  Attributes:
    train_pool: [M, D_pool] float32 pooled features of the M training images (or a
      spade_jax.ShardedGallery of them).
    train_features: level -> [M, h_l, w_l, C_l] float32 pyramid features (or
      ShardedGallery's on the same mesh).
    backbone_name: the backbone that produced them (static).
    feature_config: canonical JSON of backbone, layers, resize, crop (static); an index
      is valid for any scoring settings (k_images, kappa, combine, sigma, metric,
      aggregate) but only for this feature configuration. A kernel metric, or a soft
      aggregate without a bandwidth, also needs what was fitted for it (below;
      Spade.fit_kernels fits it from the index's own features).
    kernels: part ("pool", each layer) -> the kernel fitted for `fitted_metric` (small,
      unsharded, replicated on the mesh of a sharded index); {} for fixed metrics.
    fitted_metric: the SpadeConfig.metric that `kernels` and `bandwidths` were fitted
      for (static); None: nothing fitted (fixed metric and "mean", older files).
    bandwidths: ((part, h), ...) median-heuristic bandwidths of the soft scores in
      fitted_metric's units, part = "pool", a layer or "cat", sorted by part
      (static); () if none.
    weights_id: the identity of the backbone's weights (Backbone.weights_id,
      "sha256:<hex>"; static); None: not recorded (an older file, a test double).
      Scoring refuses an index of other weights.
  """
  train_pool: Array
  train_features: dict[str, Array]
  backbone_name: str = struct.field(pytree_node=False)
  feature_config: str = struct.field(pytree_node=False)
  kernels: dict[str, Any] = struct.field(default_factory=dict)
  fitted_metric: str | None = struct.field(pytree_node=False, default=None)
  bandwidths: tuple[tuple[str, float], ...] = struct.field(pytree_node=False, default=())
  weights_id: str | None = struct.field(pytree_node=False, default=None)

  @property
  def fingerprint(self) -> str:
    """Short hash of feature_config and weights_id."""
    return common.fingerprint(self.feature_config, self.weights_id)

  @property
  def num_images(self) -> int:
    return sharding.num_rows(self.train_pool)

  @property
  def is_sharded(self) -> bool:
    return isinstance(self.train_pool, sharding.ShardedGallery)

  def missing_fits(self, config: SpadeConfig) -> list[str]:
    """What scoring with `config` needs that this index lacks (empty: ready)."""
    missing = []
    same = self.fitted_metric == config.metric
    if config.is_kernel:
      absent = [p for p in ("pool", *config.layers) if p not in self.kernels]
      if not same or absent:
        missing.append(f"the kernels of metric {config.metric!r}")
    if config.needs_bandwidths:
      known = dict(self.bandwidths)
      if not same or any(p not in known for p in config.bandwidth_parts()):
        missing.append(f"the median bandwidths of aggregate={config.aggregate!r} in metric "
                       f"{config.metric!r}")
    return missing


def _replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda x: sharding.place_replicated(x, mesh), tree)


def shard_index(index: SpadeIndex, mesh: Mesh | None = None, axis: str = "data") -> SpadeIndex:
  """`index` with its galleries sharded over `mesh`'s `axis` (spade_jax.shard_gallery)
  and its kernels replicated on the mesh."""
  mesh = sharding.resolve_mesh(mesh, axis)
  return index.replace(train_pool=sharding.shard_gallery(index.train_pool, mesh, axis),
                       train_features=sharding.shard_gallery(index.train_features, mesh,
                                                             axis),
                       kernels=_replicate(index.kernels, mesh))


check_compatible = common.check_compatible


def _check_k(config: SpadeConfig, num_train: int) -> None:
  for name in ("k_images", "k_image_score"):
    if getattr(config, name) > num_train:
      raise ValueError(f"SpadeConfig.{name}={getattr(config, name)} is larger than the "
                       f"number of training images ({num_train})")


class Spade:
  """SPADE with a frozen backbone. Holds no fitted state: fit returns a SpadeIndex."""

  def __init__(self, backbone: Any, config: SpadeConfig | None = None):
    """backbone: `.name` and `backbone(images [N, H, W, 3] float32) -> dict` with the
    config's layers ([N, h, w, C]) and 'pool' ([N, C])."""
    self.backbone = backbone
    self.config = SpadeConfig() if config is None else config
    if not isinstance(self.config, SpadeConfig):
      raise ValueError(f"config must be a SpadeConfig, got {type(self.config).__name__}")
    common.check_backbone_levels(backbone, (*self.config.layers, "pool"))

  @property
  def feature_config(self) -> str:
    return self.config.feature_config(self.backbone.name)

  def _batches(self, images, what: str, done: str = "features of"):
    """Yields (pool [B, D], {level: [B, h, w, C]}) per batch of preprocessed images.

    Logs progress as "<what>: <done> i / N images, ..." (see host/progress.py).
    """
    cfg = self.config
    total = len(images)
    for chunk in common.image_batches(images, what, done, cfg.batch_size):
      with progress.stage("backbone") as timed:
        batch, count = common.pad_batch(common.preprocess(chunk, cfg), cfg.batch_size, total)
        out = timed.ready(common.unpad(self.backbone(jnp.asarray(batch, jnp.float32)), count))
      common.check_returned_levels(self.backbone, out, (*cfg.layers, "pool"))
      yield out["pool"], {l: out[l] for l in cfg.layers}

  def _features(self, images, what: str) -> tuple[Array, dict[str, Array]]:
    """All images' (pool [N, D], {level: [N, h, w, C]}) float32, on the default device."""
    pools, feats = [], {l: [] for l in self.config.layers}
    for pool, levels in self._batches(images, what):
      pools.append(pool)
      for l in self.config.layers:
        feats[l].append(levels[l])
    return (jnp.concatenate(pools).astype(jnp.float32),
            {l: jnp.concatenate(v).astype(jnp.float32) for l, v in feats.items()})

  def extract(self, images: np.ndarray | Sequence[np.ndarray]
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backbone features of images, on the host.

    Args:
      images: [N, H, W, 3] uint8 (or a list of [H, W, 3]).

    Returns:
      (pool [N, D] float32, {level: [N, h, w, C] float32}), NumPy.
    """
    pool, feats = self._features(images, "images")
    return np.asarray(pool), {l: np.asarray(v) for l, v in feats.items()}

  def fit_features(self, train_pool: Any, train_features: dict[str, Any], *,
                   mesh: Mesh | None = None, axis: str = "data",
                   process_local: bool = False) -> SpadeIndex:
    """A SpadeIndex from training features (e.g. from `extract`).

    Args:
      train_pool: [M, D] pooled features.
      train_features: {level: [M, h, w, C]} for the config's layers.
      mesh: shard the galleries over this mesh's `axis`; None: the mesh set with
        jax.set_mesh, else no sharding.
      axis: the mesh axis that splits the training images.
      process_local: several processes: the features are this process's share
        (see spade_jax.shard_gallery); needs a mesh.

    Returns:
      SpadeIndex (its galleries are ShardedGallery's when there is a mesh), with the
      kernels and bandwidths the config's metric and aggregate need (fit_kernels).
    """
    missing = [l for l in self.config.layers if l not in train_features]
    if missing:
      raise ValueError(f"train_features has no levels {missing}")
    mesh = common.mesh_or_none(mesh, axis)
    feats = {l: train_features[l] for l in self.config.layers}
    if mesh is None:
      if process_local:
        raise ValueError("process_local=True needs a mesh (pass mesh=...)")
      pool = jnp.asarray(train_pool, jnp.float32)
      feats = {l: jnp.asarray(v, jnp.float32) for l, v in feats.items()}
    else:
      pool = sharding.shard_gallery(np.asarray(train_pool, np.float32) if process_local
                                    else train_pool, mesh, axis, process_local=process_local)
      feats = sharding.shard_gallery(
          {l: np.asarray(v, np.float32) if process_local else v for l, v in feats.items()},
          mesh, axis, process_local=process_local)
    index = SpadeIndex(train_pool=pool, train_features=feats,
                       backbone_name=self.backbone.name, feature_config=self.feature_config,
                       weights_id=common.weights_id(self.backbone))
    _check_k(self.config, index.num_images)
    return self.fit_kernels(index)

  def fit_kernels(self, index: SpadeIndex) -> SpadeIndex:
    """`index` with what this config's metric and aggregate need fitted on its own
    training features: a kernel per part for a kernel metric, the median bandwidths
    for "softmin" / "kde" without a bandwidth (fit_metric). `index` itself when it
    holds them already, or when nothing is needed (a fixed metric with "mean").

    Fitting from the index gives what fit / fit_features would have fitted from the
    same features. A sharded index's features are gathered on the host first (with
    several processes, every process gathers all of them and fits the same kernels);
    the kernels are replicated on its mesh.

    Raises:
      ValueError: index is not a SpadeIndex for this backbone and feature config.
    """
    if not isinstance(index, SpadeIndex):
      raise ValueError(f"index must be a SpadeIndex, got {type(index).__name__}")
    check_compatible(index, self.backbone.name, self.config, "Spade.fit_kernels",
                     weights=common.weights_id(self.backbone))
    cfg = self.config
    if not index.missing_fits(cfg):
      return index
    same = index.fitted_metric == cfg.metric
    parts = ("pool", *cfg.layers)
    reuse = None  # This metric's kernels, when only bandwidths are missing.
    if same and cfg.is_kernel and all(p in index.kernels for p in parts):
      reuse = jax.tree.map(sharding.to_local, {p: index.kernels[p] for p in parts})
    kernels, bandwidths = metric_fit.fit_metric(
        cfg, metric_fit.host_rows(index.train_pool),
        {l: metric_fit.host_rows(index.train_features[l]) for l in cfg.layers}, kernels=reuse)
    if reuse is not None:
      kernels = {}
    elif index.is_sharded:
      kernels = _replicate(kernels, index.train_pool.mesh)
    if same:  # Keep what was fitted for this metric too.
      kernels = {**index.kernels, **kernels}
      bandwidths = {**dict(index.bandwidths), **bandwidths}
    return index.replace(kernels=kernels, fitted_metric=cfg.metric,
                         bandwidths=tuple(sorted(bandwidths.items())))

  def fit(self, train_images: np.ndarray | Sequence[np.ndarray], *, mesh: Mesh | None = None,
          axis: str = "data") -> SpadeIndex:
    """Extracts the training features.

    Args:
      train_images: [M, H, W, 3] uint8 normal images (or a list of [H, W, 3]).
      mesh: shard the galleries over this jax.sharding.Mesh's `axis` (other mesh axes
        spread the test images); None: the mesh set with jax.set_mesh, else one device.
      axis: the mesh axis that splits the training images.

    Returns:
      SpadeIndex with M images.
    """
    mesh = common.mesh_or_none(mesh, axis)  # Checked before the backbone runs.
    pool, feats = self._features(train_images, "train_images")
    return self.fit_features(pool, feats, mesh=mesh, axis=axis)

  def _prepare_index(self, index: SpadeIndex, mesh: Mesh | None, axis: str) -> SpadeIndex:
    if not isinstance(index, SpadeIndex):
      raise ValueError(f"index must be a SpadeIndex, got {type(index).__name__}")
    check_compatible(index, self.backbone.name, self.config, "Spade.score",
                     weights=common.weights_id(self.backbone))
    _check_k(self.config, index.num_images)
    missing = index.missing_fits(self.config)
    if missing:
      held = ("nothing fitted" if index.fitted_metric is None else
              f"what was fitted for metric {index.fitted_metric!r}")
      raise ValueError(
          f"Spade.score: this config (metric={self.config.metric!r}, aggregate="
          f"{self.config.aggregate!r}) needs {' and '.join(missing)}, but the index holds "
          f"{held}; call index = spade.fit_kernels(index) (fits them on the index's own "
          "training features) or fit the index with this config")
    if index.is_sharded:
      if mesh is not None and mesh != index.train_pool.mesh:
        raise ValueError("Spade.score: the index is sharded over another mesh than `mesh`; "
                         "refit, or pass mesh=None")
      return index
    mesh = common.mesh_or_none(mesh, axis)
    return index if mesh is None else shard_index(index, mesh, axis)

  def scoring_kwargs(self, index: SpadeIndex) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image_scores', pixel_scores') metric / aggregate / bandwidth keyword arguments
    of this config with `index` (its kernels and median bandwidths where the config
    needs them; see SpadeIndex.missing_fits)."""
    cfg = self.config
    if cfg.is_kernel:
      pool_metric, level_metric = index.kernels["pool"], {l: index.kernels[l]
                                                          for l in cfg.layers}
    else:
      pool_metric = level_metric = cfg.metric
    pool_h = level_h = cfg.bandwidth
    if cfg.needs_bandwidths:
      known = dict(index.bandwidths)
      pool_h = known["pool"]
      level_h = known["cat"] if cfg.combine == "cat" else {l: known[l] for l in cfg.layers}
    return ({"metric": pool_metric, "aggregate": cfg.aggregate, "bandwidth": pool_h},
            {"metric": level_metric, "aggregate": cfg.aggregate, "bandwidth": level_h})

  def _score_batch(self, index: SpadeIndex, pool: Any, levels: dict[str, Any],
                   kwargs: tuple[dict[str, Any], dict[str, Any]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    cfg = self.config
    image_kwargs, pixel_kwargs = kwargs
    with progress.stage("search") as timed:  # The kNN searches and the pixel scores.
      scores, nbrs = scoring.image_scores(pool, index.train_pool, cfg.k_image_score,
                                          num_neighbors=cfg.k_images, **image_kwargs)
      score_maps = timed.ready(scoring.pixel_scores(
          levels, index.train_features, nbrs, kappa=cfg.kappa, combine=cfg.combine,
          **pixel_kwargs))
    return common.scores_and_maps(scores, score_maps, cfg.input_size, cfg.sigma)

  def score(self, index: SpadeIndex, images: np.ndarray | Sequence[np.ndarray], *,
            mesh: Mesh | None = None, axis: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Image scores and anomaly maps of test images.

    Args:
      index: from fit / load_index, for this backbone and feature config.
      images: [N, H, W, 3] uint8 (or a list of [H, W, 3]).
      mesh: an unsharded index is sharded over this mesh's `axis` first (None: the mesh
        set with jax.set_mesh, else one device); a sharded index uses its own mesh.
      axis: the mesh axis that splits the training images.

    Returns:
      (scores [N] float32, anomaly maps [N, crop, crop] float32), NumPy.
    """
    index = self._prepare_index(index, mesh, axis)
    kwargs = self.scoring_kwargs(index)
    return common.concatenate_scored(
        self._score_batch(index, pool, levels, kwargs)
        for pool, levels in self._batches(images, "images", done="scored"))

  def score_features(self, index: SpadeIndex, pool: Any, features: dict[str, Any], *,
                     mesh: Mesh | None = None, axis: str = "data"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`score` from test features (e.g. from `extract`), config.batch_size at a time.

    Args:
      index: as in `score`.
      pool: [N, D] pooled test features.
      features: {level: [N, h, w, C]} for the config's layers.
      mesh, axis: as in `score`.

    Returns:
      (scores [N] float32, anomaly maps [N, crop, crop] float32), NumPy.
    """
    index = self._prepare_index(index, mesh, axis)
    kwargs = self.scoring_kwargs(index)
    missing = [l for l in self.config.layers if l not in features]
    if missing:
      raise ValueError(f"features has no levels {missing}")
    count = int(np.shape(pool)[0])
    if count == 0:
      raise ValueError("pool holds 0 test images")
    return common.score_in_batches(
        lambda rows: self._score_batch(
            index, pool[rows], {l: features[l][rows] for l in self.config.layers}, kwargs),
        count, self.config.batch_size)
