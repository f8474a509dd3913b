"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network or the user's cache.
os.environ.setdefault("SPADE_JAX_OFFLINE", "1")
# Scripts run by tests keep no compiled programs (tests of the cache set their own folder).
os.environ.setdefault("SPADE_JAX_COMPILATION_CACHE", "none")

import pytest  # noqa: E402  (after the environment above, like every test module)


@pytest.fixture(params=["auto", "xla"])
def search_path(request, monkeypatch):
  """Runs a test twice: searches as configured ("auto": the CPU kernel when it is
  built) and with the CPU kernel switched off ("xla": the path GPU/TPU compile)."""
  if request.param == "xla":
    import jax  # pylint: disable=import-outside-toplevel

    from spade_jax.search import (
      cpu_kernel,  # pylint: disable=import-outside-toplevel
      neighbors,
    )
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    assert not neighbors._cpu_kernel_enabled("auto")  # pylint: disable=protected-access
    jax.clear_caches()  # Compiled searches would otherwise keep the kernel.
    yield request.param
    jax.clear_caches()
  else:
    yield request.param
