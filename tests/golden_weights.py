"""Seeded random torch-layout weights, reproducible with NumPy alone.

experiments/make_goldens.py loads these into the real torchvision models (in a
throwaway torch venv) and the tests regenerate the same arrays without torch,
so goldens store only activations, never weights. Each tensor has its own
generator, seeded by (SEED, crc32(key)), so a key's values do not depend on
the other keys or on their order. NumPy only: this file is imported by both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import json
import zlib

import numpy as np

SEED = 2005_02357  # SPADE's arXiv id.


def seeded_tensor(key: str, shape: Sequence[int]) -> np.ndarray:
  """One tensor of a torch state dict, chosen by the key's suffix.

  conv/linear weights: He normal (std sqrt(2 / fan_in)); BatchNorm weight in
  [0.5, 1.5], bias and running_mean N(0, 0.1), running_var in [0.5, 2]: far
  enough from identity that a BN with swapped or missing statistics fails the
  comparison. Linear bias N(0, 0.1). num_batches_tracked: 0 (int64).
  """
  shape = tuple(int(s) for s in shape)
  rng = np.random.default_rng([SEED, zlib.crc32(key.encode("utf-8"))])
  leaf = key.rsplit(".", 1)[-1]
  if leaf == "num_batches_tracked":
    return np.zeros(shape, np.int64)
  if leaf == "weight" and len(shape) >= 2:
    fan_in = int(np.prod(shape[1:]))
    values = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
  elif leaf == "weight":
    values = rng.uniform(0.5, 1.5, shape)
  elif leaf in ("bias", "running_mean"):
    values = rng.normal(0.0, 0.1, shape)
  elif leaf == "running_var":
    values = rng.uniform(0.5, 2.0, shape)
  else:
    raise ValueError(f"no rule for state-dict key {key!r}")
  return values.astype(np.float32)


def seeded_state_dict(spec: Iterable[tuple[str, Sequence[int]]]) -> dict[str, np.ndarray]:
  """[(key, shape), ...] -> {key: seeded_tensor(key, shape)}."""
  return {key: seeded_tensor(key, shape) for key, shape in spec}


def spec_to_json(spec: Iterable[tuple[str, Sequence[int]]]) -> str:
  return json.dumps([[k, [int(s) for s in shape]] for k, shape in spec])


def spec_from_json(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(k, tuple(shape)) for k, shape in json.loads(text)]
