"""Weak scaling: knn on a gallery sharded over N fake CPU devices vs the same gallery
unsharded, rows_per_device * N rows, one subprocess per N (the device count is fixed
when jax starts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import spade_jax

from . import common

TITLE = "Weak scaling on fake devices"


def worker(devices: int, queries: int, rows_per_device: int, dim: int, k: int,
           repeats: int) -> dict[str, Any]:
  """In a process with `devices` devices: knn on a sharded vs an unsharded gallery."""
  if jax.device_count() != devices:
    return {"status": f"error: expected {devices} devices, found {jax.device_count()}"}
  try:
    shard_gallery = spade_jax.shard_gallery
  except ImportError:
    return {"status": "unavailable: spade_jax.search.sharding missing"}
  q = common.random_normal(1, (queries, dim))
  g = common.random_normal(2, (devices * rows_per_device, dim))
  mesh = jax.make_mesh((devices,), ("data",))
  sharded_gallery = shard_gallery(g, mesh, axis="data")
  search = lambda gallery: spade_jax.knn(q, gallery, k, check_finite_inputs=False)  # noqa: E731
  timings = common.time_interleaved({"sharded": lambda: search(sharded_gallery),
                                     "unsharded": lambda: search(g)}, repeats)
  sharded, plain = timings["sharded"], timings["unsharded"]
  idx_sharded, idx_plain = np.asarray(search(sharded_gallery)[1]), np.asarray(search(g)[1])
  return {"status": "ok", "devices": devices, "gallery_rows": devices * rows_per_device,
          "sharded": sharded, "unsharded": plain,
          "indices_match": float(np.mean(idx_sharded == idx_plain))}


def section(device_counts: Sequence[int], queries: int, rows_per_device: int,
            dim: int, k: int, repeats: int) -> dict[str, Any]:
  """Weak scaling: gallery = rows_per_device * N rows, N fake devices, one process each."""
  rows = []
  for n in device_counts:
    res = common.run_worker("scaling", {"devices": n, "queries": queries,
                                        "rows_per_device": rows_per_device, "dim": dim,
                                        "k": k, "repeats": repeats}, device_count=n,
                            extra_env={"JAX_PLATFORMS": "cpu"})  # Fake devices are CPU ones.
    res.setdefault("devices", n)
    rows.append(res)
    if res.get("status", "").startswith("unavailable"):
      return {"status": res["status"], "rows": rows}
  ok = [r for r in rows if r.get("status") == "ok"]
  t1 = next((r["sharded"]["median_s"] for r in ok if r["devices"] == 1), None)
  for r in ok:
    t_n = r["sharded"]["median_s"]
    r["sharded_over_unsharded"] = t_n / r["unsharded"]["median_s"]
    if t1 is not None:
      r["efficiency"] = t1 / t_n
      r["work_normalized_efficiency"] = r["devices"] * t1 / t_n
  status = "ok" if len(ok) == len(rows) else "partial"
  return {"status": status, "queries": queries, "rows_per_device": rows_per_device,
          "dim": dim, "k": k, "platform": jax.devices()[0].platform, "rows": rows}


def markdown(r: dict[str, Any]) -> list[str]:
  """The status line and the per-N table (or the status alone)."""
  if r.get("status") not in ("ok", "partial"):
    return [f"Status: {r.get('status')}"]
  f = common.fmt
  rows = []
  for x in r["rows"]:
    if x.get("status") != "ok":
      rows.append([x["devices"], "-", "-", "-", "-", "-", "-", x.get("status")])
      continue
    rows.append([x["devices"], x["gallery_rows"], f(x["sharded"]["median_s"]),
                 f(x["unsharded"]["median_s"]), f(x["sharded_over_unsharded"]),
                 f(x.get("efficiency")), f(x.get("work_normalized_efficiency")),
                 f(x["indices_match"])])
  lines = [f"Status: {r['status']}. Queries {r.get('queries')} x D={r.get('dim')}, k="
           f"{r.get('k')}, {r.get('rows_per_device')} gallery rows per device."]
  lines += common.table(["devices N", "gallery rows", "sharded s",
                         "unsharded s (same gallery)", "sharded / unsharded",
                         "efficiency t1/tN", "N*t1/tN", "indices match"], rows)
  return lines
