"""PatchCore: coreset time and memory as N grows, scoring per image against SPADE mode,
and a sharded memory bank against one device (fake CPU devices).

* coreset: spade_jax.coreset(features [N, D], size) in a fresh process per N: seconds
  of the timed call (after a compiling call), seconds per greedy step, its working set
  (peak RSS during the call - RSS with the features built) and XLA's scratch memory;
  beside it, what an N x N float32 distance matrix (the exact greedy of the reference
  code) would take, and the N at which that exceeds the machine's memory;
* scoring: seconds per test image, no backbone, random features with a backbone's
  pyramid shapes: PatchCore (patch features of layer2 + 3, nearest of a 10% coreset
  bank, max, maps) against SPADE (image kNN + ensemble pixel scores of K images' layer1
  to 3, maps), taking turns;
* sharded: in a process with `devices` fake CPU devices, coreset and PatchCore scoring
  on a bank sharded over all of them vs the same bank on one device, taking turns,
  with the results compared. Fake devices share this machine's cores: the figure is
  the overhead of the sharded program, not a speedup;
* precision: float32 vs bf16 greedy steps (coreset(precision=...));
* prune: the plain greedy vs the pruned ones, by the triangle inequality and by the
  principal-component bound (coreset(prune=False | "triangle" | "pca")),
  taking turns in one process per source: N(0, 1) rows ("gaussian:N"), or a built-in
  category's PatchCore patch features (efficientnet_lite0 layer2 + layer3 of its
  training images, generated offline, projected to 128 as PatchCore does, a 10%
  coreset): ms per step, the same selection, and the open rows (those whose bound
  allows a new minimum) over the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import gc
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import spade_jax
from spade_jax.search import coreset as coreset_lib

from . import common, memory, pixel

TITLE = "PatchCore: coreset, scoring, sharded bank"
# The section's parts: coreset time / memory as N grows, PatchCore vs SPADE scoring,
# sharded vs one device, float32 vs bf16 coreset steps, plain vs pruned coreset steps.
PARTS = ("scaling", "scoring", "sharded", "precision", "prune")
# Channels of layer1..3 and of the pooled vector, at 224 x 224 input (56, 28, 14 grids).
PROFILES = {"wide_resnet50_2": ([256, 512, 1024], 2048),
            "efficientnet_lite0": ([24, 40, 112], 1280)}


def _mem_total() -> int | None:
  """The machine's memory (MemTotal), in bytes."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def worker(n: int, dim: int, size: int, projection_dim: int | None) -> dict[str, Any]:
  """One coreset call on [n, dim] N(0, 1) features: seconds, working set, XLA scratch."""
  x = common.random_normal(0, (n, dim))
  run = lambda: spade_jax.coreset(x, size, projection_dim=projection_dim)  # noqa: E731
  start = time.perf_counter()
  jax.block_until_ready(run())  # Compile and run.
  first = time.perf_counter() - start
  gc.collect()
  inputs_rss = memory._current_rss()  # pylint: disable=protected-access
  reset = memory._reset_peak_rss()  # pylint: disable=protected-access
  sampler = memory._RssSampler() if not reset else contextlib.nullcontext()  # pylint: disable=protected-access
  with sampler:
    start = time.perf_counter()
    jax.block_until_ready(run())
    seconds = time.perf_counter() - start
  peak = memory._vm_hwm() if reset else sampler.peak  # pylint: disable=protected-access
  key_data = jax.random.key_data(jax.random.key(0))
  compiled = coreset_lib._coreset_jit.lower(  # pylint: disable=protected-access
      x, key_data, jnp.int32(0), size=size,
      projection_dim=projection_dim if projection_dim and projection_dim < dim else None,
      impl=str(jax.random.key_impl(jax.random.key(0)))).compile()
  return {"n": n, "dim": dim, "size": size, "projection_dim": projection_dim,
          "seconds": seconds, "ms_per_step": 1e3 * seconds / max(size - 1, 1),
          "first_call_s": first, "features_bytes": int(x.nbytes),
          "inputs_rss_bytes": inputs_rss, "peak_rss_bytes": peak,
          "working_set_bytes": peak - inputs_rss,
          "xla_temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
          "n_by_n_bytes": 4 * n * n}


def precision_worker(n: int, dim: int, size: int, repeats: int,
                     precisions: Sequence[str] = ("float32", "bf16")) -> dict[str, Any]:
  """float32 vs bf16 coreset (spade_jax.coreset precision=...) on [n, dim] N(0, 1)
  features in one process: each compiled ahead of time, then `repeats` timed calls
  taking turns; ms per greedy step, whether the selections are equal, peak device
  memory (where the device reports it)."""
  x = common.random_normal(0, (n, dim))
  key = jax.random.key(0)
  key_data, impl = jax.random.key_data(key), str(jax.random.key_impl(key))
  start = jnp.int32(0)
  compiled, compile_s = {}, {}
  for p in precisions:
    t0 = time.perf_counter()
    compiled[p] = coreset_lib._coreset_jit.lower(  # pylint: disable=protected-access
        x, key_data, start, size=size, projection_dim=None, impl=impl,
        precision=p).compile()
    compile_s[p] = time.perf_counter() - t0
  times: dict[str, list[float]] = {p: [] for p in precisions}
  selected = {}
  for _ in range(max(1, repeats)):
    for p in precisions:
      t0 = time.perf_counter()
      selected[p] = jax.block_until_ready(compiled[p](x, key_data, start))
      times[p].append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  first = precisions[0]
  return {"n": n, "dim": dim, "size": size, "repeats": max(1, repeats),
          "platform": jax.devices()[0].platform,
          "seconds": {p: float(np.median(v)) for p, v in times.items()},
          "ms_per_step": {p: 1e3 * float(np.median(v)) / max(size - 1, 1)
                          for p, v in times.items()},
          "compile_s": compile_s,
          "same_selection": {p: bool(np.array_equal(np.asarray(selected[p]),
                                                    np.asarray(selected[first])))
                             for p in precisions},
          "peak_device_bytes": stats.get("peak_bytes_in_use"),
          "features_bytes": int(x.nbytes)}


def builtin_patch_features(category: str, train_images: int = 60) -> np.ndarray:
  """[train_images * 28 * 28, 152] float32: PatchCore's patch features (default config,
  efficientnet_lite0 with its packaged ImageNet weights: layer2 + layer3, p = 3) of a
  built-in category's training images, rendered offline (the benchmark's PNGs hold the
  same pixels)."""
  # Imported here: the other parts need neither a backbone nor the data module.
  from spade_jax.data import builtin  # pylint: disable=import-outside-toplevel
  images = np.stack([builtin.render_example(0, category, "train", i, None)[1]
                     for i in range(train_images)])
  patchcore = spade_jax.PatchCore(spade_jax.load_backbone("efficientnet_lite0", "imagenet"),
                                  spade_jax.PatchCoreConfig())
  feats = patchcore.extract(images)
  return feats.reshape(-1, feats.shape[-1])


def prune_worker(source: str, size: int, dim: int, repeats: int, ratio: float = 0.1,
                 train_images: int = 60) -> dict[str, Any]:
  """Plain vs pruned greedy (coreset(prune=False | "triangle" | "pca")) in one process:
  each compiled ahead of time, one untimed run of each pruned form counting the open
  rows of every step, then `repeats` timed calls each taking turns. source:
  "gaussian:N" ([N, dim] N(0, 1) rows, `size` steps, no projection) or a built-in
  category (its patch features projected to 128, a `ratio` coreset, as PatchCore
  selects it)."""
  if source.startswith("gaussian:"):
    x, projection_dim = common.random_normal(0, (int(source.split(":")[1]), dim)), None
  else:
    x = jax.device_put(builtin_patch_features(source, train_images))
    projection_dim = 128
    size = spade_jax.PatchCoreConfig(coreset_ratio=ratio).coreset_size(int(x.shape[0]))
  n = int(x.shape[0])
  key = jax.random.key(0)
  key_data, impl = jax.random.key_data(key), str(jax.random.key_impl(key))
  start = jnp.int32(0)
  projection_dim = projection_dim if projection_dim and projection_dim < x.shape[1] else None
  lower = lambda **kw: coreset_lib._coreset_jit.lower(  # pylint: disable=protected-access
      x, key_data, start, size=size, projection_dim=projection_dim, impl=impl, **kw).compile()
  compiled = {"plain": lower(prune=False), "pruned": lower(prune="triangle"),
              "pca": lower(prune="pca")}
  counted, counts = {}, {}
  for name in ("pruned", "pca"):
    out, c = lower(prune="triangle" if name == "pruned" else "pca",
                   with_counts=True)(x, key_data, start)
    counted[name], counts[name] = np.asarray(out), np.asarray(c)[1:]
  times: dict[str, list[float]] = {name: [] for name in compiled}
  selected = {}
  for _ in range(max(1, repeats)):
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      selected[name] = np.asarray(jax.block_until_ready(fn(x, key_data, start)))
      times[name].append(time.perf_counter() - t0)
  capacity = coreset_lib._capacity(n)  # pylint: disable=protected-access
  ms = {name: 1e3 * float(np.median(v)) / max(size - 1, 1) for name, v in times.items()}

  def stats(c):
    bound = c[c >= 0]  # -1: a pca step that skipped its bound.
    return {"open_fraction_mean": float(bound.mean()) / n if len(bound) else 0.0,
            "open_fraction_quarters": [float(q[q >= 0].mean()) / n if (q >= 0).any() else None
                                       for q in np.array_split(c, 4) if len(q)],
            "gathered_steps": float(np.mean((c >= 0) & (c <= capacity))),
            "skipped_steps": float(np.mean(c < 0))}

  same = {name: bool(np.array_equal(selected["plain"], selected[name])
                     and np.array_equal(selected["plain"], counted[name]))
          for name in ("pruned", "pca")}
  return {"source": source, "n": n, "dim": int(x.shape[1]), "projection_dim": projection_dim,
          "size": size, "repeats": max(1, repeats), "platform": jax.devices()[0].platform,
          "ms_per_step": ms, "plain_over_pruned": ms["plain"] / ms["pruned"],
          "plain_over_pca": ms["plain"] / ms["pca"], "same_selection": same["pruned"],
          "same_selection_pca": same["pca"], "capacity": capacity,
          **stats(counts["pruned"]), "pca": stats(counts["pca"])}


def _scoring_fns(profile: str, grid: int, train_images: int, k_images: int, num_test: int,
                 coreset_ratio: float, embed_dim: int, sigma: float, image_size: int):
  """({"patchcore": fn, "spade": fn}: one scoring call of num_test images each, bank rows,
  bank D)."""
  channels, pool_dim = PROFILES[profile]
  shapes = pixel.pyramid_shapes(grid, channels)
  test = pixel.pyramid_features(num_test, shapes, seed=10)
  train = pixel.pyramid_features(train_images, shapes, seed=20)
  test_pool = common.random_normal(30, (num_test, pool_dim))
  train_pool = common.random_normal(31, (train_images, pool_dim))
  size = (image_size, image_size)
  layers = ("layer2", "layer3")
  train_patches = spade_jax.patch_features(train, layers, embed_dim=embed_dim)
  rows = train_patches.reshape(-1, train_patches.shape[-1])
  bank_rows = max(1, int(coreset_ratio * rows.shape[0]))
  # The bank's rows only set its size here (selection is timed in the coreset part).
  bank = jax.block_until_ready(rows[:: max(1, rows.shape[0] // bank_rows)][:bank_rows])

  def patchcore():
    patches = spade_jax.patch_features(test, layers, embed_dim=embed_dim)
    _, maps = spade_jax.patchcore_scores(patches, bank, check_finite_inputs=False)
    return spade_jax.anomaly_maps(maps, size, sigma=sigma)

  def spade():
    _, nbrs = spade_jax.image_scores(test_pool, train_pool, min(5, train_images),
                                     num_neighbors=k_images,
                                     check_finite_inputs=False)
    maps = spade_jax.pixel_scores(test, train, nbrs, kappa=1, combine="ensemble",
                                  check_finite_inputs=False)
    return spade_jax.anomaly_maps(maps, size, sigma=sigma)

  return {"patchcore": patchcore, "spade": spade}, int(bank.shape[0]), int(bank.shape[1])


def sharded_worker(devices: int, n: int, dim: int, size: int, profile: str, grid: int,
                   train_images: int, num_test: int, repeats: int) -> dict[str, Any]:
  """In a process with `devices` devices: sharded vs one-device coreset and scoring."""
  if jax.device_count() != devices:
    return {"status": f"error: expected {devices} devices, found {jax.device_count()}"}
  mesh = jax.make_mesh((devices,), ("data",))
  x = common.random_normal(0, (n, dim))
  x_sharded = spade_jax.shard_gallery(x, mesh)
  select = {"one device": lambda: spade_jax.coreset(x, size, projection_dim=None),
            "sharded": lambda: spade_jax.coreset(x_sharded, size, projection_dim=None)}
  coreset_t = common.time_interleaved(select, repeats)
  same = bool(np.array_equal(np.asarray(select["one device"]()),
                             np.asarray(select["sharded"]())))
  channels, _ = PROFILES[profile]
  test = pixel.pyramid_features(num_test, pixel.pyramid_shapes(grid, channels), seed=10)
  patches = spade_jax.patch_features(test, ("layer2", "layer3"), embed_dim=1024)
  bank_rows = max(1, int(0.1 * train_images * patches.shape[1] * patches.shape[2]))
  bank = common.random_normal(1, (bank_rows, patches.shape[-1]))
  bank_sharded = spade_jax.shard_gallery(bank, mesh)
  score = {"one device": lambda: spade_jax.patchcore_scores(patches, bank),
           "sharded": lambda: spade_jax.patchcore_scores(patches, bank_sharded)}
  score_t = common.time_interleaved(score, repeats)
  a, b = score["one device"](), score["sharded"]()
  err = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, b))
  return {"status": "ok", "devices": devices, "n": n, "dim": dim, "size": size,
          "coreset": coreset_t, "coreset_same": same, "bank_rows": int(bank.shape[0]),
          "bank_dim": int(bank.shape[1]), "num_test": num_test, "scoring": score_t,
          "scoring_max_abs_diff": err}


def section(ns: Sequence[int], dim: int, size: int, projection_dim: int | None,
            profiles: Sequence[str], train_images: int, k_images: int, num_test: int,
            repeats: int, sharded_devices: int, sharded_n: int, grid: int = 56,
            coreset_ratio: float = 0.1, image_size: int = 224,
            precision_ns: Sequence[int] = (), precision_size: int | None = None,
            parts: Sequence[str] = PARTS, prune_sources: Sequence[str] = (),
            prune_train_images: int = 60) -> dict[str, Any]:
  """The parts (module docstring) named in `parts`; each coreset point in a fresh
  process. precision: float32 vs bf16 at each N of precision_ns (precision_size steps,
  default `size`), one process per N. prune: plain vs pruned for each of prune_sources
  (prune_worker; N(0, 1) sources take precision_size steps, default `size`; categories
  use prune_train_images training images), one process each."""
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise ValueError(f"unknown coreset parts {unknown}; valid: {', '.join(PARTS)}")
  precision = [common.run_worker("coreset_precision",
                                 {"n": n, "dim": dim, "size": precision_size or size,
                                  "repeats": repeats},
                                 extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"}, timeout_s=3600)
               for n in (precision_ns if "precision" in parts else ())]
  prune = [common.run_worker("coreset_prune",
                             {"source": src, "size": precision_size or size, "dim": dim,
                              "repeats": repeats, "ratio": coreset_ratio,
                              "train_images": prune_train_images},
                             extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"}, timeout_s=3600)
           for src in (prune_sources if "prune" in parts else ())]
  points = []
  for n in (ns if "scaling" in parts else ()):
    res = common.run_worker("coreset", {"n": n, "dim": dim, "size": size,
                                        "projection_dim": projection_dim},
                            device_count=None, extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    res.setdefault("n", n)
    points.append(res)
  mem_total = _mem_total()
  scoring = []
  for profile in (profiles if "scoring" in parts else ()):
    fns, bank_rows, bank_dim = _scoring_fns(profile, grid, train_images, k_images, num_test,
                                            coreset_ratio, 1024, 4.0, image_size)
    timings = common.time_interleaved(fns, repeats)
    scoring.append({"profile": profile, "bank_rows": bank_rows, "bank_dim": bank_dim,
                    **{f"{m}_s_per_image": t["median_s"] / num_test
                       for m, t in timings.items()}, "timings": timings})
    del fns
    gc.collect()
  sharded = {"status": "not run"} if "sharded" not in parts else common.run_worker(
      "coreset_sharded", {"devices": sharded_devices, "n": sharded_n, "dim": dim,
                          "size": size, "profile": profiles[0], "grid": grid,
                          "train_images": train_images,
                          "num_test": num_test, "repeats": repeats},
      device_count=sharded_devices, extra_env={"JAX_PLATFORMS": "cpu"})
  return {"coreset": points, "mem_total_bytes": mem_total,
          "n_by_n_limit": None if mem_total is None else math.isqrt(mem_total // 4),
          "coreset_ratio": coreset_ratio, "train_images": train_images, "k_images": k_images,
          "num_test": num_test, "grid": grid, "image_size": image_size,
          "scoring": scoring, "sharded": sharded, "precision": precision, "prune": prune}


def markdown(r: dict[str, Any]) -> list[str]:
  """The coreset table, the N x N limit, the scoring and sharded tables."""
  f, mib = common.fmt, common.mib
  rows = []
  for p in r["coreset"]:
    if "seconds" not in p:
      rows.append([p["n"], "-", "-", "-", "-", "-", "-", "-", p.get("status")])
      continue
    full = p["ms_per_step"] * 1e-3 * r["coreset_ratio"] * p["n"]
    rows.append([p["n"], f(p["seconds"]), f(p["ms_per_step"]), f(full), mib(p["features_bytes"]),
                 mib(p["working_set_bytes"]), mib(p["xla_temp_bytes"]),
                 f(p["xla_temp_bytes"] / p["n"]), mib(p["n_by_n_bytes"])])
  first = next((p for p in r["coreset"] if "seconds" in p), {})
  lines = _precision_lines(r.get("precision") or []) + _prune_lines(r.get("prune") or [])
  if not rows:
    return lines + _scoring_and_sharded_lines(r)
  lines += [f"Coreset: spade_jax.coreset(N(0, 1) features [N, {first.get('dim')}], "
           f"size={first.get('size')}, projection_dim={first.get('projection_dim')}), one "
           f"fresh process per N; the timed call follows a compiling one. The "
           f"{r['coreset_ratio']:.0%} column extrapolates ms/step to a "
           f"{r['coreset_ratio']:.0%} coreset (time is linear in the steps)."]
  lines += common.table(["N", "s (timed call)", "ms / step", f"s for a "
                         f"{r['coreset_ratio']:.0%} coreset (extrapolated)", "features MiB",
                         "working set MiB", "XLA scratch MiB", "XLA scratch bytes / point",
                         "N x N float32 MiB"], rows)
  good = [p for p in r["coreset"] if "working_set_bytes" in p]
  if len(good) >= 2:
    lo, hi = good[0], good[-1]
    slope = (hi["working_set_bytes"] - lo["working_set_bytes"]) / (hi["n"] - lo["n"])
    lines.append(f"\nFrom N = {lo['n']} to {hi['n']} (x{hi['n'] / lo['n']:.0f}) the working "
                 f"set grows by {slope:.1f} bytes per added point (a constant "
                 f"{(lo['working_set_bytes'] - slope * lo['n']) / 2**20:.0f} MiB besides); "
                 "the features themselves are inputs, not counted.")
  if r.get("n_by_n_limit"):
    lines.append(f"\nAn N x N float32 distance matrix exceeds this machine's "
                 f"{r['mem_total_bytes'] / 2**30:.1f} GiB beyond N = {r['n_by_n_limit']:,}.")
  return lines + _scoring_and_sharded_lines(r)


def _precision_lines(points: list[dict[str, Any]]) -> list[str]:
  """The float32 vs bf16 coreset table (empty when not run)."""
  if not points:
    return []
  f, mib = common.fmt, common.mib
  rows = []
  for p in points:
    if "ms_per_step" not in p:
      rows.append([p.get("n"), "-", "-", "-", "-", "-", p.get("status")])
      continue
    ms = p["ms_per_step"]
    peak = p.get("peak_device_bytes")
    rows.append([p["n"], p["size"], f(ms["float32"]), f(ms["bf16"]),
                 f(ms["float32"] / ms["bf16"]), f(p["same_selection"]["bf16"]),
                 "-" if peak is None else mib(peak)])
  p0 = next((p for p in points if "ms_per_step" in p), {})
  return [f"Coreset precision: spade_jax.coreset(N(0, 1) features [N, {p0.get('dim')}], "
          f"projection_dim=None, precision=float32 | bf16) in one process per N, each "
          f"compiled ahead of time, then {p0.get('repeats')} timed calls taking turns "
          f"(median), on {p0.get('platform')}."] + common.table(
              ["N", "steps", "float32 ms / step", "bf16 ms / step", "float32 / bf16",
               "same selection", "peak device MiB"], rows) + [""]


def _prune_lines(points: list[dict[str, Any]]) -> list[str]:
  """The plain vs pruned (triangle, pca) coreset table (empty when not run)."""
  if not points:
    return []
  f = common.fmt
  quarters = lambda p: " / ".join("-" if q is None else f"{q:.1%}"
                                  for q in p["open_fraction_quarters"])
  rows = []
  for p in points:
    if "ms_per_step" not in p:
      rows.append([p.get("source")] + ["-"] * 12 + [p.get("status")])
      continue
    ms, pca = p["ms_per_step"], p["pca"]
    rows.append([p["source"], f"{p['n']} x {p['dim']}", p["projection_dim"] or "-", p["size"],
                 f(ms["plain"]), f(ms["pruned"]), f(ms["pca"]), f(p["plain_over_pruned"]),
                 f(p["plain_over_pca"]),
                 f(p["same_selection"] and p["same_selection_pca"]),
                 f"{p['open_fraction_mean']:.1%} ({quarters(p)})",
                 f"{pca['open_fraction_mean']:.2%} ({quarters(pca)})",
                 f"{p['gathered_steps']:.1%} / {pca['gathered_steps']:.1%} / "
                 f"{pca['skipped_steps']:.1%} (<= {p['capacity']})"])
  p0 = next((p for p in points if "ms_per_step" in p), {})
  return [f"Coreset pruning: spade_jax.coreset(..., prune=False | 'triangle' | 'pca') in one "
          f"process per source, each compiled ahead of time, then {p0.get('repeats')} timed "
          f"calls taking turns (median), on {p0.get('platform')}; open rows: those whose "
          f"bound allows a new minimum, per step that tests it, over the N rows (by "
          f"quarter of the steps)."] + common.table(
              ["source", "N x D", "projected to", "steps", "plain ms / step",
               "triangle ms / step", "pca ms / step", "plain / triangle", "plain / pca",
               "same selection", "triangle open rows", "pca open rows",
               "steps gathered: triangle / pca; pca steps skipping the bound"],
              rows) + [""]


def _scoring_and_sharded_lines(r: dict[str, Any]) -> list[str]:
  """The scoring and sharded tables (each only when run)."""
  f = common.fmt
  lines: list[str] = []
  if not r["scoring"]:
    return lines + _sharded_lines(r["sharded"])
  lines += ["", f"Scoring, seconds per test image (no backbone; random features; "
            f"{r['num_test']} images per call; {r['train_images']} training images; "
            f"PatchCore: {r['coreset_ratio']:.0%} bank of layer2 + 3 patches, k = 1; "
            f"SPADE: K = {r['k_images']}, ensemble of layer1-3; both with maps at "
            f"{r['image_size']}^2):"]
  lines += common.table(["backbone shapes", "bank rows x D", "PatchCore s / image",
                         "SPADE s / image", "SPADE / PatchCore"],
                        [[s["profile"], f"{s['bank_rows']} x {s['bank_dim']}",
                          f(s["patchcore_s_per_image"]), f(s["spade_s_per_image"]),
                          f(s["spade_s_per_image"] / s["patchcore_s_per_image"])]
                         for s in r["scoring"]])
  return lines + _sharded_lines(r["sharded"])


def _sharded_lines(sh: dict[str, Any]) -> list[str]:
  f = common.fmt
  if sh.get("status") == "not run":
    return []
  if sh.get("status") != "ok":
    return ["", f"Sharded bank: {sh.get('status')}"]
  lines = ["", f"Sharded vs one device, {sh['devices']} fake CPU devices sharing this "
            f"machine's cores (overhead, not speedup): coreset of N = {sh['n']} x "
            f"{sh['dim']} (size {sh['size']}), PatchCore scoring of {sh['num_test']} images "
            f"against a {sh['bank_rows']} x {sh['bank_dim']} bank."]
  lines += common.table(["op", "one device s", "sharded s", "sharded / one device",
                         "same result"],
                        [["coreset", f(sh["coreset"]["one device"]["median_s"]),
                          f(sh["coreset"]["sharded"]["median_s"]),
                          f(sh["coreset"]["sharded"]["median_s"]
                            / sh["coreset"]["one device"]["median_s"]),
                          f(sh["coreset_same"])],
                         ["patchcore_scores", f(sh["scoring"]["one device"]["median_s"]),
                          f(sh["scoring"]["sharded"]["median_s"]),
                          f(sh["scoring"]["sharded"]["median_s"]
                            / sh["scoring"]["one device"]["median_s"]),
                          f"max abs diff {sh['scoring_max_abs_diff']:.2g}"]])
  return lines
