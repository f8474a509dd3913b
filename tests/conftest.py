"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; one JAX
compilation cache for the test session; the slow tier (tests/slow_tests.txt); the tests
that share a module fixture run on one xdist worker."""

import atexit
import json
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network or the user's cache.
os.environ.setdefault("SPADE_JAX_OFFLINE", "1")
# A new temporary folder for this test session: the first process of the session (pytest
# itself, or xdist's controller) makes it and removes it when it exits; the xdist workers
# and the scripts the tests run inherit it through the environment.
_SESSION_DIR = "SPADE_JAX_TEST_SESSION_DIR"
if _SESSION_DIR not in os.environ:
  os.environ[_SESSION_DIR] = tempfile.mkdtemp(prefix="spade_jax_tests_")
  atexit.register(shutil.rmtree, os.environ[_SESSION_DIR], ignore_errors=True)
SESSION_DIR = pathlib.Path(os.environ[_SESSION_DIR])
# One persistent compilation cache for the session, in that folder, used by the test
# processes (below) and by the scripts they run: a program compiled once (a script's
# backbone at a given size, a search compiled again after jax.clear_caches(), the same
# program on the other xdist worker) is loaded from it, not compiled again. It starts
# empty: nothing compiled by an earlier session (with other XLA_FLAGS, such as CI's AVX2
# rerun, or other code) is ever loaded. The cache's own tests use their own folders
# (tests/test_compile_cache.py); SPADE_JAX_COMPILATION_CACHE=none turns it off.
os.environ.setdefault("SPADE_JAX_COMPILATION_CACHE", str(SESSION_DIR / "jax_compilation_cache"))

import pytest  # noqa: E402  (after the environment above, like every test module)

_GROUPS_FILE = SESSION_DIR / "xdist_groups.json"  # nodeid -> group, written by the workers.


@pytest.fixture(autouse=True, scope="session")
def _session_compilation_cache():
  """The test processes use the session's cache too, every program stored, as the scripts
  store them (spade_jax.host.compilation_cache.enable)."""
  from spade_jax.host import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable(None)  # $SPADE_JAX_COMPILATION_CACHE, set above.
  yield


def _module_fixture_group(item: pytest.Item) -> str | None:
  """The test module's path if `item` uses a fixture of module (or wider) scope defined
  in its own module, else None."""
  module = item.nodeid.split("::", 1)[0]
  info = getattr(item, "_fixtureinfo", None)
  for defs in getattr(info, "name2fixturedefs", {}).values():
    for fixturedef in defs:
      if fixturedef.scope != "function" and getattr(fixturedef, "baseid", None) == module:
        return module
  return None


_SLOW_TESTS_FILE = pathlib.Path(__file__).with_name("slow_tests.txt")


def _measured_slow_tests() -> set[str]:
  """The test ids listed in tests/slow_tests.txt (measured over 2 s; see its header)."""
  lines = _SLOW_TESTS_FILE.read_text(encoding="utf-8").splitlines()
  return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


@pytest.hookimpl(tryfirst=True)  # Before pytest's -m deselects by mark.
def pytest_collection_modifyitems(items):
  """Marks slow the tests listed in tests/slow_tests.txt (the slow tier: pyproject.toml),
  beside those marked in their modules.

  The tests of a module that share a module fixture (a benchmark run, scripts run as
  subprocesses) are one xdist group: with --dist loadgroup (pyproject.toml) they run on
  one worker, so the fixture is made once per session, not once per worker."""
  slow = _measured_slow_tests()
  for item in items:
    if item.nodeid in slow:
      item.add_marker(pytest.mark.slow)
    group = _module_fixture_group(item)
    if group is not None and item.get_closest_marker("xdist_group") is None:
      item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)  # Before the worker tells the controller it has collected.
def pytest_collection_finish(session):
  """An xdist worker writes each grouped test's group for the scheduler below: with
  pytest 9.2, xdist 3.8's loadgroup no longer sees the marks (its nodeid suffix is lost,
  pytest-xdist issue 1386), so the groups travel through the session folder instead."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return
  groups = {}
  for item in session.items:
    marks = [m.args[0] if m.args else m.kwargs.get("name", "default")
             for m in item.iter_markers("xdist_group")]
    if marks:
      groups[item.nodeid] = "_".join(sorted(map(str, set(marks))))
  partial = _GROUPS_FILE.with_name(f"{_GROUPS_FILE.name}.{os.environ['PYTEST_XDIST_WORKER']}")
  partial.write_text(json.dumps(groups))
  os.replace(partial, _GROUPS_FILE)  # Both workers write the same groups.


@pytest.hookimpl(optionalhook=True)  # An xdist hook: no error where xdist is not installed.
def pytest_xdist_make_scheduler(config, log):
  """--dist loadgroup with the groups the workers wrote (see above); each other test is a
  unit of its own, as with --dist load. Groups are sent first, largest first."""
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadGroupScheduling  # pylint: disable=import-outside-toplevel

  class _Scheduling(LoadGroupScheduling):
    _groups = None

    def _split_scope(self, nodeid):
      if self._groups is None:  # Read once all workers have collected (in schedule()).
        try:
          self._groups = json.loads(_GROUPS_FILE.read_text())
        except (OSError, ValueError):
          self._groups = {}  # No groups: every test is a unit of its own.
      return self._groups.get(nodeid) or super()._split_scope(nodeid)

  return _Scheduling(config, log)


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
