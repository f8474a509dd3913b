"""Peak memory while scoring: the working set (peak RSS - RSS with inputs built) of one
knn or pixel-scoring call as the gallery grows, each point in a fresh process; and of
scoring one image tile by tile (detector.tiling) as the image grows from one tile to an
8000 x 2000 strip (issue 19: the working set is bounded by the tile batch, not the
image)."""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import gc
import os
import resource
import threading
from typing import Any

import jax

import spade_jax

from . import common, pixel

TITLE = "Peak memory while scoring"
KINDS = ("knn", "pixel", "pixel_k")
FLAT_LIMIT = 1.5  # issue 5: working set within 1.5x when the gallery grows 8x.


def _current_rss() -> int:
  """This process's resident set size now, in bytes (Linux)."""
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
  """getrusage's peak RSS, in bytes."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.


def _vm_hwm() -> int:
  """The address space's RSS high-water mark (VmHWM), which clear_refs resets.

  getrusage's ru_maxrss is max(VmHWM, the HWM recorded when any thread of the process
  exited); XLA's pools start and end threads, so after a reset ru_maxrss can still
  report an older, higher peak. VmHWM is the same counter without that term.
  """
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return _maxrss()


def _reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark (VmHWM, ru_maxrss) to the current RSS."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


class _RssSampler:
  """Fallback when the high-water mark cannot be reset: polls RSS every millisecond."""

  def __init__(self):
    self.peak = _current_rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def _poll(self):
    while not self._stop.wait(0.001):
      self.peak = max(self.peak, _current_rss())

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _current_rss())


def _device_bytes(key: str) -> int | None:
  """The default device's memory_stats()[key], or None where it has none."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get(key)


def worker(kind: str, scale: int, queries: int, rows: int, dim: int, k_images: int,
           train_images: int, grid: int, channels: Sequence[int]) -> dict[str, Any]:
  """Working set of one scoring call = peak RSS during it - RSS with inputs built.

  kind "knn": knn(queries [Q, D], gallery [scale * rows, D], 1).
  kind "pixel": ensemble pixel_scores + anomaly maps of one test image, K = k_images,
    against a training set (memory bank) of scale * train_images images.
  kind "pixel_k": the same with K = scale * k_images: the per-test gallery grows.
  The call runs once first (compile), so the measured call's peak holds only the
  scoring buffers.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if kind == "knn":
    q = common.random_normal(1, (queries, dim))
    g = common.random_normal(2, (scale * rows, dim))
    gallery_bytes = g.nbytes
    run = lambda: spade_jax.knn(q, g, 1, check_finite_inputs=False)  # noqa: E731
  else:
    shapes = pixel.pyramid_shapes(grid, channels)
    k = scale * k_images if kind == "pixel_k" else k_images
    m = k if kind == "pixel_k" else scale * train_images
    run = pixel.make_pixel_fn("ensemble", k, 1, shapes, 224, 4.0, train_images=m)
    gallery_bytes = sum(m * h * w * c * 4 for h, w, c in shapes.values())
  jax.block_until_ready(run())
  gc.collect()
  inputs_rss = _current_rss()
  device_before = _device_bytes("bytes_in_use")
  reset = _reset_peak_rss()
  with _RssSampler() if not reset else contextlib.nullcontext() as sampler:
    jax.block_until_ready(run())
  peak = _vm_hwm() if reset else sampler.peak
  device_peak = _device_bytes("peak_bytes_in_use")
  device_set = None  # On an accelerator the scoring buffers live in device memory.
  if jax.default_backend() != "cpu" and device_peak is not None and device_before is not None:
    device_set = device_peak - device_before
  return {"kind": kind, "scale": scale, "gallery_bytes": gallery_bytes,
          "inputs_rss_bytes": inputs_rss, "peak_rss_bytes": peak,
          "working_set_bytes": peak - inputs_rss,
          "ru_maxrss_bytes": _maxrss(),
          "peak_method": "VmHWM after clear_refs reset" if reset else "RSS polling (1 ms)",
          "device_bytes_before": device_before, "device_peak_bytes": device_peak,
          "device_working_set_bytes": device_set}


def _peak_of(run) -> tuple[int, int, str]:
  """(RSS with inputs, peak RSS during run(), how the peak was found): run() once more
  after a warm-up call."""
  run()
  gc.collect()
  inputs_rss = _current_rss()
  reset = _reset_peak_rss()
  with _RssSampler() if not reset else contextlib.nullcontext() as sampler:
    run()
  peak = _vm_hwm() if reset else sampler.peak
  return inputs_rss, peak, "VmHWM after clear_refs reset" if reset else "RSS polling (1 ms)"


def tiled_worker(height: int, width: int, tile_size: int, tile_overlap: int,
                 backbone: str, batch_size: int) -> dict[str, Any]:
  """Working set of scoring one height x width image tile by tile (Tiled.score_image:
  SPADE, K = 1, fitted on the tiles of one tile_size x tile_size image) = peak RSS
  during the call - RSS with the image and index built, after a warm-up call. The
  stitched map (float32, height x width) is the call's output: its bytes are reported
  beside the working set, and the working set without it."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from spade_jax.detector import tiling  # pylint: disable=import-outside-toplevel
  tiles = tiling.TileConfig(tile_size, tile_overlap)
  spade = spade_jax.Spade(spade_jax.load_backbone(backbone, weights=None), spade_jax.SpadeConfig(
      k_images=1, k_image_score=1, crop=None, batch_size=batch_size))
  tiled = tiling.Tiled(spade, tiles)
  rng = np.random.default_rng(0)
  index = tiled.fit(rng.integers(0, 256, (1, tile_size, tile_size, 3), np.uint8))
  image = rng.integers(0, 256, (height, width, 3), np.uint8)
  inputs_rss, peak, method = _peak_of(lambda: tiled.score_image(index, image))
  map_bytes = height * width * 4
  return {"kind": "tiles", "image": f"{height}x{width}", "pixels": height * width,
          "tiles": len(tiling.tile_boxes(height, width, tiles)),
          "tiles_per_call": tiling.TILE_BATCHES * batch_size, "image_bytes": image.nbytes,
          "inputs_rss_bytes": inputs_rss, "peak_rss_bytes": peak,
          "working_set_bytes": peak - inputs_rss, "map_bytes": map_bytes,
          "working_set_without_map_bytes": peak - inputs_rss - map_bytes,
          "peak_method": method}


def tiles_section(images: Sequence[str], tile_size: int, tile_overlap: int, backbone: str,
                  batch_size: int) -> dict[str, Any]:
  """tiled_worker for each "HxW" of `images`, each in a fresh process; the ratio of the
  largest to the smallest working set without the output map, among the images of at
  least one whole tile batch (TILE_BATCHES x batch_size tiles)."""
  rows = []
  for spec in images:
    h, w = (int(v) for v in spec.lower().split("x"))
    res = common.run_worker(
        "memory_tiles", {"height": h, "width": w, "tile_size": tile_size,
                         "tile_overlap": tile_overlap, "backbone": backbone,
                         "batch_size": batch_size},
        device_count=None, extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    res.setdefault("image", spec)
    rows.append(res)
  out: dict[str, Any] = {"rows": rows, "tile_size": tile_size, "tile_overlap": tile_overlap,
                         "backbone": backbone, "batch_size": batch_size}
  # Judged among the images that fill at least one whole tile batch (an image of fewer
  # tiles runs a smaller batch through the backbone: less memory, not a fair base).
  full = [r for r in rows if "working_set_bytes" in r and r["tiles"] >= r["tiles_per_call"]]
  if len(full) >= 2:
    sets = [max(r["working_set_without_map_bytes"], 1) for r in full]
    out["judged"] = [r["image"] for r in full]
    out["pixel_growth"] = max(r["pixels"] for r in full) / min(r["pixels"] for r in full)
    out["ratio_without_map"] = max(sets) / min(sets)
    out["flat"] = out["ratio_without_map"] <= FLAT_LIMIT
  return out


def section(kinds: Sequence[str], scales: Sequence[int], queries: int, rows: int,
            dim: int, k_images: int, train_images: int, grid: int,
            channels: Sequence[int], tile_images: Sequence[str] = (), tile_size: int = 256,
            tile_overlap: int = 32, tile_backbone: str = "efficientnet_lite0",
            tile_batch_size: int = 4) -> dict[str, Any]:
  """Working set while scoring as the gallery grows; each point in a fresh process.
  tile_images ("HxW"): also the working set of scoring one image of each size tile by
  tile (tiles_section).

  MALLOC_MMAP_THRESHOLD_ fixes glibc's mmap threshold, so freed large buffers go back
  to the OS and RSS follows live allocations (otherwise the warm-up call's freed
  blocks stay cached in the heap and hide the working set).
  """
  out: dict[str, Any] = {"rows": [], "ratios": {}}
  for kind in kinds:
    points = []
    for scale in scales:
      res = common.run_worker(
          "memory", {"kind": kind, "scale": scale, "queries": queries, "rows": rows,
                     "dim": dim, "k_images": k_images, "train_images": train_images,
                     "grid": grid, "channels": list(channels)},
          device_count=None, extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"})
      res.setdefault("kind", kind)
      res.setdefault("scale", scale)
      points.append(res)
    good = [p for p in points if "working_set_bytes" in p]
    # The device's working set where scoring ran on an accelerator, else the host's.
    key = ("device_working_set_bytes" if good and all(
        p.get("device_working_set_bytes") is not None for p in good) else "working_set_bytes")
    if len(good) >= 2:
      # Largest over smallest working set at any two sizes (stricter than last / first).
      sets = [max(p[key], 1) for p in good]
      scales_ok = [p["scale"] for p in good]
      ratio = max(sets) / min(sets)
      out["ratios"][kind] = {"gallery_growth": max(scales_ok) / min(scales_ok),
                             "working_set_ratio": ratio,
                             "last_over_first": sets[-1] / sets[0],
                             "flat": ratio <= FLAT_LIMIT,
                             "memory": "device" if key.startswith("device") else "host"}
    out["rows"].extend(points)
  out["limit"] = FLAT_LIMIT
  if tile_images:
    out["tiles"] = tiles_section(tile_images, tile_size, tile_overlap, tile_backbone,
                                 tile_batch_size)
  return out


def markdown(r: dict[str, Any]) -> list[str]:
  """The working-set table and one flat / NOT flat line per kind."""
  mib = common.mib
  rows = [[x["kind"], x["scale"], mib(x.get("gallery_bytes")), mib(x.get("inputs_rss_bytes")),
           mib(x.get("peak_rss_bytes")), mib(x.get("working_set_bytes")),
           mib(x.get("device_peak_bytes")), mib(x.get("device_working_set_bytes")),
           x.get("peak_method", x.get("status"))]
          for x in r["rows"]]
  lines = ["Working set = peak RSS during one scoring call - RSS with the inputs built "
           "(after a warm-up call). knn: gallery rows grow; pixel: training images in "
           "the memory bank grow, K fixed; pixel_k: K (the per-test-image gallery) grows. "
           "On an accelerator the device working set (peak_bytes_in_use - bytes_in_use "
           "with the inputs) is the one judged."]
  lines += common.table(["kind", "gallery scale", "gallery MiB", "RSS with inputs MiB",
                         "peak RSS MiB", "working set MiB", "device peak MiB",
                         "device working set MiB", "method"], rows)
  for kind, ratio in r["ratios"].items():
    lines.append(f"\n{kind}: gallery x{ratio['gallery_growth']:.0f} -> "
                 f"{ratio.get('memory', 'host')} working set "
                 f"max/min x{ratio['working_set_ratio']:.2f} (largest/smallest gallery "
                 f"x{ratio['last_over_first']:.2f}; limit {r['limit']}): "
                 f"{'flat' if ratio['flat'] else 'NOT flat'}.")
  if "tiles" in r:
    lines += ["", *tiles_markdown(r["tiles"], r["limit"])]
  return lines


def tiles_markdown(t: dict[str, Any], limit: float) -> list[str]:
  """The tiled-image table: one image scored tile by tile, as the image grows."""
  mib = common.mib
  lines = [f"Tiled scoring (detector.tiling, {t['backbone']} with random weights, SPADE "
           f"K = 1, tiles {t['tile_size']} overlap {t['tile_overlap']}, batch_size "
           f"{t['batch_size']}): working set of one Tiled.score_image call = peak RSS - RSS "
           "with the image and the index built (after a warm-up call). The stitched map "
           "(float32, the image's size) is the call's output; the last column leaves it "
           "out."]
  rows = [[x.get("image"), x.get("tiles"), x.get("tiles_per_call"), mib(x.get("image_bytes")),
           mib(x.get("inputs_rss_bytes")), mib(x.get("peak_rss_bytes")),
           mib(x.get("working_set_bytes")), mib(x.get("map_bytes")),
           mib(x.get("working_set_without_map_bytes")), x.get("peak_method", x.get("status"))]
          for x in t["rows"]]
  lines += common.table(["image", "tiles", "tiles per call", "image MiB",
                         "RSS with inputs MiB", "peak RSS MiB", "working set MiB",
                         "output map MiB", "working set without the map MiB", "method"], rows)
  if "ratio_without_map" in t:
    lines.append(f"\ntiles: images of at least one whole tile batch ({', '.join(t['judged'])}"
                 f", x{t['pixel_growth']:.0f} pixels) -> working set without the output "
                 f"map max/min x{t['ratio_without_map']:.2f} (limit {limit}): "
                 f"{'flat' if t['flat'] else 'NOT flat'}.")
  return lines
