"""Entry point of the suite's subprocesses: one section's measurement in a fresh Python.

Started by common.run_worker (scaling, memory) and knn.NumpyMatmul (numpy_matmul),
with experiments/ on PYTHONPATH:

  python -m bench.worker --worker NAME '{"kwarg": ...}'   # prints BENCH_RESULT {json}
  python -m bench.worker --serve numpy_matmul '{...}'      # one pass per stdin line
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import json
import sys
import traceback
from typing import Any

from . import common, coreset, knn, memory, scaling

WORKERS: dict[str, Callable[..., dict[str, Any]]] = {
    "scaling": scaling.worker,
    "memory": memory.worker,
    "memory_tiles": memory.tiled_worker,
    "coreset": coreset.worker,
    "coreset_sharded": coreset.sharded_worker,
    "coreset_precision": coreset.precision_worker,
    "coreset_prune": coreset.prune_worker,
}

SERVERS: dict[str, Callable[..., None]] = {"numpy_matmul": knn.numpy_matmul_server}


def main(argv: Sequence[str]) -> int:
  """`--worker NAME JSON`: print BENCH_RESULT {json}; `--serve NAME JSON`: serve stdin."""
  table = {"--worker": WORKERS, "--serve": SERVERS}.get(argv[1] if len(argv) > 1 else "")
  if len(argv) != 4 or table is None or argv[2] not in table:
    print(f"usage: {argv[0]} --worker {{{','.join(WORKERS)}}} JSON | "
          f"--serve {{{','.join(SERVERS)}}} JSON", file=sys.stderr)
    return 2
  try:
    result = table[argv[2]](**json.loads(argv[3]))
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return 1
  if argv[1] == "--worker":
    print(common.RESULT_PREFIX + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
