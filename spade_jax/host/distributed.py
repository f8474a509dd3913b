"""Several processes (jax.distributed): the process flags, start-up, and host gathers.

A multi-process run is SPMD: every process runs the same program; process p reads its
share p::P of every image list, computes those images' features, and the collectives
inside the sharded search combine the shares. This module holds the host-side pieces:

* `DistributedConfig`: jax.distributed.initialize's arguments, checked for consistency
  before anything starts (a clear ValueError, not a hang at the coordinator);
* `initialize`: CPU collectives over gloo, then jax.distributed.initialize;
* `share` / `gather_shares`: split a list p::P, and put the shares back together in
  the original order on every process.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process run (all None: a single process).

  Attributes:
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: processes in the run.
    process_id: this process, in [0, num_processes).
    local_device_ids: accelerator ids this process uses (None: all visible).
    num_cpu_devices: CPU devices per process (CPU runs; None: JAX's default).
  """
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  num_cpu_devices: int | None = None

  def __post_init__(self):
    given = {name: getattr(self, name) is not None
             for name in ("coordinator_address", "num_processes", "process_id")}
    if any(given.values()) and not all(given.values()):
      missing = [name for name, ok in given.items() if not ok]
      have = [name for name, ok in given.items() if ok]
      raise ValueError(f"{', '.join(have)} given without {', '.join(missing)}: a "
                       "multi-process run needs coordinator_address, num_processes and "
                       "process_id together")
    if self.local_device_ids is not None and self.coordinator_address is None:
      raise ValueError("local_device_ids given without coordinator_address (it only "
                       "applies to a multi-process run)")
    if self.num_cpu_devices is not None and (not _is_int(self.num_cpu_devices)
                                             or self.num_cpu_devices < 1):
      raise ValueError(f"num_cpu_devices must be a positive int, got {self.num_cpu_devices!r}")
    if self.coordinator_address is None:
      return
    host, _, port = str(self.coordinator_address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"coordinator_address must be host:port, got "
                       f"{self.coordinator_address!r}")
    if not _is_int(self.num_processes) or self.num_processes < 1:
      raise ValueError(f"num_processes must be a positive int, got {self.num_processes!r}")
    if not _is_int(self.process_id) or not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"process_id={self.process_id!r} must be in [0, {self.num_processes}) "
                       f"(num_processes={self.num_processes})")
    if self.local_device_ids is not None:
      ids = tuple(self.local_device_ids)
      if not ids or not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"local_device_ids must be non-negative ints, got {ids!r}")
      object.__setattr__(self, "local_device_ids", ids)

  @property
  def enabled(self) -> bool:
    """True when this is (one process of) a multi-process run."""
    return self.coordinator_address is not None


_joined: DistributedConfig | None = None  # The run this process joined, if any.


def initialize(config: DistributedConfig) -> None:
  """Applies `config` before JAX starts its backends (call first thing in a script).

  CPU processes talk over gloo (TCP); GPUs / TPUs use their own collectives. A process
  joins one run: calling again with the config it joined with does nothing (a script's
  main() run again in one process, as tests/script_server.py runs it), with another
  config raises ValueError.
  """
  global _joined  # pylint: disable=global-statement
  import jax  # pylint: disable=import-outside-toplevel
  if _joined is not None:
    if config != _joined:
      raise ValueError(f"this process already joined the multi-process run {_joined}; "
                       f"it cannot join {config}")
    return
  if config.num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", config.num_cpu_devices)
  if not config.enabled:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes,
                             process_id=config.process_id,
                             local_device_ids=config.local_device_ids)
  _joined = config


def process_index_and_count() -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index(), jax.process_count()


def share(items: Sequence[T]) -> list[T]:
  """This process's share of `items`: items[p::P]."""
  p, count = process_index_and_count()
  return list(items[p::count])


def gather_shares(local: np.ndarray, total: int) -> np.ndarray:
  """Inverse of `share` for arrays: every process gets all `total` rows, in order.

  Args:
    local: [n_p, ...] this process's rows (row j is item j * P + p).
    total: number of items over all processes.

  Returns:
    [total, ...] on every process.
  """
  p, count = process_index_and_count()
  if count == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  per = -(-total // count)
  expected = len(range(p, total, count))
  if local.shape[0] != expected:
    raise ValueError(f"process {p} holds {local.shape[0]} rows, expected {expected} of "
                     f"{total}")
  padded = np.zeros((per,) + local.shape[1:], local.dtype)
  padded[:expected] = local
  stacked = np.asarray(multihost_utils.process_allgather(padded))  # [P, per, ...]
  order = (1, 0) + tuple(range(2, stacked.ndim))
  return stacked.transpose(order).reshape((per * count,) + local.shape[1:])[:total]


def broadcast_from_first(values: np.ndarray) -> np.ndarray:
  """Process 0's `values` on every process (same shape and dtype everywhere)."""
  _, count = process_index_and_count()
  if count == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.broadcast_one_to_all(values))
