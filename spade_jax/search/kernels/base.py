"""Kernels as values: a pytree of parameters with the forms the streamed search needs.

A kernel is a frozen dataclass registered as a pytree (flax.struct): its array fields
are *leaves* (traced jit arguments: a new value does not recompile, and jax.grad
differentiates them), its other fields are static (hashed by value, part of the
compiled program). The search calls the same methods it calls on a Metric
(distances.py): `prepare`, `embed_queries`, `embed_gallery`, `pairwise`, `finalize`,
`exact`, `gallery_extra`, and reads the flags `prepare_is_identity`,
`translation_invariant` and `matmul_proxy`.

Two families cover the kernels here; a new kernel subclasses one and writes a few
lines (README, "Kernelized variants"):

* `L2Kernel`: the distance is a monotone function of the L2 distance between
  transformed rows z = features(x): d(x, y) = from_squared(|z(x) - z(y)|^2). The
  search is L2 on the transformed rows, one matmul per block on every path (the CPU
  kernel included): Mahalanobis and low-rank linear metrics (z linear), random Fourier
  and Nystrom maps (explicit kernel features), RBF and Laplacian kernel-induced
  distances (z = x, d_k a monotone function of |x - y|: same neighbours as L2, only
  the selected distances are transformed).
* `DotProductKernel`: k(x, y) = kappa(x . y) with d_k^2 = k(x, x) + k(y, y) - 2 k(x, y),
  not monotone in L2 (e.g. polynomial). The proxy block is an elementwise transform of
  the matmul, kappa(|g|^2) - 2 kappa(q . g), so `matmul_proxy` is False and the search
  takes the XLA path (the CPU kernel computes plain matmuls only).

Kernels with a normalised density (`log_kernel`) can be fitted by likelihood
cross-validation (objectives.py); kernels with statistics of the data
(`refit`, e.g. Mahalanobis' covariance) are re-estimated on the rest of the data when
cross-fitting. Nothing here imports the search: distances.py accepts kernels.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any, ClassVar

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import matmul

Array = jax.Array

# name -> kernel class, filled by register_kernel.
KERNELS: dict[str, type[Kernel]] = {}
_LOG_2PI = float(np.log(2.0 * np.pi))


def safe_sqrt(x: Array) -> Array:
  """sqrt(x) for x >= 0 whose gradient at 0 is 0 instead of NaN (0 * inf).

  The value is jnp.sqrt(x) bit for bit wherever x > 0, and 0 where x <= 0.
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def squared_norms(x: Array) -> Array:
  """[N, D] -> [N, 1] float32."""
  x = x.astype(jnp.float32)
  return jnp.sum(x * x, axis=-1, keepdims=True)


class Kernel:
  """Base class of kernels. Subclasses are declared with @register_kernel.

  Class attributes (not fields):
    name: registry name (KERNELS), also what kernel_to_arrays records.
    trainable: fields kernels.fit optimises by default (the others stay fixed).
    prepare_is_identity: prepare(x) is x as float32 (the CPU kernel then reads a
      float32 memory bank in place).
    translation_invariant: the distance of prepared rows is unchanged by a common
      translation (the search then embeds rows minus a center near the queries).
    matmul_proxy: the proxy block is the plain matmul of the embeddings (False: the
      CPU kernel, which computes plain matmuls, is not used for this kernel).
  """
  name: ClassVar[str] = ""
  trainable: ClassVar[tuple[str, ...]] = ()
  prepare_is_identity: ClassVar[bool] = False
  translation_invariant: ClassVar[bool] = False
  matmul_proxy: ClassVar[bool] = True

  # The search forms (see distances.Metric for their contracts).
  def prepare(self, x: Array) -> Array:
    raise NotImplementedError

  def embed_queries(self, q: Array) -> Array:
    raise NotImplementedError

  def embed_gallery(self, g: Array) -> Array:
    raise NotImplementedError

  def pairwise(self, query_embeddings: Array, gallery_embeddings: Array) -> Array:
    """[Q, E] x [C, E] -> proxy [Q, C] float32 (one matmul)."""
    return matmul.dot_t(query_embeddings, gallery_embeddings)

  def finalize(self, proxy: Array, q: Array) -> Array:
    raise NotImplementedError

  def exact(self, x: Array, y: Array) -> Array:
    raise NotImplementedError

  # Density and data statistics (optional).
  def log_kernel(self, x: Array, y: Array) -> Array:
    """log of the normalised kernel density K(x, y) of prepared rows (a density in x
    over the raw feature space), for likelihood objectives. Kernels without one raise."""
    raise NotImplementedError(f"kernel {self.name!r} has no normalised density")

  # Fields that are statistics of the training data (refit re-estimates them; the
  # objectives re-estimate them without the held-out features when cross-fitting).
  statistics: ClassVar[tuple[str, ...]] = ()

  def refit(self, rows: np.ndarray) -> Kernel:
    """This kernel with its `statistics` re-estimated from rows [N, D] (host NumPy),
    every other field kept. Kernels without statistics: self."""
    del rows
    return self

  @property
  def input_dim(self) -> int | None:
    """D of the raw features this kernel takes (None: any)."""
    return None

  def params(self) -> dict[str, Array]:
    """The array fields by name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.metadata.get("pytree_node", True)}

  def static(self) -> dict[str, Any]:
    """The static (non-array) fields by name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if not f.metadata.get("pytree_node", True)}

  @classmethod
  def check_static(cls, static: dict[str, Any]) -> None:
    """Checks the values of the static fields (read from a file's spec, io.check_spec)
    before anything is built; a subclass with constrained static fields overrides it.

    Raises:
      ValueError: naming the bad value.
    """
    del static

  def __repr__(self) -> str:
    shapes = ", ".join(f"{k}={tuple(np.shape(v))}" for k, v in self.params().items())
    static = "".join(f", {k}={v!r}" for k, v in self.static().items())
    return f"{type(self).__name__}({shapes}{static})"


class L2Kernel(Kernel):
  """d(x, y) = from_squared(|z(x) - z(y)|^2), z = features(x): searched as L2 on z.

  Subclasses write `features` (default: the identity) and, for a kernel-induced
  distance, `from_squared` (a non-decreasing map of the squared L2 distance of
  transformed rows; default sqrt). The search then ranks by L2 of transformed rows and
  transforms only the selected distances.
  """
  translation_invariant = True

  def features(self, x: Array) -> Array:
    """[..., D] -> [..., E] transformed rows (traced; may use the parameters)."""
    return x

  def from_squared(self, sq: Array) -> Array:
    """Squared L2 distance of transformed rows -> the kernel's distance (monotone)."""
    return safe_sqrt(sq)

  def log_normalizer(self) -> Array:
    """log normaliser of the Gaussian kernel exp(-|z(x) - z(y)|^2 / 2) as a density in x
    (log |det dz/dx| - E/2 log 2 pi for a linear z); used by `log_kernel`."""
    raise NotImplementedError(f"kernel {self.name!r} has no normalised density")

  def prepare(self, x: Array) -> Array:
    return self.features(jnp.asarray(x).astype(jnp.float32)).astype(jnp.float32)

  def embed_queries(self, q: Array) -> Array:
    """[-2q, 1]: the matmul adds the gallery norm column once."""
    q = q.astype(jnp.float32)
    return jnp.concatenate([-2.0 * q, jnp.ones(q.shape[:-1] + (1,), jnp.float32)], axis=-1)

  def embed_gallery(self, g: Array) -> Array:
    """[g, |g|^2]: e_q . e_g = |q - g|^2 - |q|^2."""
    g = g.astype(jnp.float32)
    return jnp.concatenate([g, squared_norms(g)], axis=-1)

  def gallery_extra(self, g: Array) -> Array:
    return squared_norms(g)

  def finalize(self, proxy: Array, q: Array) -> Array:
    return self.from_squared(jnp.maximum(proxy + squared_norms(q), 0.0))

  def squared(self, x: Array, y: Array) -> Array:
    """|x - y|^2 of prepared rows, difference form (no cancellation)."""
    diff = x.astype(jnp.float32) - y.astype(jnp.float32)
    return jnp.sum(diff * diff, axis=-1)

  def exact(self, x: Array, y: Array) -> Array:
    return self.from_squared(self.squared(x, y))

  def log_kernel(self, x: Array, y: Array) -> Array:
    return -0.5 * self.squared(x, y) + self.log_normalizer()


class DotProductKernel(Kernel):
  """k(x, y) = kappa(x . y); d_k^2 = kappa(|x|^2) + kappa(|y|^2) - 2 kappa(x . y).

  Not monotone in L2: for a fixed query the proxy kappa(|g|^2) - 2 kappa(q . g)
  (= d_k^2 - kappa(|q|^2)) is an elementwise transform of the matmul q . g, computed in
  `pairwise` on the XLA path. Subclasses write `kappa` (elementwise, traced).
  """
  prepare_is_identity = True
  matmul_proxy = False
  gallery_extra = None  # The embedding is not the rows plus extra columns.

  def kappa(self, t: Array) -> Array:
    raise NotImplementedError

  def prepare(self, x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)

  def embed_queries(self, q: Array) -> Array:
    """[q, 0]: the same depth as the gallery embedding."""
    q = q.astype(jnp.float32)
    return jnp.concatenate([q, jnp.zeros(q.shape[:-1] + (1,), jnp.float32)], axis=-1)

  def embed_gallery(self, g: Array) -> Array:
    """[g, kappa(|g|^2)]."""
    g = g.astype(jnp.float32)
    return jnp.concatenate([g, self.kappa(squared_norms(g))], axis=-1)

  def pairwise(self, query_embeddings: Array, gallery_embeddings: Array) -> Array:
    dot = matmul.dot_t(query_embeddings[:, :-1], gallery_embeddings[:, :-1])
    return gallery_embeddings[:, -1][None, :] - 2.0 * self.kappa(dot)

  def finalize(self, proxy: Array, q: Array) -> Array:
    return safe_sqrt(jnp.maximum(proxy + self.kappa(squared_norms(q)), 0.0))

  def exact(self, x: Array, y: Array) -> Array:
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    sq = (self.kappa(matmul.vdot(x, x)) + self.kappa(matmul.vdot(y, y))
          - 2.0 * self.kappa(matmul.vdot(x, y)))
    return safe_sqrt(jnp.maximum(sq, 0.0))


def register_kernel(cls: type | None = None, *, overwrite: bool = False) -> Any:
  """Class decorator: makes `cls` a frozen pytree dataclass and adds it to KERNELS.

  Array fields are leaves (traced, differentiable); declare static fields with
  flax.struct.field(pytree_node=False).

  Raises:
    ValueError: cls is not a Kernel subclass, has no name, or the name is taken
      (unless overwrite=True).
  """
  def wrap(cls):
    if not (isinstance(cls, type) and issubclass(cls, Kernel)):
      raise ValueError(f"register_kernel needs a Kernel subclass, got {cls!r}")
    if not cls.name:
      raise ValueError(f"kernel class {cls.__name__} has no `name`")
    if cls.name in KERNELS and not overwrite:
      raise ValueError(f"kernel {cls.name!r} is already registered; pass overwrite=True")
    cls = struct.dataclass(cls, repr=False)
    KERNELS[cls.name] = cls
    return cls

  return wrap if cls is None else wrap(cls)


@struct.dataclass
class PreparedView:
  """`metric` (a Kernel or a Metric) on rows it has already prepared: `prepare` is
  the identity, everything else is the metric's. Lets a memory bank be transformed
  once per scoring call instead of once per test image."""
  metric: Any
  prepare_is_identity: ClassVar[bool] = True

  def prepare(self, x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)

  def __getattr__(self, name: str) -> Any:
    if name == "metric" or name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.metric, name)


def frozen(tree: Any) -> Any:
  """`tree` (e.g. a kernel) with every leaf under lax.stop_gradient."""
  return jax.tree.map(jax.lax.stop_gradient, tree)


def is_kernel(x: Any) -> bool:
  return isinstance(x, Kernel)


@jax.jit
def _all_finite(leaves: list[Array]) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def leaves_finite(kernel: Kernel) -> bool:
  """Whether every concrete float leaf of `kernel` is finite (tracers count as finite);
  one device reduction."""
  leaves = [leaf for leaf in jax.tree.leaves(kernel)
            if not isinstance(leaf, jax.core.Tracer)
            and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
  if not leaves:
    return True
  with jax.ensure_compile_time_eval():  # Concrete even inside a caller's trace.
    return bool(_all_finite(leaves))


def as_param(value: Any, name: str, *, positive: bool = False) -> Array:
  """A float32 array parameter from a Python number or array (checked when concrete).

  Raises:
    ValueError: not real numbers (a dict, a string, a bool...), not finite, or not > 0
      when positive.
  """
  if not isinstance(value, jax.core.Tracer):
    try:
      host = np.asarray(value)
    except Exception:  # pylint: disable=broad-except  (whatever NumPy cannot read)
      host = np.asarray(None)
    if not (jnp.issubdtype(host.dtype, jnp.floating)  # bfloat16 included.
            or jnp.issubdtype(host.dtype, jnp.integer)):
      raise ValueError(f"{name} must be a real number or array of them, got {value!r:.100}")
    host = host.astype(np.float64)
    if not np.isfinite(host).all():
      raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not (host > 0).all():
      raise ValueError(f"{name} must be > 0, got {value!r}")
  return jnp.asarray(value, jnp.float32)


def map_rows(fn: Callable[[Array], Array], x: Array) -> Array:
  """fn on [N, D] rows applied to [..., D] (reshaped to rows and back)."""
  lead = x.shape[:-1]
  out = fn(x.reshape((-1, x.shape[-1])))
  return out.reshape(lead + out.shape[-1:])
