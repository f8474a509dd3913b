"""The PaDiM detector (Defard et al., ICPR 2020): config, fitted index, fit / score.

  padim = Padim(backbone, PadimConfig())
  index = padim.fit(train_images_uint8)           # PadimIndex, no hidden state
  scores, maps = padim.score(index, test_images_uint8)

`fit` runs preprocess -> backbone -> PaDiM's embedding (spade_jax.padim_embedding: the
config's layers resized to the first one's grid by nearest neighbour, concatenated, and
a fixed random subset of d channels) in batches, then fits one Gaussian per position
(i, j) of that grid over the N training images (spade_jax.fit_gaussians: mean mu_ij and
precision Sigma_ij^-1, with the paper's Sigma + eps I or Ledoit-Wolf shrinkage).
`score` computes the test embeddings, the Mahalanobis distance of each position to its
Gaussian (spade_jax.mahalanobis_distances) -> score maps [N, h, w], the anomaly maps
(bilinear upsampling to the crop, Gaussian blur, as the other detectors) and the image
score: the largest value of the final (upsampled, blurred) anomaly map, as anomalib's
PaDiM takes the max of its anomaly map (the authors' code takes the max of the same map
after a min-max normalisation over the test set, which does not change the ranking).

Memory: the index holds P = h w precisions of d x d floats: 56 x 56 x 550^2 x 4 bytes =
3.8 GB for Wide-ResNet50-2 at 224 pixels (d = 550), 125 MB for ResNet18 (d = 100).
Nothing is refused; the fit computes at most chunk_size positions at a time, so its
peak beyond the embeddings and the result is one chunk's (scoring/gaussian.py).

The interface is Spade's and PatchCore's: with a mesh (`fit(..., mesh=mesh)`, or one
set with jax.set_mesh) the positions are sharded over the mesh axis `axis`: the
statistics [P, d] and [P, d, d] are split along P (NamedSharding(mesh, P(axis)),
padded to a multiple of the axis) and each device fits and scores its positions; the
numbers are the single-device ones within float32 rounding. `extract`, `fit_features`
and `score_features` split fit / score at the embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
from typing import Any

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.detector import common
from spade_jax.features import embedding as embedding_lib
from spade_jax.features import geometry
from spade_jax.features.backbones import Backbone
from spade_jax.host import progress
from spade_jax.scoring import gaussian
from spade_jax.search import sharding

Array = jax.Array
Mesh = jax.sharding.Mesh

# d when num_features is None (the paper's ResNet18 setting), or C when there are fewer.
DEFAULT_NUM_FEATURES = 100


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class PadimConfig:
  """PaDiM settings (defaults: the paper's, with the ResNet18 subset size d = 100).

  Attributes:
    layers: pyramid levels concatenated into the embedding; the first one's grid is the
      Gaussians' (paper: layer1, layer2, layer3).
    num_features: d, the random channel subset of the C concatenated channels (paper:
      100 for ResNet18, 550 for Wide-ResNet50-2); None: min(100, C). A d above C is
      refused (a ValueError naming C) when the channels are known.
    feature_seed: seed of the channel subset (spade_jax.features.embedding
      .random_channels: np.random.default_rng(feature_seed)'s raw PCG64 stream).
    regularization: "paper" (Sigma_ij = sample covariance + epsilon I) or
      "ledoit_wolf" (sklearn's Ledoit-Wolf shrinkage; epsilon unused).
    epsilon: eps of "paper", finite and > 0 (paper: 0.01).
    sigma: Gaussian sigma of the anomaly maps, in crop pixels (paper: 4).
    resize: shorter side before the centre crop (paper: 256); with crop=None, the
      shorter side of image_size when that is chosen from an image (geometry.py).
    crop: centre crop = anomaly-map size (paper: 224); None: the whole image, resized
      to image_size.
    batch_size: images per backbone call and per scoring step (speed/memory only).
    image_size: (H, W) every image is resized to with crop=None (the maps' size;
      spade_jax.features.geometry); None with a crop. fit_folder and the scripts
      choose it from the first training image when not given.
    chunk_size: at most this many positions per step of the fit (memory only; None:
      about 2^24 / ((N + d) d), scoring/gaussian.py).
  """
  layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
  num_features: int | None = None
  feature_seed: int = 0
  regularization: str = "paper"
  epsilon: float = gaussian.PAPER_EPSILON
  sigma: float = 4.0
  resize: int = 256
  crop: int | None = 224
  batch_size: int = 8
  chunk_size: int | None = None
  image_size: tuple[int, int] | None = None

  def __post_init__(self):
    for name in ("batch_size",):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"PadimConfig.{name} must be a positive int, got {value!r}")
    if isinstance(self.layers, str) or not self.layers or not all(
        isinstance(l, str) for l in self.layers):
      raise ValueError(f"PadimConfig.layers must be a non-empty tuple of names, got "
                       f"{self.layers!r}")
    object.__setattr__(self, "layers", tuple(self.layers))
    if len(set(self.layers)) != len(self.layers):
      raise ValueError(f"PadimConfig.layers has duplicates: {self.layers}")
    for name in ("num_features", "chunk_size"):
      value = getattr(self, name)
      if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"PadimConfig.{name} must be a positive int or None, got {value!r}")
    if not _is_int(self.feature_seed) or self.feature_seed < 0:
      raise ValueError(f"PadimConfig.feature_seed must be a non-negative int, got "
                       f"{self.feature_seed!r}")
    if self.regularization not in gaussian.REGULARIZATIONS:
      raise ValueError(f"PadimConfig.regularization must be one of "
                       f"{gaussian.REGULARIZATIONS}, got {self.regularization!r}")
    try:
      gaussian.check_regularization(self.regularization, self.epsilon)
    except ValueError as e:
      raise ValueError(f"PadimConfig.{e}") from None
    if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float, np.number)):
      raise ValueError(f"PadimConfig.sigma must be a number, got {self.sigma!r}")
    object.__setattr__(self, "image_size", geometry.check_geometry(
        "PadimConfig", self.resize, self.crop, self.image_size))
    side = min(self.input_size) if self.crop is not None or self.image_size else self.resize
    if not 0 <= self.sigma <= side:  # NaN and inf fail too.
      raise ValueError(f"PadimConfig.sigma must be finite, >= 0 and at most the maps' "
                       f"shorter side {side}, got {self.sigma!r}")

  def embedding_size(self, num_channels: int) -> int:
    """d for C = num_channels concatenated channels: num_features, or min(100, C).

    Raises:
      ValueError: num_features larger than C (names both).
    """
    if self.num_features is None:
      return min(DEFAULT_NUM_FEATURES, int(num_channels))
    if self.num_features > num_channels:
      raise ValueError(f"PadimConfig.num_features={self.num_features} is larger than the "
                       f"{num_channels} channels of layers {list(self.layers)}; choose "
                       f"at most {num_channels} (or None: min({DEFAULT_NUM_FEATURES}, "
                       f"{num_channels}))")
    return self.num_features

  def channels(self, num_channels: int) -> tuple[int, ...]:
    """The embedding's channels among C = num_channels: random_channels(C, d,
    feature_seed) (sorted indices into the concatenated levels)."""
    d = self.embedding_size(num_channels)
    return tuple(int(c) for c in _random_channels(int(num_channels), d, self.feature_seed))

  def fit_settings(self) -> dict[str, Any]:
    """What the fitted statistics depend on besides the embeddings: regularization and
    (for "paper") epsilon. An index records them; scoring refuses other ones."""
    settings: dict[str, Any] = {"regularization": self.regularization}
    if self.regularization == "paper":
      settings["epsilon"] = float(self.epsilon)
    return settings

  def score_settings(self) -> dict[str, Any]:
    """The settings PaDiM's image score depends on besides the embeddings: the fit's
    regularization (and epsilon) and sigma (the image score is the maximum of the
    blurred map). A calibrated threshold records them (calibration.Threshold) and holds
    only for scores made with them."""
    return {**self.fit_settings(), "sigma": float(self.sigma)}

  @property
  def input_size(self) -> tuple[int, int]:
    """(H, W) of the backbone input and of the anomaly maps: (crop, crop) or image_size
    (ValueError: crop=None without image_size)."""
    return geometry.input_size("PadimConfig", self.crop, self.image_size)

  def geometry_fields(self) -> dict[str, Any]:
    """resize, crop (and image_size with crop=None) of feature_config."""
    return geometry.feature_fields("PadimConfig", self.resize, self.crop, self.image_size)

  def feature_config(self, backbone_name: str) -> str:
    """Canonical JSON of what determines the embeddings: backbone, layers, resize,
    crop, num_features (null: min(100, C)) and feature_seed (not the fit settings
    nor sigma)."""
    return json.dumps({"backbone": backbone_name, "layers": list(self.layers),
                       **self.geometry_fields(),
                       "num_features": self.num_features, "feature_seed": self.feature_seed},
                      sort_keys=True)


@functools.cache
def _random_channels(num_channels: int, num_features: int, seed: int) -> np.ndarray:
  return embedding_lib.random_channels(num_channels, num_features, seed)


@struct.dataclass
class PadimIndex:
  """Fitted PaDiM Gaussians: a pytree of the per-position statistics + static metadata.

  Positions p = i w + j run row-major over the first layer's grid (h, w) = grid.

  Attributes:
    mean: [P, d] float32 mu_ij (or a spade_jax.ShardedGallery of them, split along P).
    precision: [P, d, d] float32 Sigma_ij^-1 (sharded alike when mean is).
    backbone_name: the backbone that produced the embeddings (static).
    feature_config: canonical JSON of backbone, layers, resize, crop, num_features,
      feature_seed (static); the index holds only for these embeddings.
    grid: (h, w), the positions' grid (static; P = h w).
    channels: the d kept channels, indices into the C concatenated channels (static).
    num_channels: C, the channels the subset was drawn from (static).
    regularization: "paper" or "ledoit_wolf" (static).
    epsilon: eps of "paper"; None with "ledoit_wolf" (static).
    weights_id: the identity of the backbone's weights (static); None: not recorded.

  An index file (spade_jax.save_index; detector/index_padim.py) holds the tensors
  "mean" [P, d] F32, "precision" [P, d, d] F32 and "channels" [d] I32
  (= np.asarray(channels)), with grid, num_channels, regularization and epsilon in its
  metadata field "padim"; a sharded index is saved without its padding
  (ShardedGallery.to_numpy()).
  """
  mean: Array | sharding.ShardedGallery
  precision: Array | sharding.ShardedGallery
  backbone_name: str = struct.field(pytree_node=False)
  feature_config: str = struct.field(pytree_node=False)
  grid: tuple[int, int] = struct.field(pytree_node=False)
  channels: tuple[int, ...] = struct.field(pytree_node=False)
  num_channels: int = struct.field(pytree_node=False)
  regularization: str = struct.field(pytree_node=False)
  epsilon: float | None = struct.field(pytree_node=False)
  weights_id: str | None = struct.field(pytree_node=False, default=None)

  @property
  def fingerprint(self) -> str:
    """Short hash of feature_config and weights_id."""
    return common.fingerprint(self.feature_config, self.weights_id)

  @property
  def num_positions(self) -> int:
    """P = h w, the Gaussians."""
    return sharding.num_rows(self.mean)

  @property
  def num_features(self) -> int:
    """d, the embedding's channels."""
    return len(self.channels)

  @property
  def is_sharded(self) -> bool:
    return isinstance(self.mean, sharding.ShardedGallery)

  def fit_settings(self) -> dict[str, Any]:
    """As PadimConfig.fit_settings: what the statistics were fitted with."""
    settings: dict[str, Any] = {"regularization": self.regularization}
    if self.regularization == "paper":
      settings["epsilon"] = self.epsilon
    return settings


def shard_padim_index(index: PadimIndex, mesh: Mesh | None = None,
                      axis: str = "data") -> PadimIndex:
  """`index` with its positions sharded over `mesh`'s `axis` (spade_jax.shard_gallery of
  mean and precision, padded alike)."""
  mesh = sharding.resolve_mesh(mesh, axis)
  stats = sharding.shard_gallery({"mean": index.mean, "precision": index.precision}, mesh,
                                 axis)
  return index.replace(mean=stats["mean"], precision=stats["precision"])


check_compatible = common.check_compatible


def check_index(index: PadimIndex, backbone_name: str, config: PadimConfig, where: str, *,
                weights: str | None = None, num_channels: int | None = None) -> None:
  """Raises a ValueError unless `index` can be scored by a Padim with this backbone and
  config: the same backbone, weights and feature settings (check_compatible), the same
  fit settings (regularization, epsilon) and the config's channel draw.

  Args:
    index: a PadimIndex.
    backbone_name: the detector's backbone.
    config: the detector's PadimConfig.
    where: the caller, for messages.
    weights: the detector's Backbone.weights_id (None: not compared).
    num_channels: C of the detector's layers when known (None: not compared).
  """
  if not isinstance(index, PadimIndex):
    raise ValueError(f"{where}: index must be a PadimIndex, got {type(index).__name__}")
  check_compatible(index, backbone_name, config, where, weights=weights)
  if index.fit_settings() != config.fit_settings():
    raise ValueError(f"{where}: the index was fitted with {index.fit_settings()} but "
                     f"this detector's config has {config.fit_settings()}; refit, or "
                     "score with the config it was fitted with")
  if num_channels is not None and index.num_channels != num_channels:
    raise ValueError(f"{where}: the index's channel subset was drawn from "
                     f"{index.num_channels} channels, but {backbone_name!r} has "
                     f"{num_channels} in layers {list(config.layers)}; refit")
  if index.channels != config.channels(index.num_channels):
    raise ValueError(f"{where}: the index's channel subset is not this config's "
                     "draw (num_features, feature_seed); refit")


def _declared_channels(backbone: Any, layers: Sequence[str]) -> int | None:
  """C of `layers` when the backbone declares its features' channels, else None."""
  known = getattr(backbone, "features", None)
  if known is None:
    return None
  total = 0
  for l in layers:
    info = known.get(l) if hasattr(known, "get") else None
    channels = getattr(info, "channels", info)
    if not _is_int(channels):
      return None
    total += int(channels)
  return total


def _num_images(images: Any) -> int | None:
  if isinstance(images, (list, tuple)):
    return len(images)
  shape = np.shape(images)
  return int(shape[0]) if len(shape) == 4 else None


class Padim:
  """PaDiM with a frozen backbone. Holds no fitted state: fit returns an index.

  (It remembers C, the channel count of the backbone's layers, from the backbone's
  declaration or its first output: the channel subset is drawn from it.)
  """

  def __init__(self, backbone: Any, config: PadimConfig | None = None):
    """backbone: `.name` and `backbone(images [N, H, W, 3] float32) -> dict` with the
    config's layers ([N, h, w, C_l]).

    Raises:
      ValueError: not a PadimConfig, a layer the backbone lacks, or num_features larger
        than the layers' channels (when the backbone declares them).
    """
    self.backbone = backbone
    self.config = PadimConfig() if config is None else config
    if not isinstance(self.config, PadimConfig):
      raise ValueError(f"config must be a PadimConfig, got {type(self.config).__name__}")
    common.check_backbone_levels(backbone, self.config.layers)
    self._num_channels = _declared_channels(backbone, self.config.layers)
    if self._num_channels is not None:
      self.config.channels(self._num_channels)  # A d above C fails before any work.

  @property
  def feature_config(self) -> str:
    return self.config.feature_config(self.backbone.name)

  @property
  def num_channels(self) -> int | None:
    """C, the channels of the config's layers, once known (declared by the backbone or
    seen in its first output); None before."""
    return self._num_channels

  def _channels(self, num_channels: int) -> tuple[int, ...]:
    if self._num_channels is not None and num_channels != self._num_channels:
      raise ValueError(f"backbone {self.backbone.name!r} returned {num_channels} channels "
                       f"for {list(self.config.layers)}, not the {self._num_channels} it "
                       "declares")
    channels = self.config.channels(num_channels)
    self._num_channels = num_channels
    return channels

  def _batches(self, images, what: str, done: str = "embeddings of"):
    """Yields embeddings [B, h, w, d] (device) per batch of preprocessed images.

    Logs progress as "<what>: <done> i / N images, ..." (see host/progress.py).
    """
    cfg = self.config
    total = len(images)
    for chunk in common.image_batches(images, what, done, cfg.batch_size):
      with progress.stage("backbone") as timed:  # Backbone and embedding.
        batch, count = common.pad_batch(common.preprocess(chunk, cfg), cfg.batch_size, total)
        batch = jnp.asarray(batch, jnp.float32)
        # A spade_jax Backbone computes only the levels asked for (no head, no pool).
        out = (self.backbone(batch, features=cfg.layers)
               if isinstance(self.backbone, Backbone) else self.backbone(batch))
        common.check_returned_levels(self.backbone, out, cfg.layers)
        channels = self._channels(sum(int(np.shape(out[l])[-1]) for l in cfg.layers))
        feats = timed.ready(common.unpad(
            embedding_lib.padim_embedding(out, cfg.layers, channels), count))
      yield feats

  def extract(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """PaDiM's embeddings of images, on the host.

    Args:
      images: [N, H, W, 3] uint8 (or a list of [H, W, 3]).

    Returns:
      [N, h, w, d] float32 NumPy: the first layer's grid, the d channels of
      config.channels(C) (see spade_jax.padim_embedding).
    """
    return np.concatenate([np.asarray(e) for e in self._batches(images, "images")])

  def fit_features(self, train_embeddings: Any, *, mesh: Mesh | None = None,
                   axis: str = "data") -> PadimIndex:
    """A PadimIndex from training embeddings (e.g. from `extract`).

    Args:
      train_embeddings: [N, h, w, d] embeddings of N >= 2 training images.
      mesh: fit with the positions sharded over this mesh's `axis` (the index's
        statistics stay sharded); None: the mesh set with jax.set_mesh, else one device.
      axis: the mesh axis that splits the positions.

    Returns:
      PadimIndex (its statistics ShardedGallerys when there is a mesh).

    Raises:
      ValueError: not [N, h, w, d], N < 2, d not this config's, C unknown (a backbone
        that declares no channels and has not run yet: call extract first), NaN / Inf
        embeddings, or a covariance that is not positive definite.
    """
    cfg = self.config
    shape = np.shape(train_embeddings)
    if len(shape) != 4 or min(shape) < 1:
      raise ValueError(f"train_embeddings must be a non-empty [N, h, w, d] array, got "
                       f"shape {shape}")
    n, h, w, d = (int(s) for s in shape)
    if n < 2:
      raise ValueError(f"PaDiM needs at least 2 training images (a covariance per "
                       f"position), got {n}")
    if self._num_channels is None:
      raise ValueError(f"backbone {self.backbone.name!r} declares no channel counts: run "
                       "extract (or fit) once so that the channel subset can be drawn")
    channels = self.config.channels(self._num_channels)
    if d != len(channels):
      raise ValueError(f"train_embeddings have d={d} channels, but this config keeps "
                       f"{len(channels)} of {self._num_channels}")
    mesh = common.mesh_or_none(mesh, axis)
    if mesh is None:
      samples = jnp.swapaxes(jnp.asarray(train_embeddings, jnp.float32)
                             .reshape(n, h * w, d), 0, 1)
    else:  # Each device receives its positions' rows from the host.
      samples = sharding.shard_gallery(
          np.asarray(train_embeddings, np.float32).reshape(n, h * w, d).swapaxes(0, 1),
          mesh, axis)
    mean, precision = gaussian.fit_gaussians(
        samples, regularization=cfg.regularization, epsilon=cfg.epsilon,
        chunk_size=cfg.chunk_size)
    bad = int(jnp.sum(~jnp.all(jnp.isfinite(sharding.data_of(precision)), axis=(1, 2))))
    if bad:
      raise ValueError(
          f"PaDiM fit: the covariance of {bad} of {h * w} positions is singular "
          f"(regularization={cfg.regularization!r}); with 'ledoit_wolf' this happens "
          f"where the shrinkage is 0 with N={n} <= d={d} training images (e.g. N = 2) or "
          "every channel is constant: use regularization='paper' (Sigma + epsilon I)")
    return PadimIndex(mean=mean, precision=precision, backbone_name=self.backbone.name,
                      feature_config=self.feature_config, grid=(h, w), channels=channels,
                      num_channels=self._num_channels, regularization=cfg.regularization,
                      epsilon=cfg.fit_settings().get("epsilon"),
                      weights_id=common.weights_id(self.backbone))

  def fit(self, train_images: np.ndarray | Sequence[np.ndarray], *, mesh: Mesh | None = None,
          axis: str = "data") -> PadimIndex:
    """Extracts the training embeddings and fits a Gaussian per position.

    Args:
      train_images: [N, H, W, 3] uint8 normal images, N >= 2 (or a list of [H, W, 3]).
      mesh: shard the positions over this jax.sharding.Mesh's `axis`; None: the mesh
        set with jax.set_mesh, else one device.
      axis: the mesh axis that splits the positions.

    Returns:
      PadimIndex.
    """
    mesh = common.mesh_or_none(mesh, axis)  # Checked before the backbone runs.
    count = _num_images(train_images)
    if count is not None and count < 2:
      raise ValueError(f"PaDiM needs at least 2 training images (a covariance per "
                       f"position), got {count}")
    feats = jnp.concatenate(list(self._batches(train_images, "train_images")))
    return self.fit_features(feats, mesh=mesh, axis=axis)

  def _prepare_index(self, index: PadimIndex, mesh: Mesh | None, axis: str) -> PadimIndex:
    if not isinstance(index, PadimIndex):
      raise ValueError(f"index must be a PadimIndex, got {type(index).__name__}")
    check_index(index, self.backbone.name, self.config, "Padim.score",
                weights=common.weights_id(self.backbone), num_channels=self._num_channels)
    if index.is_sharded:
      if mesh is not None and mesh != index.mean.mesh:
        raise ValueError("Padim.score: the index is sharded over another mesh than "
                         "`mesh`; refit, or pass mesh=None")
      return index
    mesh = common.mesh_or_none(mesh, axis)
    return index if mesh is None else shard_padim_index(index, mesh, axis)

  def _score_batch(self, index: PadimIndex, embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    cfg = self.config
    n, h, w, d = np.shape(embeddings)
    if (h, w) != tuple(index.grid) or d != index.num_features:
      raise ValueError(f"embeddings of grid {(h, w)} with d={d} do not match the index's "
                       f"grid {tuple(index.grid)} with d={index.num_features}")
    with progress.stage("search") as timed:  # The per-position Mahalanobis distances.
      dist = timed.ready(gaussian.mahalanobis_distances(
          embeddings.reshape(n, h * w, d), index.mean, index.precision))
    score_maps = dist.reshape(n, h, w)
    _, maps = common.scores_and_maps(jnp.max(dist, axis=1), score_maps, cfg.input_size, cfg.sigma)
    return maps.max(axis=(1, 2)), maps

  def score(self, index: PadimIndex, images: np.ndarray | Sequence[np.ndarray], *,
            mesh: Mesh | None = None, axis: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Image scores and anomaly maps of test images.

    Args:
      index: from fit, for this backbone, feature config and fit settings.
      images: [N, H, W, 3] uint8 (or a list of [H, W, 3]).
      mesh: an unsharded index is sharded over this mesh's `axis` first (None: the mesh
        set with jax.set_mesh, else one device); a sharded index uses its own mesh.
      axis: the mesh axis that splits the positions.

    Returns:
      (scores [N] float32: the maximum of each anomaly map, anomaly maps
      [N, crop, crop] float32: the Mahalanobis maps upsampled and blurred), NumPy.
    """
    index = self._prepare_index(index, mesh, axis)
    return common.concatenate_scored(self._score_batch(index, e)
                                     for e in self._batches(images, "images", done="scored"))

  def score_features(self, index: PadimIndex, embeddings: Any, *, mesh: Mesh | None = None,
                     axis: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """`score` from test embeddings (e.g. from `extract`), batch_size at a time.

    Args:
      index: as in `score`.
      embeddings: [N, h, w, d] embeddings of the test images.
      mesh, axis: as in `score`.

    Returns:
      (scores [N] float32, anomaly maps [N, crop, crop] float32), NumPy.
    """
    index = self._prepare_index(index, mesh, axis)
    if np.ndim(embeddings) != 4:
      raise ValueError(f"embeddings must be [N, h, w, d], got shape {np.shape(embeddings)}")
    count = int(np.shape(embeddings)[0])
    if count == 0:
      raise ValueError("embeddings hold 0 test images")
    return common.score_in_batches(lambda rows: self._score_batch(index, embeddings[rows]),
                                   count, self.config.batch_size)
