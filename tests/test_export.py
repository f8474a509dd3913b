"""GPU/TPU lowerings of every public device function hold no CPU-only custom call.

On CPU the kNN searches call spade_jax's FFI kernel (cpu_kernel.TARGET) through
lax.platform_dependent, so only CPU lowerings may contain it. Each function of EXPORTS
is exported with jax.export for "cuda" and "tpu" (which works on a CPU-only machine)
and the custom_call targets of the exported module are checked against an allow-list
of targets those platforms have. As a control, the "cpu" export of the kNN-based
functions must contain the kernel (when it is built), so the check can fail.

To cover a new public device function, add an entry to EXPORTS (the only place to edit).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import re
from typing import Any

import jax
from jax import export
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import spade_jax
from spade_jax.search import cpu_kernel


@dataclasses.dataclass(frozen=True)
class Export:
  """One public device function, exported as jax.jit(fn)(*args()).

  Attributes:
    name: test id.
    fn: the function to export; it calls the public API (which validates in Python and
      then calls its jitted internals, traced here). The public defaults are kept:
      their finiteness checks skip tracers, so check_finite_inputs=True traces.
    args: () -> example arguments: jax.ShapeDtypeStructs (shape only, sharded ones with
      their NamedSharding) or pytrees of them; built lazily, at test time.
    uses_cpu_kernel: the CPU lowering is expected to call cpu_kernel.TARGET (checked by
      the control test when the kernel is available).
    sharded: the arguments live on _mesh() (the export must span its devices).
  """
  name: str
  fn: Callable[..., Any]
  args: Callable[[], tuple[Any, ...]]
  uses_cpu_kernel: bool = False
  sharded: bool = False


# Every public device function, at small float32 shapes. This is the one table to
# extend: a new public function (or a new form of one) gets an entry here and is then
# exported for every platform of PLATFORMS and checked by every test below.
EXPORTS = (
    # kNN (single device).
    Export("knn-l2-k1", lambda q, g: spade_jax.knn(q, g, 1, "l2"),
           lambda: (_f32(7, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("knn-l2-k4", lambda q, g: spade_jax.knn(q, g, 4, "l2"),
           lambda: (_f32(7, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("knn-cosine-k1", lambda q, g: spade_jax.knn(q, g, 1, "cosine"),
           lambda: (_f32(7, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("knn-cosine-k4", lambda q, g: spade_jax.knn(q, g, 4, "cosine"),
           lambda: (_f32(7, 16), _f32(40, 16)), uses_cpu_kernel=True),
    # Search options: a blocking forced on every platform, bf16 products.
    Export("knn-l2-k4-blocking-gpu", lambda q, g: spade_jax.knn(q, g, 4, blocking="gpu"),
           lambda: (_f32(7, 16), _f32(40, 16))),
    Export("knn-l2-k1-blocking-tpu", lambda q, g: spade_jax.knn(q, g, 1, blocking="tpu"),
           lambda: (_f32(7, 16), _f32(40, 16))),
    Export("knn-l2-k4-bf16", lambda q, g: spade_jax.knn(q, g, 4, precision="bf16"),
           lambda: (_f32(7, 16), _f32(40, 16))),
    # SPADE scores.
    Export("image_scores", lambda t, g: spade_jax.image_scores(t, g, 3, num_neighbors=4),
           lambda: (_f32(5, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("pixel_scores-ensemble",
           lambda t, g, n: spade_jax.pixel_scores(t, g, n, kappa=2, combine="ensemble"),
           lambda: (_levels(3), _levels(20), _i32(3, 4)), uses_cpu_kernel=True),
    Export("pixel_scores-cat",
           lambda t, g, n: spade_jax.pixel_scores(t, g, n, kappa=2, combine="cat"),
           lambda: (_levels(3), _levels(20), _i32(3, 4)), uses_cpu_kernel=True),
    # Kernels (spade_jax.kernels): parameters as constants of the exported function.
    Export("knn-mahalanobis-k4", lambda q, g: spade_jax.knn(q, g, 4, _kernel("mahalanobis")),
           lambda: (_f32(7, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("knn-rbf-k1", lambda q, g: spade_jax.knn(q, g, 1, _kernel("rbf")),
           lambda: (_f32(7, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("knn-polynomial-k4", lambda q, g: spade_jax.knn(q, g, 4, _kernel("polynomial")),
           lambda: (_f32(7, 16), _f32(40, 16))),  # XLA only: an elementwise proxy.
    Export("knn-rff-k4", lambda q, g: spade_jax.knn(q, g, 4, _kernel("rff")),
           lambda: (_f32(7, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("image_scores-mahalanobis-softmin",
           lambda t, g: spade_jax.image_scores(t, g, 3, _kernel("mahalanobis"), num_neighbors=4,
                                               aggregate="softmin", bandwidth=0.5),
           lambda: (_f32(5, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("pixel_scores-ensemble-kernels",
           lambda t, g, n: spade_jax.pixel_scores(t, g, n, kappa=2, metric=_level_kernels(),
                                                  aggregate="kde", bandwidth=0.5),
           lambda: (_levels(3), _levels(20), _i32(3, 4)), uses_cpu_kernel=True),
    Export("sharded-knn-mahalanobis-k4",
           lambda q, g: spade_jax.knn(q, g, 4, _kernel("mahalanobis")),
           lambda: (_replicated(7, 16), _sharded(37, 16)), uses_cpu_kernel=True,
           sharded=True),
    Export("sharded-pixel_scores-ensemble-kernels",
           lambda t, g, n: spade_jax.pixel_scores(t, g, n, kappa=2, metric=_level_kernels()),
           lambda: (_levels(3, replicated=True), _sharded_levels(19),
                    _replicated(3, 4, dtype=jnp.int32)),
           uses_cpu_kernel=True, sharded=True),
    Export("anomaly_maps", lambda s: spade_jax.anomaly_maps(s, (32, 32), sigma=4.0),
           lambda: (_f32(3, 8, 8),)),
    # PatchCore: patch features, the greedy coreset, scores against a memory bank.
    Export("patch_features",
           lambda l: spade_jax.patch_features(l, ("layer1", "layer2"), embed_dim=6),
           lambda: (_levels(3),)),
    Export("patch_features-per_level",
           lambda l: spade_jax.patch_features(l, ("layer1", "layer2"), embed_dim=5,
                                              reduction="per_level"),
           lambda: (_levels(3),)),
    Export("coreset-exact", lambda x: spade_jax.coreset(x, 5, projection_dim=None),
           lambda: (_f32(40, 16),)),
    Export("coreset-projected", lambda x: spade_jax.coreset(x, 5, projection_dim=8),
           lambda: (_f32(40, 16),)),
    Export("patchcore_scores",
           lambda t, b: spade_jax.patchcore_scores(t, b, reweight_neighbors=3),
           lambda: (_f32(2, 4, 4, 16), _f32(40, 16)), uses_cpu_kernel=True),
    Export("patchcore_scores-topk", lambda t, b: spade_jax.patchcore_scores(t, b, topk=3),
           lambda: (_f32(2, 4, 4, 16), _f32(40, 16)), uses_cpu_kernel=True),
    # PatchCore with a kernel (issue 18): the coreset in the kernel's space (whitened
    # rows; a dot-product kernel's exact distances), the patch distances the kernel's.
    Export("coreset-mahalanobis",
           lambda x: spade_jax.coreset(x, 5, projection_dim=8, metric=_kernel("mahalanobis")),
           lambda: (_f32(40, 16),)),
    Export("coreset-polynomial",
           lambda x: spade_jax.coreset(x, 5, metric=_kernel("polynomial")),
           lambda: (_f32(40, 16),)),
    Export("patchcore_scores-mahalanobis",
           lambda t, b: spade_jax.patchcore_scores(t, b, metric=_kernel("mahalanobis"),
                                                   reweight_neighbors=3),
           lambda: (_f32(2, 4, 4, 16), _f32(40, 16)), uses_cpu_kernel=True),
    # PaDiM: embedding, per-position Gaussians (QR: cuSOLVER's geqrf on cuda),
    # Mahalanobis distances.
    Export("padim_embedding",
           lambda l: spade_jax.padim_embedding(l, ("layer1", "layer2"), channels=(0, 5, 7)),
           lambda: (_levels(3),)),
    Export("fit_gaussians-paper", lambda x: spade_jax.fit_gaussians(x),
           lambda: (_f32(10, 5, 6),)),
    Export("fit_gaussians-ledoit_wolf-chunked",
           lambda x: spade_jax.fit_gaussians(x, regularization="ledoit_wolf", chunk_size=4),
           lambda: (_f32(10, 5, 6),)),
    Export("mahalanobis_distances", spade_jax.mahalanobis_distances,
           lambda: (_f32(3, 10, 6), _f32(10, 6), _f32(10, 6, 6))),
    # Backbones (random weights; variables passed as arguments, not baked in).
    Export("efficientnet_lite0.apply", lambda v, x: _backbone("efficientnet_lite0").apply(v, x),
           lambda: (_variables("efficientnet_lite0"), _f32(1, 64, 64, 3))),
    Export("resnet18.apply", lambda v, x: _backbone("resnet18").apply(v, x),
           lambda: (_variables("resnet18"), _f32(1, 64, 64, 3))),
    # Sharded galleries (spade_jax.shard_gallery over MESH; 37 rows padded to 40).
    Export("sharded-knn-l2-k1", lambda q, g: spade_jax.knn(q, g, 1, "l2"),
           lambda: (_replicated(7, 16), _sharded(37, 16)), uses_cpu_kernel=True,
           sharded=True),
    Export("sharded-knn-cosine-k4", lambda q, g: spade_jax.knn(q, g, 4, "cosine"),
           lambda: (_replicated(7, 16), _sharded(37, 16)), uses_cpu_kernel=True,
           sharded=True),
    Export("sharded-image_scores",
           lambda t, g: spade_jax.image_scores(t, g, 3, num_neighbors=4),
           lambda: (_replicated(5, 16), _sharded(37, 16)), uses_cpu_kernel=True,
           sharded=True),
    Export("sharded-pixel_scores-ensemble",
           lambda t, g, n: spade_jax.pixel_scores(t, g, n, kappa=2, combine="ensemble"),
           lambda: (_levels(3, replicated=True), _sharded_levels(19),
                    _replicated(3, 4, dtype=jnp.int32)),
           uses_cpu_kernel=True, sharded=True),
    Export("sharded-pixel_scores-cat",
           lambda t, g, n: spade_jax.pixel_scores(t, g, n, kappa=2, combine="cat"),
           lambda: (_levels(3, replicated=True), _sharded_levels(19),
                    _replicated(3, 4, dtype=jnp.int32)),
           uses_cpu_kernel=True, sharded=True),
    Export("sharded-coreset", lambda x: spade_jax.coreset(x, 5, projection_dim=8),
           lambda: (_sharded(37, 16),), sharded=True),
    Export("sharded-patchcore_scores",
           lambda t, b: spade_jax.patchcore_scores(t, b, k=2, reweight_neighbors=3),
           lambda: (_replicated(2, 4, 4, 16), _sharded(37, 16)), uses_cpu_kernel=True,
           sharded=True),
    Export("sharded-coreset-polynomial",
           lambda x: spade_jax.coreset(x, 5, metric=_kernel("polynomial")),
           lambda: (_sharded(37, 16),), sharded=True),
    Export("sharded-patchcore_scores-mahalanobis",
           lambda t, b: spade_jax.patchcore_scores(t, b, k=2, metric=_kernel("mahalanobis")),
           lambda: (_replicated(2, 4, 4, 16), _sharded(37, 16)), uses_cpu_kernel=True,
           sharded=True),
    Export("sharded-fit_gaussians", lambda x: spade_jax.fit_gaussians(x, chunk_size=2),
           lambda: (_sharded_array(37, 5, 6),), sharded=True),
    Export("sharded-mahalanobis_distances", spade_jax.mahalanobis_distances,
           lambda: (_replicated(3, 37, 6), _sharded_array(37, 6), _sharded_array(37, 6, 6)),
           sharded=True),
)

# Accelerator platforms exported for: each alone, and both in one multi-platform module.
PLATFORMS = (("cuda",), ("tpu",), ("cuda", "tpu"))

# custom_call targets allowed in cuda / tpu exports: targets jax itself emits for
# those platforms (all in jax.export's list of stable targets): GSPMD sharding
# annotations and shard_map boundaries, placement annotations, lax.empty, shape
# assertions, TPU (Pallas) kernels and TPU linear algebra / approximate top-k.
# Observed with JAX 0.10.2: the functions of EXPORTS lower to no custom call at all on
# cuda and tpu (with Shardy the sharding is carried by sdy ops; lax.top_k is
# chlo.top_k), so this list is what jax may add, not what the library needs; the one
# exceptions are fit_gaussians' QR factorisation, cuSOLVER's geqrf on cuda, and the
# coreset's eigenvectors (prune="pca", the default), cuSOLVER's syevd on cuda.
ACCELERATOR_TARGETS = frozenset({
    "Sharding",
    "SPMDFullToShardShape",
    "SPMDShardToFullShape",
    "annotate_device_placement",
    "AllocateBuffer",
    "shape_assertion",
    "tpu_custom_call",
    "cusolver_geqrf_ffi",  # QR on cuda (PaDiM's fit_gaussians).
    "cusolver_syevd_ffi",  # eigh on cuda (coreset_pca.basis).
    "ApproxTopK",
    "Eigh",
    "Qr",
    "LuDecomposition",
})

# `stablehlo.custom_call @target(` (pretty form) and `call_target_name = "target"`
# (generic form).
_CUSTOM_CALL = re.compile(
    r'custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')

MESH_AXIS = "data"


# ----------------------------------------------------------------------------------
# Argument builders used by EXPORTS.


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _i32(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.int32)


def _levels(n: int, replicated: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """Two pyramid levels of n images: [n, 8, 8, 4] and [n, 4, 4, 6]."""
  make = functools.partial(_replicated, dtype=jnp.float32) if replicated else _f32
  return {"layer1": make(n, 8, 8, 4), "layer2": make(n, 4, 4, 6)}


@functools.cache
def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((8,), (MESH_AXIS,))


def _replicated(*shape: int, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(_mesh(), P()))


def _shape_only(tree: Any) -> Any:
  """Arrays (e.g. a ShardedGallery's leaves) -> ShapeDtypeStructs with their sharding."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      tree)


def _sharded(rows: int, dim: int) -> Any:
  """A [rows, dim] ShardedGallery from spade_jax.shard_gallery, its leaves shape-only."""
  gallery = spade_jax.shard_gallery(np.zeros((rows, dim), np.float32), _mesh(), MESH_AXIS)
  return _shape_only(gallery)


def _sharded_array(*shape: int) -> Any:
  """A ShardedGallery of `shape` (rows first) from spade_jax.shard_gallery, shape-only."""
  return _shape_only(spade_jax.shard_gallery(np.zeros(shape, np.float32), _mesh(), MESH_AXIS))


def _sharded_levels(rows: int) -> Any:
  """_levels(rows) as a dict of ShardedGallerys (one shard_gallery call), shape-only."""
  levels = {k: np.zeros(v.shape, np.float32) for k, v in _levels(rows).items()}
  return _shape_only(spade_jax.shard_gallery(levels, _mesh(), MESH_AXIS))


@functools.cache
def _kernel(name: str, dim: int = 16) -> Any:
  """A kernel of spade_jax.kernels fitted on seeded random [64, dim] features (built
  eagerly, even when first asked for inside the exported function's trace)."""
  features = np.random.default_rng(dim).standard_normal((64, dim)).astype(np.float32)
  with jax.ensure_compile_time_eval():
    return spade_jax.kernels.from_features(name, features, **(
        {"rff": {"num_features": 32}, "nystrom": {"num_landmarks": 8}}.get(name, {})))


def _level_kernels() -> dict[str, Any]:
  """One kernel per level of _levels: Mahalanobis (4 channels), RBF (6 channels)."""
  return {"layer1": _kernel("mahalanobis", 4), "layer2": _kernel("rbf", 6)}


@functools.cache
def _backbone(name: str) -> spade_jax.Backbone:
  return spade_jax.load_backbone(name, weights=None)  # Seeded random init, no download.


def _variables(name: str) -> Any:
  return _shape_only(_backbone(name).variables)


# ----------------------------------------------------------------------------------
# Export and inspection.


def _export(case: Export, platforms: tuple[str, ...]) -> export.Exported:
  """jax.export of case.fn for `platforms`.

  jax.export's own check (custom calls without a compatibility guarantee) is disabled
  for cpu_kernel.TARGET only, so that a leak of the kernel is reported by the
  assertions below, with the function's name; every other target is still checked.
  """
  return export.export(
      jax.jit(case.fn), platforms=platforms,
      disabled_checks=[export.DisabledSafetyCheck.custom_call(cpu_kernel.TARGET)],
  )(*case.args())


def custom_call_targets(module_text: str) -> set[str]:
  """Targets of every custom_call in an MLIR module's text."""
  return {a or b for a, b in _CUSTOM_CALL.findall(module_text)}


def test_custom_call_regex():
  text = ('%0 = stablehlo.custom_call @spade_topk_f32(%a) : ...\n'
          '%1 = "stablehlo.custom_call"(%b) {call_target_name = "Sharding"} : ...\n'
          '%2 = stablehlo.custom_call @mhlo.topk(%c) : ...')
  assert custom_call_targets(text) == {"spade_topk_f32", "Sharding", "mhlo.topk"}
  assert not custom_call_targets("stablehlo.add %a, %b")


@pytest.mark.parametrize("platforms", PLATFORMS, ids="+".join)
@pytest.mark.parametrize("case", EXPORTS, ids=lambda c: c.name)
def test_accelerator_export_has_no_cpu_only_custom_call(case, platforms):
  exported = _export(case, platforms)
  assert exported.platforms == platforms
  text = exported.mlir_module()
  targets = custom_call_targets(text)
  assert cpu_kernel.TARGET not in text, (
      f"{case.name}: the {platforms} lowering contains the CPU kernel {cpu_kernel.TARGET}")
  cpu_named = sorted(t for t in targets if "cpu" in t.lower())
  assert not cpu_named, f"{case.name}: CPU custom calls in the {platforms} lowering: {cpu_named}"
  unknown = sorted(targets - ACCELERATOR_TARGETS)
  assert not unknown, (
      f"{case.name}: custom_call targets not known to exist on {platforms}: {unknown}")
  if case.sharded:
    # The sharded form was exported (not a replicated fallback): the module spans the
    # mesh and holds the shard_map (Shardy: sdy.manual_computation; GSPMD: the
    # SPMDFullToShardShape custom call).
    assert exported.nr_devices == _mesh().size
    assert "sdy.manual_computation" in text or "SPMDFullToShardShape" in targets


@pytest.mark.parametrize("case", [c for c in EXPORTS if c.uses_cpu_kernel],
                         ids=lambda c: c.name)
def test_cpu_export_uses_the_cpu_kernel(case):
  # Control: the same functions lowered for CPU do call the kernel, so the absence
  # asserted above is that of a branch platform_dependent dropped, not of a kernel
  # the search never uses.
  if not cpu_kernel.available():
    pytest.skip(f"CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
  text = _export(case, ("cpu",)).mlir_module()
  assert cpu_kernel.TARGET in custom_call_targets(text)



# A float32 product on a GPU or TPU runs at the backend's default precision unless it
# asks for HIGHEST: TensorFloat-32 on NVIDIA GPUs since Ampere, bfloat16 passes on TPUs.
# The distances' expansion |q|^2 + |g|^2 - 2 q.g amplifies that rounding (an H200 moved
# distances by up to 4% and changed neighbours), so every float32 dot of the exported
# functions must carry precision HIGHEST (spade_jax.search.matmul).
_DOT = re.compile(r"stablehlo\.dot(?:_general)?\b[^\n]*")


def low_precision_dots(module_text: str) -> list[str]:
  """The float32 dot / dot_general lines of an MLIR module not at precision HIGHEST (a
  product of bfloat16 operands, precision="bf16", is not a float32 dot)."""
  return [line for line in _DOT.findall(module_text)
          if "xf32>" in line.split(":")[-1].split("->")[0]
          and "precision = [HIGHEST, HIGHEST]" not in line]


def test_low_precision_dot_regex():
  default = ("%2 = stablehlo.dot_general %0, %1, contracting_dims = [1] x [1] : "
             "(tensor<7x16xf32>, tensor<40x16xf32>) -> tensor<7x40xf32>")
  highest = default.replace(": (", ", precision = [HIGHEST, HIGHEST] : (")
  bf16 = default.replace("xf32>", "xbf16>")
  bf16_to_f32 = default.replace("16xf32>", "16xbf16>")  # bf16 operands, f32 result.
  assert low_precision_dots(default) == [default[len("%2 = "):]]
  assert not low_precision_dots(highest) and not low_precision_dots(bf16)
  assert not low_precision_dots(bf16_to_f32)


@pytest.mark.parametrize("case", [c for c in EXPORTS if not c.name.endswith(".apply")],
                         ids=lambda c: c.name)
def test_accelerator_export_multiplies_at_full_float32_precision(case):
  text = _export(case, ("cuda",)).mlir_module()
  if "stablehlo.dot" not in text:
    pytest.skip(f"{case.name}: no product in the lowering (exact differences)")
  assert not low_precision_dots(text), (case.name, low_precision_dots(text)[:3])


# ----------------------------------------------------------------------------------
# The search blocking of each platform (neighbors.BLOCKINGS) is the one lowered.


def _knn_module(platforms: tuple[str, ...], **options) -> str:
  """knn(k=1) of 64 queries against 40000 rows (D = 16), exported for `platforms`."""
  return export.export(
      jax.jit(lambda q, g: spade_jax.knn(q, g, 1, **options)), platforms=platforms,
      disabled_checks=[export.DisabledSafetyCheck.custom_call(cpu_kernel.TARGET)],
  )(_f32(64, 16), _f32(40000, 16)).mlir_module()


_TOP_K_WHOLE_BLOCK = re.compile(r'"chlo\.top_k"[^\n]*\(tensor<64x40000xf32>\)')
_GROUP_MINIMA = re.compile(r"stablehlo\.minimum across dimensions = \[2\] : "
                           r"\(tensor<64x(\d+)x32xf32>")


def test_accelerator_exports_use_their_platforms_blocking():
  # cuda: one [64, 40000] block (all queries, the whole gallery: under 2^23 entries)
  # and lax.top_k over it; tpu: the same block, grouped selection (minima of 1250
  # groups of 32); cpu with kernel="xla": the CPU blocking, chunks of 8000 rows
  # (250 groups). No CPU custom call in the accelerator modules.
  cuda = _knn_module(("cuda",))
  assert _TOP_K_WHOLE_BLOCK.search(cuda)
  assert not _GROUP_MINIMA.search(cuda)
  tpu = _knn_module(("tpu",))
  assert not _TOP_K_WHOLE_BLOCK.search(tpu)
  assert {int(g) for g in _GROUP_MINIMA.findall(tpu)} == {1250}
  cpu = _knn_module(("cpu",), kernel="xla")
  assert not _TOP_K_WHOLE_BLOCK.search(cpu)
  assert {int(g) for g in _GROUP_MINIMA.findall(cpu)} == {250}
  for text in (cuda, tpu):
    assert cpu_kernel.TARGET not in text
    assert not any("cpu" in t.lower() for t in custom_call_targets(text))
  # Forced: the gpu blocking on a CPU lowering, the cpu one on cuda.
  assert _TOP_K_WHOLE_BLOCK.search(_knn_module(("cpu",), blocking="gpu"))
  assert {int(g) for g in _GROUP_MINIMA.findall(_knn_module(("cuda",), blocking="cpu"))} \
      == {250}
  # One module for both platforms holds both blockings.
  both = _knn_module(("cuda", "tpu"))
  assert _TOP_K_WHOLE_BLOCK.search(both) and _GROUP_MINIMA.search(both)


def test_pixel_scores_exports_use_their_platforms_blocking():
  # SPADE's pixel search (layer1 of _levels: 64 positions, K = 4 images of 64 rows):
  # lax.top_k over each [64, 256] block on cuda, the grouped selection on tpu.
  case = next(c for c in EXPORTS if c.name == "pixel_scores-ensemble")
  top_k = re.compile(r'"chlo\.top_k"[^\n]*\(tensor<(?:1x)?64x256xf32>\)')  # 1: lax.map's batch.
  assert top_k.search(_export(case, ("cuda",)).mlir_module())
  assert not top_k.search(_export(case, ("tpu",)).mlir_module())


def test_bf16_search_multiplies_bf16_rows_and_float32_norms():
  text = _knn_module(("cuda",), precision="bf16")
  dots = _DOT.findall(text)
  assert any("xbf16>" in d.split(":")[-1] for d in dots)  # The rows' product.
  assert any("precision = [HIGHEST, HIGHEST]" in d for d in dots)  # The norms' column.
  assert not low_precision_dots(text)
