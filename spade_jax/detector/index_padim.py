"""PaDiM's part of the index files (index_file.py): its tensors and metadata, checked.

A PadimIndex file (format PADIM_FORMAT) holds the tensors

  mean       [P, d] F32     mu_ij, one row per position p = i w + j (row-major over
                            the grid); a sharded index is saved without its padding
  precision  [P, d, d] F32  Sigma_ij^-1
  channels   [d] I32        the kept channels: strictly increasing indices into the C
                            concatenated channels of the layers

and, besides the fields of every index file (backbone, weights, levels, ...):

  feature_config  PadimConfig.feature_config: backbone, layers, resize, crop,
                  num_features (null: min(100, C)) and feature_seed
  padim           JSON {"grid": [h, w], "num_channels": C, "regularization": "paper" |
                  "ledoit_wolf", "epsilon": eps of "paper" | null}

The channels are a tensor, not a feature_config field: feature_config stays exactly
PadimConfig.feature_config(backbone) (the text Padim compares and fingerprints), and the
channels follow from it and C (PadimConfig.channels(C)). Stored, they make the file
self-describing; reading checks that they are that draw. The "padim" field and the
tensors are covered by the checksums like every field and tensor.

Everything is checked before a tensor is read: the field's values (C at most
MAX_CHANNELS, so that the channel draw stays small), the tensors' names, dtypes and
shapes against each other and against the field (P = h w, d = num_features or
min(100, C), d <= C). Nothing in a file is executed.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

from spade_jax.detector.padim import PadimConfig, PadimIndex
from spade_jax.scoring import gaussian
from spade_jax.search import sharding

PADIM_FORMAT = "spade_jax.PadimIndex"
FIELD = "padim"
TENSORS = ("mean", "precision", "channels")
# C, the channels the subset is drawn from, at most this (reading draws the subset to
# check it: C raw random numbers). CNN pyramids have a few thousand (Wide-ResNet50-2's
# layer1..3: 1792).
MAX_CHANNELS = 1 << 20
CONFIG_KEYS = sorted(json.loads(PadimConfig().feature_config("")))
_FIELD_KEYS = ["epsilon", "grid", "num_channels", "regularization"]


def _positive_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def to_file(index: PadimIndex) -> tuple[dict[str, np.ndarray], str]:
  """(tensors, "padim" field) of `index`: mean [P, d] and precision [P, d, d] (a sharded
  index's without padding), channels [d] int32, and the field's JSON text."""
  tensors = {"mean": _host(index.mean), "precision": _host(index.precision),
             "channels": np.asarray(index.channels, np.int32)}
  epsilon = None if index.epsilon is None else float(index.epsilon)
  field = json.dumps({"grid": [int(g) for g in index.grid],
                      "num_channels": int(index.num_channels),
                      "regularization": index.regularization, "epsilon": epsilon},
                     sort_keys=True)
  return tensors, field


def _host(x: Any) -> np.ndarray:
  return x.to_numpy() if isinstance(x, sharding.ShardedGallery) else np.asarray(x)


def check_config(where: str, config: dict[str, Any]) -> None:
  """The PaDiM-only fields of feature_config (PadimConfig.feature_config)."""
  if sorted(config) != CONFIG_KEYS:
    raise ValueError(f"{where}: metadata field 'feature_config' must have the fields "
                     f"{CONFIG_KEYS} (PadimConfig.feature_config), got {sorted(config)!r:.200}")
  if config["num_features"] is not None and not _positive_int(config["num_features"]):
    raise ValueError(f"{where}: metadata field 'feature_config' has num_features="
                     f"{config['num_features']!r:.100}, expected a positive int or null")
  seed = config["feature_seed"]
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"{where}: metadata field 'feature_config' has feature_seed="
                     f"{seed!r:.100}, expected a non-negative int")


def check_field(where: str, metadata: dict[str, str]) -> dict[str, Any]:
  """The "padim" field of a PaDiM file, checked: {grid: (h, w), num_channels,
  regularization, epsilon}; also that d's setting fits C. Refuses the field in a file
  of another format, and SPADE's "kernels" field in a PaDiM file."""
  if metadata.get("format") != PADIM_FORMAT:
    if FIELD in metadata:
      raise ValueError(f"{where}: only a PaDiM index has the metadata field {FIELD!r}")
    return {}
  if "kernels" in metadata:
    raise ValueError(f"{where}: a PaDiM index has no metadata field 'kernels'")
  if FIELD not in metadata:
    raise ValueError(f"{where}: index metadata has no {FIELD!r} field; the file is damaged "
                     "or was not written by save_index")
  try:
    field = json.loads(metadata[FIELD])
  except (ValueError, RecursionError) as e:
    raise ValueError(f"{where}: metadata field {FIELD!r} is not valid JSON ({e})") from None
  if not isinstance(field, dict) or sorted(field) != _FIELD_KEYS:
    got = sorted(field) if isinstance(field, dict) else type(field).__name__
    raise ValueError(f"{where}: metadata field {FIELD!r} must be an object with the fields "
                     f"{_FIELD_KEYS}, got {got!r:.200}")
  grid, channels = field["grid"], field["num_channels"]
  regularization, epsilon = field["regularization"], field["epsilon"]
  if not (isinstance(grid, list) and len(grid) == 2 and all(_positive_int(g) for g in grid)):
    raise ValueError(f"{where}: metadata field {FIELD!r} has grid={grid!r:.100}, expected "
                     "[h, w] of positive ints")
  if not _positive_int(channels) or channels > MAX_CHANNELS:
    raise ValueError(f"{where}: metadata field {FIELD!r} has num_channels={channels!r:.100}, "
                     f"expected an int in [1, {MAX_CHANNELS}]")
  if regularization not in gaussian.REGULARIZATIONS:
    raise ValueError(f"{where}: metadata field {FIELD!r} has regularization="
                     f"{regularization!r:.100}, expected one of {gaussian.REGULARIZATIONS}")
  if regularization == "paper":
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (
        math.isfinite(epsilon) and epsilon > 0):
      raise ValueError(f"{where}: metadata field {FIELD!r} has epsilon={epsilon!r:.100}, "
                       "expected a finite number > 0 (regularization 'paper')")
    epsilon = float(epsilon)
  elif epsilon is not None:
    raise ValueError(f"{where}: metadata field {FIELD!r} has epsilon={epsilon!r:.100} with "
                     f"regularization {regularization!r}, expected null")
  config = json.loads(metadata["feature_config"])  # Checked by check_config.
  num_features = config["num_features"]
  if num_features is not None and num_features > channels:
    raise ValueError(f"{where}: metadata field 'feature_config' has num_features="
                     f"{num_features}, more than the num_channels={channels} of field "
                     f"{FIELD!r}")
  return {"grid": (grid[0], grid[1]), "num_channels": channels,
          "regularization": regularization, "epsilon": epsilon}


def num_features(metadata: dict[str, str], field: dict[str, Any]) -> int:
  """d of a checked PaDiM file: feature_config's num_features, or min(100, C)."""
  config = json.loads(metadata["feature_config"])
  return PadimConfig(num_features=config["num_features"]).embedding_size(
      field["num_channels"])


def check_specs(where: str, specs: dict[str, tuple[str, Sequence[int]]],
                metadata: dict[str, str]) -> None:
  """A PaDiM file's tensors (dtype name, shape): exactly TENSORS, F32 mean [P, d] and
  precision [P, d, d], I32 channels [d], with P = h w and d the config's."""
  missing = [n for n in TENSORS if n not in specs]
  if missing:
    raise ValueError(f"{where}: no tensor {missing[0]!r} (a PaDiM index holds "
                     f"{list(TENSORS)})")
  extra = sorted(set(specs) - set(TENSORS))
  if extra:
    raise ValueError(f"{where}: unexpected tensors {extra!r:.200} (a PaDiM index holds "
                     f"{list(TENSORS)})")
  field = check_field(where, metadata)
  h, w = field["grid"]
  d = num_features(metadata, field)
  expected = {"mean": ("F32", [h * w, d], "[positions, channels]"),
              "precision": ("F32", [h * w, d, d], "[positions, channels, channels]"),
              "channels": ("I32", [d], "[channels]")}
  for name, (dtype, shape, layout) in expected.items():
    got_dtype, got_shape = specs[name]
    if got_dtype != dtype:
      raise ValueError(f"{where}: tensor {name!r} has dtype {got_dtype}, expected {dtype}")
    if len(got_shape) != len(shape):
      raise ValueError(f"{where}: tensor {name!r} has shape {list(got_shape)}, expected "
                       f"{len(shape)} dimensions {layout}")
    if list(got_shape) != shape:
      raise ValueError(f"{where}: tensor {name!r} has shape {list(got_shape)}, expected "
                       f"{shape}: grid {[h, w]} ({h * w} positions), d={d} channels "
                       f"(feature_config's num_features, of num_channels="
                       f"{field['num_channels']})")


def check_channels(where: str, metadata: dict[str, str], channels: np.ndarray
                   ) -> tuple[int, ...]:
  """Checks that `channels` [d] are PadimConfig.channels(C)'s draw for the checked
  metadata's num_features, feature_seed and C; returns them."""
  field = check_field(where, metadata)
  config = json.loads(metadata["feature_config"])
  expected = PadimConfig(num_features=config["num_features"],
                         feature_seed=config["feature_seed"]).channels(field["num_channels"])
  if tuple(int(c) for c in np.asarray(channels).reshape(-1)) != expected:
    raise ValueError(f"{where}: tensor 'channels' is not the channel subset of "
                     f"feature_config (num_features={config['num_features']}, feature_seed="
                     f"{config['feature_seed']}) among num_channels={field['num_channels']}")
  return expected


def from_file(where: str, metadata: dict[str, str], tensors: dict[str, np.ndarray]
              ) -> PadimIndex:
  """The PadimIndex of a checked file's metadata and tensors (check_channels first)."""
  field = check_field(where, metadata)
  expected = check_channels(where, metadata, tensors["channels"])
  return PadimIndex(mean=jnp.asarray(tensors["mean"]),
                    precision=jnp.asarray(tensors["precision"]),
                    backbone_name=metadata["backbone"],
                    feature_config=metadata["feature_config"], grid=field["grid"],
                    channels=expected, num_channels=field["num_channels"],
                    regularization=field["regularization"], epsilon=field["epsilon"],
                    weights_id=metadata.get("weights"))

